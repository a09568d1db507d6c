#!/usr/bin/env bash
# The CPU image, built for real from deploy/Dockerfile and run:
#   1. installs podman and mmdebstrap when missing (apt-get);
#   2. when there is no debian:bookworm / debian:bookworm-slim image, makes
#      one with mmdebstrap from this machine's apt sources and tags it as
#      both (kept for later runs; the Dockerfile's FROM lines then resolve
#      without a registry);
#   3. builds the image with `podman build --isolation=chroot` (no container
#      runtime or daemon needed) and exports its filesystem;
#   4. starts the image's ENTRYPOINT, as its user, in a chroot of that
#      filesystem, with the CMD swapped for loopback ports (what
#      `docker run IMAGE --listen=...` does);
#   5. checks that the image's `negmine health` answers SERVING, that the
#      metrics endpoint answers, and runs the image's demo trainer against the
#      server (it creates and fills the collection, mines, applies a drift
#      update at round 20);
#   6. stops the server with SIGTERM (it must exit 0) and removes the built
#      image, the exported filesystem and the mounts.
# Running a container is not needed: where setrlimit is denied (a sandbox),
# `podman run` fails, while a chroot of the exported filesystem runs the
# same binaries with the same libraries.
#
# usage: deploy/image_test.sh        (as root: apt-get, podman, chroot, mount)
#   JOBS=N          compile jobs inside the image build (default 2)
#   KEEP_IMAGE=1    keep the built image (tag $IMAGE_TAG) afterwards
#   KEEP_CACHE=1    keep the layers the build cached (a rerun then skips the
#                   package installs; any source change recompiles)
#   IMAGE_TAG=T     the tag to build (default localhost/negmine:cpu-test)
# Takes minutes: the build compiles the server and the CLI inside the image.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tag=${IMAGE_TAG:-localhost/negmine:cpu-test}
jobs=${JOBS:-2}
fail() { echo "image_test: FAIL: $*" >&2; exit 1; }
say() { echo "image_test: $*"; }

[ "$(id -u)" = 0 ] || fail "run as root (apt-get, podman build, chroot and mount need it)"

# 1. The tools.
missing=
for p in podman mmdebstrap; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  say "installing$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi

tmp=$(mktemp -d /tmp/negmine-image-XXXXXX)
rootfs=$tmp/rootfs
pid=
mounted=()
built=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  # Anything still running inside the image's filesystem was started here.
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$rootfs" ] && kill -KILL "${p#/proc/}" 2>/dev/null
  done
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[i]}" 2>/dev/null || true; done
  # Never through a mount that is still there (the host's /dev).
  if ! mountpoint -q "$rootfs/dev" 2>/dev/null && ! mountpoint -q "$rootfs/proc" 2>/dev/null; then
    rm -rf --one-file-system "$tmp"
  else
    echo "image_test: $rootfs is still mounted; left in place" >&2
  fi
  if [ -n "$built" ] && [ "${KEEP_IMAGE:-0}" != 1 ]; then
    podman rmi -f "$tag" >/dev/null 2>&1 || true
  fi
  # The layers this build cached (the build stage's, untagged), unless kept.
  if [ -n "$built" ] && [ "${KEEP_CACHE:-0}" != 1 ]; then
    for id in $(podman images -a -q --no-trunc); do
      grep -qx "$id" "$tmp.images" 2>/dev/null || podman rmi -f "$id" >/dev/null 2>&1 || true
    done
  fi
  rm -f "$tmp.images"
}
trap cleanup EXIT

# 2. The base images of the FROM lines.
base=docker.io/library/debian
if ! podman image exists "$base:bookworm" || ! podman image exists "$base:bookworm-slim"; then
  say "making the Debian bookworm base image with mmdebstrap (this machine's apt sources)"
  sources=/etc/apt/sources.list
  [ -s /etc/apt/sources.list.d/debian.sources ] && sources=/etc/apt/sources.list.d/debian.sources
  # The machine's apt options that a snapshot mirror needs, carried into the base.
  nice mmdebstrap --quiet --variant=minbase \
    --aptopt='Acquire::Check-Valid-Until "false"' --aptopt='Acquire::Check-Date "false"' \
    bookworm "$tmp/base.tar" "$sources"
  podman import --quiet "$tmp/base.tar" "$base:bookworm" >/dev/null
  podman tag "$base:bookworm" "$base:bookworm-slim"
  rm -f "$tmp/base.tar"
fi

# 3. The image, as a user would build it (the sources, the Dockerfile), and
# its filesystem.
say "building $tag from deploy/Dockerfile (JOBS=$jobs)"
start=$(date +%s)
podman images -a -q --no-trunc > "$tmp.images"
built=1
# --skip-unused-stages=false: podman 4.3 would skip the runtime stages (see
# deploy/Dockerfile); the GPU one is a no-op for VARIANT=cpu.
nice podman build --isolation=chroot --format docker --pull=never --skip-unused-stages=false \
  --build-arg JOBS="$jobs" \
  -f "$root/deploy/Dockerfile" -t "$tag" "$root" > "$tmp/build.log" 2>&1 ||
  { tail -n 40 "$tmp/build.log" >&2; fail "podman build"; }
say "built in $(( $(date +%s) - start )) s; $(podman image inspect --format '{{.Size}}' "$tag") bytes"
mkdir -p "$rootfs"
cid=$(podman create "$tag")
podman export "$cid" | tar -x -C "$rootfs"
# (podman 4.3 logs an error about healthcheck timers without systemd here;
# the container is removed all the same.)
podman rm "$cid" > /dev/null 2>> "$tmp/podman.log"

# What the image declares: its entrypoint, user, working directory, PATH.
entrypoint=$(podman image inspect --format '{{range .Config.Entrypoint}}{{.}} {{end}}' "$tag")
user=$(podman image inspect --format '{{.Config.User}}' "$tag")
workdir=$(podman image inspect --format '{{.Config.WorkingDir}}' "$tag")
path=$(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$tag" |
       sed -n 's/^PATH=//p')
[ -n "$entrypoint" ] && [ -n "$user" ] && [ -n "$workdir" ] || fail "the image has no entrypoint/user/workdir"
uid=$(chroot "$rootfs" id -u "$user")
gid=$(chroot "$rootfs" id -g "$user")
say "entrypoint: $entrypoint(user $user = $uid:$gid, workdir $workdir)"

for m in proc dev; do
  if [ "$m" = proc ]; then mount -t proc proc "$rootfs/proc"; else mount --bind /dev "$rootfs/dev"; fi
  mounted+=("$rootfs/$m")
done

# Runs a command inside the image's filesystem as the image's user.
in_image() {
  chroot --userspec="$uid:$gid" "$rootfs" /usr/bin/env -i PATH="$path" HOME="$workdir" \
    /bin/sh -c 'cd "$0" && exec "$@"' "$workdir" "$@"
}
# The same in place of the calling (sub)shell: `in_image_exec ... &` makes $!
# the command itself (chroot, env and sh each exec the next), so that the
# SIGTERM below reaches the server.
in_image_exec() {
  exec chroot --userspec="$uid:$gid" "$rootfs" /usr/bin/env -i PATH="$path" HOME="$workdir" \
    /bin/sh -c 'cd "$0" && exec "$@"' "$workdir" "$@"
}

# 4. The server: the entrypoint, with loopback ports for the CMD.
mport=$(/usr/bin/python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
# shellcheck disable=SC2086  # the entrypoint is a word list
in_image_exec $entrypoint --listen=127.0.0.1:0 --port_file="$workdir/port" \
  --metrics_listen="127.0.0.1:$mport" --log_level=warning > "$tmp/server.log" 2>&1 &
pid=$!
for _ in $(seq 600); do
  [ -s "$rootfs$workdir/port" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$tmp/server.log" >&2; fail "the server exited"; }
  sleep 0.1
done
[ -s "$rootfs$workdir/port" ] || fail "the server wrote no port file in 60 s"
port=$(cat "$rootfs$workdir/port")
say "server from the image listening on 127.0.0.1:$port (metrics :$mport)"

# 5. Health, metrics, the demo trainer.
health=$(in_image negmine --server "127.0.0.1:$port" health --timeout-seconds 10) ||
  fail "negmine health: $health"
[ "$health" = SERVING ] || fail "negmine health answered '$health', not SERVING"
say "negmine health: $health"
/usr/bin/python3 - "$mport" <<'PY' || fail "the metrics endpoint"
import sys, urllib.request
body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
assert "negmine_" in body, body[:500]
PY
in_image env NEGMINE_SERVER="127.0.0.1:$port" ROUNDS=21 DIM=32 TARGETS=5000 WAIT_SECONDS=60 \
  demo-trainer > "$tmp/trainer.log" 2>&1 || { cat "$tmp/trainer.log" >&2; fail "demo-trainer"; }
grep -q "demo-trainer: 21 rounds done" "$tmp/trainer.log" || { cat "$tmp/trainer.log" >&2; fail "demo-trainer output"; }
grep -q "drift at step 20" "$tmp/trainer.log" || { cat "$tmp/trainer.log" >&2; fail "no drift update at round 20"; }
info=$(in_image negmine --server "127.0.0.1:$port" info --collection default)
echo "$info" | grep -q "targets=5000 " || fail "collection default after the trainer: $info"
echo "$info" | grep -q "drift: step=20 " || fail "no drift step 20 in: $info"
say "demo-trainer: 21 rounds, drift update at step 20; $(echo "$info" | head -n 1)"

# 6. SIGTERM: a clean exit.
kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
pid=
[ "$rc" = 0 ] || { cat "$tmp/server.log" >&2; fail "the server exited $rc on SIGTERM"; }
say "PASS"

#!/bin/sh
# A stand-in trainer for docker-compose and the Kubernetes example: waits for
# the negmine sidecar, makes sure the collection it mines exists, then mines
# hard negatives in a loop, and every 20 rounds applies a simulated drift
# update (the landmarks re-encoded by the drift-bench encoder), as a real
# trainer would with its own encoder.
#   NEGMINE_SERVER   where negmine listens (default 127.0.0.1:50051)
#   ROUNDS           rounds before exiting (default 0: forever)
#   DIM, TARGETS     the collection "default" it creates when the server has
#                    none: TARGETS drift-bench targets (seed 1, ids 0..N-1)
#                    of dimension DIM (defaults 64 and 100000); a server
#                    started with --default_dim/--generate_targets (compose)
#                    or restarted on its data dir already has it
#   WAIT_SECONDS     how long to wait for the sidecar (default 600)
set -eu
server="${NEGMINE_SERVER:-127.0.0.1:50051}"
rounds="${ROUNDS:-0}"
dim="${DIM:-64}"
targets="${TARGETS:-100000}"
nm() { negmine --server "$server" "$@"; }

echo "demo-trainer: waiting for negmine at $server"
nm health --wait "${WAIT_SECONDS:-600}" >/dev/null

# The collection: created (and filled) unless it is there with its targets.
if ! info=$(nm info --collection default 2>&1); then
  case "$info" in
    *NOT_FOUND*) ;;
    *) echo "demo-trainer: $info" >&2; exit 1 ;;
  esac
  echo "demo-trainer: creating collection default ($targets drift-bench targets, dim $dim)"
  if ! out=$(nm create --collection default --dim "$dim" 2>&1); then
    case "$out" in
      *ALREADY_EXISTS*) ;;  # another trainer of the same server made it
      *) echo "demo-trainer: $out" >&2; exit 1 ;;
    esac
  fi
  info=$(nm info --collection default)
fi
have=$(echo "$info" | sed -n 's/.* targets=\([0-9]*\) .*/\1/p' | head -n 1)
if [ "${have:-0}" -lt "$targets" ]; then
  nm upsert --collection default --random "$targets" --seed 1
fi

step=0
while [ "$rounds" = 0 ] || [ "$step" -lt "$rounds" ]; do
  step=$((step + 1))
  nm mine --collection default --random-queries 256 --seed "$step" \
    --k 64 --mode mixed --num-hard 16 --temperature 0.05 --sample-seed "$step" --json >/dev/null
  if [ $((step % 20)) = 0 ]; then
    nm drift --collection default --model-step "$step" --simulate --seed 1
  fi
  sleep 0.2
done
echo "demo-trainer: $step rounds done"

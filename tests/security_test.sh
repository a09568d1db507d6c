#!/usr/bin/env bash
# TLS, mTLS and bearer-token auth, end to end with the CLI: certificates are
# made here with openssl (a CA, a server certificate for 127.0.0.1, a client
# certificate), then each server is asked the right and the wrong way.
#   security_test.sh SERVER_BIN CLI_BIN
set -euo pipefail
server_bin=$1
cli=$2
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

cd "$tmp"
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 \
  -subj "/CN=negmine test CA" 2>/dev/null
for who in server client; do
  openssl req -newkey rsa:2048 -nodes -keyout $who.key -out $who.csr -subj "/CN=negmine $who" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > $who.ext
  openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $who.pem \
    -days 2 -extfile $who.ext 2>/dev/null
done
echo "s3cret-token-$RANDOM" > token
echo "wrong-token" > wrong

# start NAME FLAGS...: a server on a free port; its address in $NAME_addr.
start() {
  local name=$1
  shift
  "$server_bin" --listen=127.0.0.1:0 --port_file="$tmp/$name.port" --data_dir="$tmp/$name.data" \
    --metrics_listen= --log_level=warning --default_dim=8 --generate_targets=100 "$@" &
  pids+=($!)
  for _ in $(seq 600); do [ -s "$tmp/$name.port" ] && break; sleep 0.05; done
  [ -s "$tmp/$name.port" ] || fail "server $name did not start"
  eval "${name}_addr=127.0.0.1:$(cat "$tmp/$name.port")"
}
# expect_error CODE ARGS...: the CLI fails with that gRPC code.
expect_error() {
  local code=$1
  shift
  local out
  if out=$("$cli" "$@" 2>&1); then fail "expected $code from: $*"; fi
  echo "$out" | grep -q "$code" || fail "expected $code from: $*; got: $out"
}

# TLS with a bearer token.
start tls --tls_cert=server.pem --tls_key=server.key --auth_token_file=token
nm_ok=("$cli" --server "$tls_addr" --tls-ca ca.pem --token-file token)
"${nm_ok[@]}" list | grep -q "targets=100" || fail "TLS + token: list"
"${nm_ok[@]}" upsert --collection default --random 10 --id-offset 500 | grep -q "upserted 10" \
  || fail "TLS + token: a stream"
"${nm_ok[@]}" mine --collection default --random-queries 1 --k 3 >/dev/null || fail "TLS + token: mine"
"$cli" --server "$tls_addr" --tls-ca ca.pem health | grep -q SERVING \
  || fail "the health service needs no token"
expect_error UNAUTHENTICATED --server "$tls_addr" --tls-ca ca.pem list
expect_error UNAUTHENTICATED --server "$tls_addr" --tls-ca ca.pem --token-file wrong list
expect_error UNAUTHENTICATED --server "$tls_addr" --tls-ca ca.pem upsert --collection default --random 5
NEGMINE_TOKEN=$(cat token) "$cli" --server "$tls_addr" --tls-ca ca.pem list >/dev/null \
  || fail "the token from \$NEGMINE_TOKEN"
expect_error UNAVAILABLE --server "$tls_addr" --token-file token list   # plaintext to a TLS port

# mTLS: a client certificate signed by the CA is required.
start mtls --tls_cert=server.pem --tls_key=server.key --tls_client_ca=ca.pem
"$cli" --server "$mtls_addr" --tls-ca ca.pem --tls-cert client.pem --tls-key client.key list \
  | grep -q "targets=100" || fail "mTLS with a client certificate"
expect_error UNAVAILABLE --server "$mtls_addr" --tls-ca ca.pem list

# Bad flags are refused at start, with exit code 2.
set +e
"$server_bin" --listen=127.0.0.1:0 --data_dir="$tmp/bad" --metrics_listen= --tls_cert=server.pem \
  2>"$tmp/bad.err"
rc=$?
set -e
[ "$rc" = 2 ] || fail "exit code $rc for --tls_cert without --tls_key"
grep -q "go together" "$tmp/bad.err" || fail "message: $(cat "$tmp/bad.err")"
echo "security_test: all passed"

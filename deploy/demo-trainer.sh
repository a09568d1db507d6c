#!/bin/sh
# A stand-in trainer for docker-compose and the Kubernetes example: waits for
# the negmine sidecar, then mines hard negatives in a loop, and every 20
# rounds applies a simulated drift update (the landmarks re-encoded by the
# drift-bench encoder), as a real trainer would with its own encoder.
#   NEGMINE_SERVER   where negmine listens (default 127.0.0.1:50051)
#   ROUNDS           rounds before exiting (default 0: forever)
set -eu
server="${NEGMINE_SERVER:-127.0.0.1:50051}"
rounds="${ROUNDS:-0}"
until negmine --server "$server" health >/dev/null 2>&1; do
  echo "demo-trainer: waiting for negmine at $server"
  sleep 2
done
step=0
while [ "$rounds" = 0 ] || [ "$step" -lt "$rounds" ]; do
  step=$((step + 1))
  negmine --server "$server" mine --collection default --random-queries 256 --seed "$step" \
    --k 64 --mode mixed --num-hard 16 --temperature 0.05 --sample-seed "$step" --json >/dev/null
  if [ $((step % 20)) = 0 ]; then
    negmine --server "$server" drift --collection default --model-step "$step" --simulate --seed 1
  fi
  sleep 0.2
done
echo "demo-trainer: $step rounds done"

#!/bin/bash
# Runs the CUDA parity tests and the CUDA bench from a bundle made by
# `make gpu-bundle` (the binaries, stripped, and the abseil libraries they
# link), on a machine with a GPU and the CUDA 13 runtime and cuBLAS but no
# negmine build dependencies. Results go to $OUT (default: ./gpu-results).
#   bash .gpu/gpu_run.sh [bench flags...]
set -u
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$PWD/gpu-results}"
mkdir -p "$out"
cublas="$(dirname "$(find / -name 'libcublasLt.so.13' -not -path '/proc/*' 2>/dev/null | head -1)")"
export LD_LIBRARY_PATH="$here/lib:$cublas:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$out/gpu.txt"
"$here/cuda_parity_test" > "$out/parity.txt" 2>&1
echo "parity tests: exit $? ($(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$out/parity.txt" | tr '\n' ' '))"
"$here/negmine-cuda-bench" --out="$out/bench.md" "$@"

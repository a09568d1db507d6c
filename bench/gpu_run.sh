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
# One suite at a time, so that a crash in one (a kernel fault ends the
# process) does not hide the others' results.
: > "$out/parity.txt"
# Distinct tests with a status line (each appears inline and in the summary).
count() {
  grep -E "^\[  *$1 *\] [A-Za-z]" "$2" | grep -v 'listed below' | sed -E 's/ \([0-9]+ ms\)$//' |
    sort -u | wc -l
}
for suite in $("$here/cuda_parity_test" --gtest_list_tests | grep -E '^[^ ].*\.$' | sed 's/\.$//'); do
  log="$(mktemp)"
  "$here/cuda_parity_test" --gtest_filter="$suite.*" > "$log" 2>&1
  rc=$?
  cat "$log" >> "$out/parity.txt"
  echo "$suite: exit $rc; $(count OK "$log") ok, $(count FAILED "$log") failed, $(count SKIPPED "$log") skipped"
  rm -f "$log"
done
# The bench as measured before, then the fused scan's rows alone (they are
# new: if they fault, the first run's figures stand).
"$here/negmine-cuda-bench" --fused_scan=0 --out="$out/bench.md" "$@"
echo "bench: exit $?"
"$here/negmine-cuda-bench" --tree_n=0 --out="$out/bench_fused.md" "$@"
echo "fused bench: exit $?"

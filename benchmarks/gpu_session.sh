#!/usr/bin/env bash
# One GPU session: correctness of the compiled kernels, a small tile-size sweep, the benchmarks.
# Run from the repository root on a GPU machine; logs go to $OUT (or ./gpu_logs).
#   bash benchmarks/gpu_session.sh [check] [sweep] [bench]     (default: all three)
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
LOG=${OUT:-gpu_logs}
mkdir -p "$LOG"
steps=${*:-check sweep bench}
quiet() { grep -v -E "slow_operation_alarm|Constant folding|This isn't|If you'd|^ *%|^$"; }

"$PY" -c "import jax; d = jax.devices()[0]; print('jax', jax.__version__, d.device_kind)"
if [[ $steps == *check* ]]; then
  timeout 200 "$PY" benchmarks/gpu_check.py --sections block token indexer > "$LOG/check.log" 2>&1
  timeout 200 "$PY" benchmarks/gpu_check.py --sections mgpu >> "$LOG/check.log" 2>&1
  timeout 140 "$PY" benchmarks/gpu_check.py --sections modules >> "$LOG/check.log" 2>&1
  grep -E "^(PASS|FAIL)" "$LOG/check.log" | cut -c1-220
fi
if [[ $steps == *sweep* ]]; then
  for cfg in "64 4 2" "128 4 2" "128 8 2" "64 4 3" "128 8 3" "64 8 2"; do
    set -- $cfg
    timeout 60 "$PY" benchmarks/block_sparse_gpu.py --lengths 32768 --patterns local \
      --passes fwd --block-q $1 --num-warps $2 --num-stages $3 --reps 3 2>&1 | quiet \
      | grep -E "^kernel|^local" | tr '\n' ' '; echo
  done | tee "$LOG/sweep.log"
  for cfg in "64 2 4 2" "128 2 8 2" "64 4 4 2" "128 4 8 2" "64 2 4 3"; do
    set -- $cfg
    timeout 60 "$PY" benchmarks/token_sparse_gpu.py --lengths 32768 --patterns clustered \
      --passes fwd --no-indexer --block-q $1 --words-per-block $2 --num-warps $3 \
      --num-stages $4 --reps 3 2>&1 | quiet | grep -E "^clustered" | sed "s/^/bq=$1 wpb=$2 w=$3 s=$4 /"
  done | tee -a "$LOG/sweep.log"
fi
if [[ $steps == *bench* ]]; then
  timeout 150 "$PY" benchmarks/block_sparse_gpu.py --lengths 8192 32768 2>&1 | quiet \
    | tee "$LOG/block_bench.log"
  timeout 150 "$PY" benchmarks/block_sparse_gpu.py --lengths 8192 32768 --kernel mosaic_gpu \
    2>&1 | quiet | tee -a "$LOG/block_bench.log"
  timeout 200 "$PY" benchmarks/token_sparse_gpu.py --lengths 32768 2>&1 | quiet \
    | tee "$LOG/token_bench.log"
  timeout 150 "$PY" benchmarks/token_sparse_gpu.py --lengths 32768 --kernel mosaic_gpu \
    --no-indexer 2>&1 | quiet | tee -a "$LOG/token_bench.log"
fi

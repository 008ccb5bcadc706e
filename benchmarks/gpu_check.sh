#!/usr/bin/env bash
# GPU check of trxl_rl on a CUDA machine, in under 8 minutes (every step has a time limit;
# on an H200 with 16 cores the steps took 34 + 29 + 30 + 112 + 118 s):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # from anywhere; OUT_DIR: benchmarks/out/gpu_check
#
# 1. the CUDA tests (pytest -k cuda, the torchrun ones included);
# 2. a 2-rank run of the trainer: with two GPUs or more, one rank per GPU (nccl); with one GPU,
#    two CPU ranks (gloo) beside it, then one GPU rank of the trainer;
# 3. data-parallel scaling: 1, 2, 4, 8 CPU ranks of 1 thread, 1 process of all threads, and
#    1 GPU rank (2 with two GPUs) (benchmarks.scaling --quick);
# 4. the main benchmark rows on the GPU (benchmarks.run --device cuda --quick --only ...; the
#    whole set, `python -m benchmarks.run --device cuda --quick`, takes ~5 minutes more).
#
# Logs and JSON go to OUT_DIR; the last lines of each log are printed. Exit code 0 when every
# step passed, 1 when one failed or ran out of time, 2 without a CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/out/gpu_check}
PY=${PYTHON:-python}
mkdir -p "$OUT"
failed=()

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, report
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (at most ${limit} s): $*"
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "   exit $rc after $((SECONDS - start)) s (log: $OUT/$name.log)"
    tail -n "${TAIL:-20}" "$OUT/$name.log" | sed 's/^/   | /'
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

if ! GPUS=$($PY -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.device_count())" 2>/dev/null); then
    echo "no CUDA device visible to torch: nothing to check" >&2
    exit 2
fi
$PY -c "import torch; print('torch', torch.__version__, '|', torch.cuda.device_count(), 'x', torch.cuda.get_device_name(0), '|', __import__('os').cpu_count(), 'CPU cores')"
export PYTHONWARNINGS=ignore

step cuda_tests 60 $PY -m pytest -q -x -k cuda -m "not slow" tests/

SMALL=(--env MiniGrid-Memory --total-steps 32768 --eval_episodes 8 --progress false
       --checkpoint_every 4 --log_dir "$OUT/runs")
if [ "$GPUS" -ge 2 ]; then
    step nccl_2_ranks 75 $PY -m torch.distributed.run --standalone --nproc-per-node 2 \
        -m trxl_rl.train "${SMALL[@]}" --device cuda --run-name nccl_2_ranks
    SCALING_GPU=(1x1:cuda 2x1:cuda)
else
    OMP_NUM_THREADS=1 step gloo_2_ranks_beside_the_gpu 50 $PY -m torch.distributed.run \
        --standalone --nproc-per-node 2 -m trxl_rl.train "${SMALL[@]}" --device cpu \
        --run-name gloo_2_ranks
    step one_gpu_rank 45 $PY -m trxl_rl.train "${SMALL[@]}" --device cuda --run-name one_gpu
    SCALING_GPU=(1x1:cuda)
fi

step scaling 170 $PY -m benchmarks.scaling --quick --json "$OUT/scaling.json" \
    --rows env "1x$($PY -c 'import os; print(os.cpu_count())')" 1x1 2x1 4x1 8x1 "${SCALING_GPU[@]}"

TAIL=14 step benchmark_rows 150 $PY -m benchmarks.run --device cuda --quick \
    --json "$OUT/run_cuda.json" --only env a a2x128 gru lstm b b-nodedupe c

if [ "${#failed[@]}" -eq 0 ]; then
    echo "gpu_check: every step passed in $SECONDS s"
else
    echo "gpu_check: FAILED: ${failed[*]} (after $SECONDS s)"
    exit 1
fi

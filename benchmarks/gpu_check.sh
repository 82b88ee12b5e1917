#!/usr/bin/env bash
# The prepared GPU check (issue 6): on a machine with a CUDA GPU and CuPy, run the GPU tests and the
# GPU benchmark matrix, print a short table, and copy logs and results into $OUT when it is set.
# Installs nothing from the network: lowrank goes in editable with --no-index --no-deps.
#   bash benchmarks/gpu_check.sh            # tests + full matrix (about 5 minutes on an H200)
#   QUICK=1 bash benchmarks/gpu_check.sh    # tests + the quick matrix
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
LOGS=${OUT:-/tmp/lowrank-gpu-check}
mkdir -p "$LOGS"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader || true
if ! $PY -c "import lowrank.kernels" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$LOGS/install.log" 2>&1 \
    || { echo "editable install failed:"; tail -20 "$LOGS/install.log"; exit 1; }
fi
$PY -c "import cupy, lowrank.kernels.cupy_gpu; assert cupy.is_available(), 'no CUDA device'; print('cupy', cupy.__version__)" \
  || exit 1

echo "== GPU tests"
timeout 300 $PY -m pytest tests/kernels/test_cupy_kernels.py tests/kernels/test_cuda_compile.py -q -rs -p no:cacheprovider \
  2>&1 | tee "$LOGS/tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}

echo "== GPU benchmark matrix"
timeout 330 $PY -m benchmarks.gpu ${QUICK:+--quick} --out "$LOGS" 2>&1 | tee "$LOGS/bench.log" | tail -60
bench_rc=${PIPESTATUS[0]}
mkdir -p benchmarks/results && cp "$LOGS"/gpu_*.json benchmarks/results/ 2>/dev/null

echo "== summary: tests rc=$tests_rc, benchmark rc=$bench_rc; logs and JSON in $LOGS"
exit $(( tests_rc != 0 || bench_rc != 0 ))

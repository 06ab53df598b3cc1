#!/usr/bin/env bash
# One device call: GPU tests, the sweep benchmark (fp32, bf16), the kernel grid. Everything lands in $OUT.
# Run from the repo root on the GPU machine. Optional inputs: .carry/spec (the spec file), .carry/data (WikiText,
# GPT-2 tokenizer). Stage time limits keep the whole call inside the device tool's 10-minute command limit.
set -u
OUT=${OUT:-/tmp/nqpq_gpu}
mkdir -p "$OUT" /tmp/site
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site" OMP_NUM_THREADS=8
[ -f .carry/spec/exp_q03_residual.py ] && export NQPQ_SPEC="$PWD/.carry/spec/exp_q03_residual.py"
[ -d .carry/data ] && export NQPQ_SHARED_DATA="$PWD/.carry/data"
ln -sfn "$PWD/kernels" /tmp/site/nqpq_kernels   # the import name pip install would give kernels/
LOG="$OUT/run.log"
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
stage() { local limit=$1; shift; echo "=== $* (limit ${limit}s) $(date -u +%T)"; timeout "$limit" "$@"; echo "=== rc=$? $(date -u +%T)"; }
{
  stage ${T_TESTS:-150} python3 -m pytest -q -p no:cacheprovider --durations=12 -m "${TEST_MARKERS:-gpu}" tests/test_kernel.py tests/test_gpu_integration.py
  stage ${T_SWEEP:-75} python3 -m benchmarks.sweep --device cuda --dtype float32 --out "$OUT/sweep_cuda_fp32.csv"
  stage ${T_SWEEP:-75} python3 -m benchmarks.sweep --device cuda --dtype bfloat16 --out "$OUT/sweep_cuda_bf16.csv"
  stage ${T_TUNE:-80} python3 -m benchmarks.tune --dtype bf16 --T 256 1024
  stage ${T_GRID:-230} python3 -m benchmarks.attention ${GRID_ARGS:-} --out "$OUT/attention_cuda.csv"
} 2>&1 | tee "$LOG"

#!/usr/bin/env bash
# One device call: GPU tests, the sweep benchmark (fp32, bf16), launch-config tuning, the kernel grid and the
# model-geometry grid. Everything lands in $OUT.
# Run from the repo root on the GPU machine. Optional inputs: .carry/spec (the spec file), .carry/data (WikiText,
# GPT-2 tokenizer). Stage time limits keep the whole call inside the device tool's 10-minute command limit.
set -u
OUT=${OUT:-/tmp/nqpq_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" OMP_NUM_THREADS=8
[ -f .carry/spec/exp_q03_residual.py ] && export NQPQ_SPEC="$PWD/.carry/spec/exp_q03_residual.py"
[ -d .carry/data ] && export NQPQ_SHARED_DATA="$PWD/.carry/data"
LOG="$OUT/run.log"
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
stage() { local limit=$1; shift; echo "=== $* (limit ${limit}s) $(date -u +%T)"; timeout "$limit" "$@"; echo "=== rc=$? $(date -u +%T)"; }
# Stage limits sum to ~590 s (the kernel grid gave 45 s to the device-map stage). The GPU tests now also cover GQA, windows, soft caps and D 80/96/256 (more compiles).
{
  stage ${T_TESTS:-200} python3 -m pytest -q -p no:cacheprovider --durations=12 -m "${TEST_MARKERS:-gpu}" tests/test_kernel.py tests/test_gpu_integration.py
  # Device maps: a cuda:0/cpu map equals the single-device run; --device cuda:0 with the current device moved (issue 21).
  stage ${T_DEVMAP:-45} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_device_map.py
  stage ${T_SWEEP:-45} python3 -m benchmarks.sweep --device cuda --dtype float32 --out "$OUT/sweep_cuda_fp32.csv"
  stage ${T_SWEEP:-45} python3 -m benchmarks.sweep --device cuda --dtype bfloat16 --out "$OUT/sweep_cuda_bf16.csv"
  stage ${T_TUNE:-60} python3 -m benchmarks.tune --dtype bf16 --T 256 1024
  stage ${T_GRID:-75} python3 -m benchmarks.attention ${GRID_ARGS:---dtypes bf16 fp32 --B 32 8} --out "$OUT/attention_cuda.csv"
  # Llama-3-8B (GQA, D 128, T 1024/4096), Mistral's window (w 4096 vs none at T 8192), Gemma 2 (D 256, softcap).
  stage ${T_MODELS:-100} python3 -m benchmarks.attention --no-grid --geometries llama3-8b mistral-7b gemma2-2b --dtypes bf16 --out "$OUT/attention_models_cuda.csv"
  # fp32 logits (lm_losses) vs the 16-bit head vs a 16-bit GEMM with fp32 output, at Llama-3-8B's head.
  stage ${T_LOGITS:-20} python3 -m benchmarks.logits --device cuda --vocab 128256 --hidden 4096 --out "$OUT/logits_cuda.csv"
} 2>&1 | tee "$LOG"

#!/usr/bin/env bash
# One device call (the device tool's 10-minute command limit): correctness first, then the attention benchmark and
# the block-size tuner at the sweep's geometries: GPT-2 small (D 64, the sweep's 8 x 256 tokens and T 1024),
# Llama-3-8B (D 128, Hq 32 / Hkv 8) and Gemma 2 (D 256, Hq 8 / Hkv 4, soft cap, window). Everything lands in $OUT.
# Run from the repo root on the GPU machine:  OUT=/some/dir bash benchmarks/gpu_session.sh
# Stage limits (seconds, overridable: T_TESTS=...) sum to 570 s; a stage cut by its limit keeps what it printed
# (the tuner prints each config as it is measured).
# A second call, the KV cache (issue 34):  OUT=/some/dir bash benchmarks/gpu_session.sh decode
# runs the decode kernel's and the offset prefill's tests compiled (tests/test_decode.py, test_kv_cache.py), then
# benchmarks.decode: decode steps against SDPA, flash decode and the prefill kernel at Tk 1k-32k (limits sum to 560 s).
set -u
OUT=${OUT:-/tmp/nqpq_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" OMP_NUM_THREADS=8
unset TRITON_INTERPRET
LOG="$OUT/run.log"
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
stage() { local limit=$1; shift; echo "=== $* (limit ${limit}s) $(date -u +%T)"; timeout "$limit" "$@"; echo "=== rc=$? $(date -u +%T)"; }
if [ "${1:-}" = decode ]; then
  {
    # 1. Correctness: the split-KV decode kernel and the prefill kernel with its query offset, compiled, against
    #    float64 (every mode, GQA/MQA, MLA widths, windows, chunks, sinks, ties across splits).
    stage ${T_DECODE_TESTS:-220} python3 -m pytest -q -x -p no:cacheprovider --durations=8 tests/test_decode.py tests/test_kv_cache.py
    # 2. Time: Llama-3-8B heads (GQA 32/8, D 128) at B 1 and 8, one query and a 4-query speculative chunk; GPT-2
    #    small and Gemma 2 (D 256, soft cap) at B 8, one query.
    stage ${T_DECODE_LLAMA:-220} python3 -m benchmarks.decode --geometry llama3-8b --B 1 8 --Tq 1 4 --Tk 1024 4096 16384 32768 --out "$OUT/decode_cuda_llama3.csv"
    stage ${T_DECODE_OTHER:-120} python3 -m benchmarks.decode --geometry gpt2 gemma2 --B 8 --Tq 1 --Tk 1024 8192 32768 --out "$OUT/decode_cuda_other.csv"
  } 2>&1 | tee "$LOG"
  exit 0
fi
{
  # 1. Correctness: the compiled kernel against the reference (all modes, dtypes, GQA, windows, soft caps, padded
  #    D, sinks, NaN rows), then the model integration on the GPU.
  stage ${T_TESTS:-200} python3 -m pytest -q -x -p no:cacheprovider --durations=8 -m gpu tests/test_kernel.py tests/test_gpu_integration.py
  # 2. The attention benchmark: GPT-2 small heads at the sweep's B 8 (T 256, 1024) and the model geometries.
  stage ${T_ATTN:-150} python3 -m benchmarks.attention --dtypes bf16 --B 8 --T 256 1024 --H 12 --D 64 --geometries llama3-8b gemma2-2b --out "$OUT/attention_cuda.csv"
  # 3. Low rank through V·P_r (issue 35: low-rank <= 0.7x full on a card) against full and SDPA at D 64 and 128,
  #    after its own tests on the card (every variant against float64).
  stage ${T_LOWRANK:-60} bash -c 'python3 -m pytest -q -x -p no:cacheprovider tests/test_lowrank_vp.py &&
    for D in 64 128; do python3 -m benchmarks.attention --dtypes bf16 --B 8 --H 12 --Hkv 4 --D $D --T 1024 4096 \
      --no-models --providers fused_full fused_lowrank fused_lowrank_gram sdpa_flash --out "$OUT/lowrank_vp_D$D.csv"; done'
  # 4. The tuner at the same geometries (BLOCK_M >= 64: wgmma's M).
  stage ${T_TUNE64:-60} python3 -m benchmarks.tune --dtype bf16 --B 8 --H 12 --D 64 --T 256 1024
  stage ${T_TUNE128:-55} python3 -m benchmarks.tune --dtype bf16 --B 4 --H 32 --Hkv 8 --D 128 --T 1024
  stage ${T_TUNE256:-45} python3 -m benchmarks.tune --dtype bf16 --B 4 --H 8 --Hkv 4 --D 256 --T 1024 --block-m 64
} 2>&1 | tee "$LOG"

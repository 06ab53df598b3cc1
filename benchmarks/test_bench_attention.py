"""pytest-benchmark suite over a small grid: ``pytest benchmarks/`` (``--benchmark-only`` to skip nothing).

CPU reference cases always run; CUDA cases (fused kernel, SDPA) skip without a GPU.
Compare runs with ``--benchmark-save=NAME`` / ``--benchmark-compare``.
"""

import pytest
import torch

from benchmarks.attention import make_inputs, provider_fn

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@pytest.mark.parametrize("T", [64, 128])
@pytest.mark.parametrize("provider", ["reference", "reference_sink1", "unfused", "sdpa_math", "streamed_full",
                                      "streamed_lowrank"])
def test_cpu(benchmark, provider, T):
    q, k, v, basis = make_inputs(2, 12, T, 64, torch.float32, "cpu", seed=0)
    fn = provider_fn(provider, 8)
    benchmark.group = f"cpu fp32 B=2 H=12 T={T} D=64"
    benchmark(fn, q, k, v, basis)


@cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("T", [256, 1024])
@pytest.mark.parametrize(
    "provider,d_r",
    [("fused_top1", 0), ("fused_full", 0), ("fused_lowrank", 8), ("fused_lowrank", 32),
     ("fused_lowrank_gram", 32), ("reference", 32), ("unfused", 32), ("sdpa_flash", 0), ("sdpa_math", 0),
     ("fused_top1_sink1", 0), ("fused_lowrank_sink1", 8), ("fused_lowrank_sink1", 32),
     ("fused_lowrank_gram_acc1", 32), ("reference_sink1", 32)],
)
def test_cuda(benchmark, provider, d_r, T, dtype):
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    if provider == "sdpa_flash" and torch_dtype == torch.float32:
        pytest.skip("flash SDPA has no fp32 kernel")
    q, k, v, basis = make_inputs(8, 12, T, 64, torch_dtype, "cuda", seed=0)
    fn = provider_fn(provider, d_r)
    fn(q, k, v, basis)  # compile outside the timing

    def call():
        fn(q, k, v, basis)
        _sync()

    benchmark.group = f"cuda {dtype} B=8 H=12 T={T} D=64"
    benchmark(call)

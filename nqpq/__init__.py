"""nqpq: fused kernels and research tooling for crystallized attention (EXP-Q03).

Importing nqpq needs neither CUDA nor Triton's driver; the Triton kernel is loaded
on first use (``backend="triton"``, or ``"auto"`` on CUDA tensors).
"""

from nqpq_kernels.contract import ResidualAttentionResult
from nqpq_kernels.dispatch import residual_attention
from nqpq_kernels.reference import residual_attention_reference

from .errors import NqpqError
from .experiments.calibration import GramAccumulator, ResidualBasis, basis_from_grams, calibrate
from .experiments.config import SweepConfig
from .experiments.sweep import run_sweep
from .model.crystallize import crystallize, crystallize_layers, uncrystallize
from .model.losses import block_losses, make_blocks, perplexity
from .model.replay import PrefixRunner
from .version import __version__ as __version__

__all__ = [
    "GramAccumulator", "NqpqError", "PrefixRunner", "ResidualAttentionResult", "ResidualBasis", "SweepConfig",
    "basis_from_grams",
    "block_losses", "calibrate", "crystallize", "crystallize_layers", "make_blocks", "perplexity",
    "residual_attention", "residual_attention_reference", "run_sweep", "uncrystallize",
]

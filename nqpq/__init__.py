"""nqpq: fused kernels and research tooling for crystallized attention (EXP-Q03).

Importing nqpq needs neither CUDA nor Triton's driver; the Triton kernel is loaded
on first use (``backend="triton"``, or ``"auto"`` on CUDA tensors).
"""

from .calibration import GramAccumulator, ResidualBasis, basis_from_grams, calibrate
from .config import SweepConfig
from .errors import NqpqError
from .evaluate import block_losses, make_blocks, perplexity
from .integration import crystallize, crystallize_layers, uncrystallize
from .ops import residual_attention
from .prefix import PrefixRunner
from .reference import residual_attention_reference
from .sweep import run_sweep
from .validate import ResidualAttentionResult

__all__ = [
    "GramAccumulator", "NqpqError", "PrefixRunner", "ResidualAttentionResult", "ResidualBasis", "SweepConfig",
    "basis_from_grams",
    "block_losses", "calibrate", "crystallize", "crystallize_layers", "make_blocks", "perplexity",
    "residual_attention", "residual_attention_reference", "run_sweep", "uncrystallize",
]
__version__ = "0.1.0"

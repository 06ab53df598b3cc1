"""What results.json records of where its numbers come from, beside them: the model's geometry (family, heads, head
widths, and the window, chunks and softcaps in force on the chosen layers) and the software versions and device."""

from __future__ import annotations

import platform
import sys
from collections.abc import Sequence

import torch


def geometry_config(parts, layers: Sequence[int]) -> dict:
    """What results.json says about the model: family, heads, head dim, and the window/softcaps in force."""
    def per_layer(field):  # one number when the chosen layers agree, else one per layer
        values = {str(li): getattr(parts.geometry[li], field) for li in layers}
        return next(iter(values.values())) if len(set(values.values())) == 1 else values

    return {"family": parts.family, "wrapper": parts.wrapper, "n_layers": parts.n_layers,
            "attn_layers": list(parts.attn_layers), "n_heads": per_layer("n_heads"),
            "n_kv_heads": per_layer("n_kv_heads"), "head_dim": per_layer("v_dim"), "qk_dim": per_layer("qk_dim"),
            "v_dim": per_layer("v_dim"), "learned_sink": per_layer("learned_sink"),
            "sliding_window": {str(li): parts.geometry[li].sliding_window for li in layers},
            "attention_chunk": {str(li): parts.geometry[li].attention_chunk for li in layers},
            "attn_softcap": parts.attn_softcap, "final_logit_softcap": parts.final_logit_softcap}


def versions(device: torch.device) -> dict:
    """results.json's software versions and the device's name."""
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version,
            "python": sys.version.split()[0], "device_name": name}

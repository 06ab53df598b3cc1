"""Input checks and the result type shared by every backend of residual attention.

One place decides what a valid call is, so the reference path and the Triton
kernel reject the same inputs with the same messages.  Messages name types,
shapes and values, never the repr of a tensor (or of an object holding tensors).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, NamedTuple

import torch
from torch import Tensor

MODES = ("top1", "full", "lowrank")
OUT_LAYOUTS = ("bhtd", "bthd")  # out [B, Hq, T, D] or [B, T, Hq, D]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Head dims the fused kernel runs: every multiple of 16 up to 256. Non-powers of two (80, 96, ...)
# are padded to the next power of two inside the kernel, with masked loads and stores.
TRITON_HEAD_DIMS = tuple(range(16, 257, 16))


class ResidualAttentionResult(NamedTuple):
    """What every residual-attention implementation returns; a field is None unless it was asked for.

    - ``out``: the attention output in the input dtype, ``[B, Hq, T, Dv]`` (or ``[B, T, Hq, Dv]`` with
      ``out_layout="bthd"``); Dv is v's width (= D unless q/k and v have different widths, as in MLA).
    - ``argmax``: int64 ``[B, Hq, T]``, i* = the first index of the maximum of the row's masked, scaled
      (soft-capped) scores; −1 on a non-finite row. With ``sink_tokens=n > 0`` it is i*ᴿ, the maximum over
      the visible keys j >= n only; on a row that has no finite score among them (t < n: every visible key
      is a sink key) it falls back to the first maximum over all visible keys (a sink key, so < n).
    - ``gram``: float64 ``[Hq, Dv, Dv]`` = Σ_{b,t} ε εᵀ with ε = ctx − ground (= p @ V − V[i*] for n = 0 and
      no learned sink).
    - ``top1_prob``: float32 ``[B, Hq, T]`` = p[argmax], the full softmax's probability of the returned
      index: max_j p[j] for n = 0, p[i*ᴿ] for n > 0 (so p[i*ᴿ] / (1 − sink_mass) is the winner's share of
      the non-sink mass); NaN on a non-finite row.
    - ``sink_mass``: float32 ``[B, Hq, T]`` = Σ_{j<n visible} p[j] + p_sink (the learned sink's probability,
      0 without one): all the mass kept apart from the winner; 0 for n = 0 without a learned sink, exactly 1
      on a row whose non-sink keys have no finite score (t < n); NaN on a non-finite row. A field added after
      the others: code that unpacks four fields must index them by name instead.
    """

    out: Tensor
    argmax: Tensor | None
    gram: Tensor | None
    top1_prob: Tensor | None
    sink_mass: Tensor | None = None


class ResolvedArgs(NamedTuple):
    """The validated, defaulted arguments of a residual-attention call."""

    d_r: int
    scale: float
    sliding_window: int | None
    softcap: float | None
    group: int  # query heads per kv head, Hq // Hkv
    sink_tokens: int = 0  # keys j < sink_tokens form the sink S, kept exactly in the ground state
    # The logits of a zero-value key (gpt-oss's one per head, Inkling 2's one per row), as a [B, Hq, T] view (one
    # per head: strides (0, 1, 0)); None: no learned sink.
    learned_sink: Tensor | None = None
    value_dim: int = 0  # Dv, v's width (the width of out, ctx, V[i*], ε, the basis rows and the Gram)
    attention_chunk: int | None = None  # C: query i sees keys j <= i with j // C == i // C (Llama 4's chunks)
    # An explicit mask (SDPA's attn_mask: bool, True = the key takes part, or float, added to the scores),
    # expanded to [B, Hq, Tq, Tk] (a view: broadcast dims have stride 0); None: the implicit causal mask.
    attn_mask: Tensor | None = None
    # Per-head crystallization: bool [Hq] on q's device, True = the head outputs its mode's result, False = plain
    # attention (ctx); None: every head crystallized (also what an all-True mask, or mode "full", resolves to).
    crystal_heads: Tensor | None = None


def _describe(x: Any) -> str:
    """A short description of an argument for error messages: type and shape, never a repr."""
    if isinstance(x, Tensor):
        return f"Tensor{tuple(x.shape)} {x.dtype}"
    return type(x).__name__


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise a ValueError unless ``value`` is one of the strings ``choices``, naming what was passed (the repr
    of a string, the type and shape of anything else: never a tensor's repr)."""
    if isinstance(value, str) and value in choices:
        return
    got = repr(value) if isinstance(value, str) else _describe(value)
    raise ValueError(f"{name} must be one of {choices}, got {got}")


def check_tensor(name: str, t: Any) -> None:
    """Raise a TypeError naming ``name`` unless ``t`` is a torch.Tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _as_int(name: str, x: Any) -> int:
    """Python or numpy/torch integral scalars as int; bools and everything else refused."""
    if isinstance(x, bool) or (isinstance(x, Tensor) and x.dtype == torch.bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {_describe(x)}") from None


def check_residual_attention_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mode: str,
    basis: Tensor | None,
    d_r: int | None,
    scale: float | None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sink_tokens: int = 0,
    learned_sink: Tensor | None = None,
    attention_chunk: int | None = None,
    attn_mask: Tensor | None = None,
    crystal_heads: Tensor | None = None,
) -> ResolvedArgs:
    """Validate a residual-attention call; return the resolved arguments.

    q ``[B, Hq, Tq, Dqk]``, k ``[B, Hkv, Tk, Dqk]`` and v ``[B, Hkv, Tk, Dv]`` with ``Hq % Hkv == 0`` and, without
    an ``attn_mask``, Tq <= Tk: query i sits at absolute position Tk − Tq + i (the last Tq positions, bottom-right
    aligned causal as FlashAttention >= 2.1 defines it: a KV cache), and windows, chunks and the sink keys read
    absolute positions (below, i is a query's position and T = Tk). Dv may
    differ from Dqk (multi-head latent attention: the scores live in the q/k width, ctx, V[i*], ε, the basis
    and the Gram in the value width). ``d_r`` resolves to 0 for ``top1`` and ``Dv`` for ``full`` (neither
    reads it) and must be given for ``lowrank`` (0..Dv, basis ``[Hq, Dv, R]``); ``scale`` defaults to
    ``Dqk**-0.5``; ``sliding_window`` is an int >= 1 (query i sees keys i - w < j <= i); ``softcap`` a finite
    float > 0; ``sink_tokens`` an int >= 0 (bools and floats refused by type; any value, also one >= T, is
    valid: n >= T makes every row's ground state its ctx); ``learned_sink`` None or a floating-point tensor
    ``[Hq]`` (one logit per query head, gpt-oss) or ``[B, Hq, Tq]`` (one per query row, Inkling 2's
    ``sink_proj``) on q's device (a NaN or +inf logit makes its rows non-finite, -inf is a sink of no weight);
    ``attention_chunk`` None or an int C >= 1 (query i sees keys j <= i with j // C == i // C; not together with
    ``sliding_window``; C >= T is plain causal and resolves to None).

    ``attn_mask`` None (the implicit causal mask above) or, as torch's SDPA takes it, a bool tensor (True: the
    key takes part) or a floating-point one added to the scaled (capped) scores, broadcastable to
    ``[B, Hq, Tq, Tk]`` (each dim its size or 1) on q's device. With a mask, the mask alone defines which keys a
    row sees (no causal mask, window or chunk is applied: they must not be given), and k and v may hold
    any Tk keys (a model that appends keys of its own, DeepSeek V4's compressed entries); without one Tk >= Tq.
    Under a mask, a row that sees no key (every masked score -inf, none NaN: a pad query) is empty: a zero output,
    argmax -1, top1_prob and sink_mass 0, nothing in the Gram.

    ``crystal_heads`` None (every query head crystallized) or a bool tensor ``[Hq]`` on q's device: the heads marked
    False output plain attention (ctx) whatever the mode; every statistic (argmax, top-1 probability, sink mass, the
    Gram of ε) is still computed for every head. It resolves to None where it changes nothing (all True, or
    mode "full").
    """
    check_choice("mode", mode, MODES)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, T, D], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} dtype must be float32, float16 or bfloat16, got {t.dtype}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must have the same shape [B, Hkv, T] (their widths may differ), got {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    B, Hq, T, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[3]
    # Without a mask the Tq queries are the last Tq of the Tk positions (a KV cache: bottom-right aligned causal),
    # so there can be no more queries than keys; under an explicit mask any Tk.
    if (k.shape[0], k.shape[3]) != (B, D) or (attn_mask is None and Tk < T):
        raise ValueError(
            "q [B, Hq, Tq, D] and k [B, Hkv, Tk, D] must agree on B and D with Tq <= Tk (the queries are the last "
            f"Tq positions; v may have another width; Tk < Tq only under an attn_mask), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"the number of query heads must be a multiple of the number of kv heads, got Hq={Hq}, Hkv={Hkv} "
            f"(q {tuple(q.shape)}, k {tuple(k.shape)})"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if B == 0 or T == 0 or Tk == 0 or D == 0 or Dv == 0:
        raise ValueError(
            f"q, k, v must have B >= 1, T >= 1 and widths >= 1, got q {tuple(q.shape)}, v {tuple(v.shape)}"
        )

    # The basis, d_r and the Gram live in value space (Dv; = D unless the widths differ).
    if mode == "lowrank":
        if d_r is None:
            raise ValueError("mode='lowrank' needs d_r (0..D)")
        if basis is None:
            raise ValueError("mode='lowrank' needs basis [Hq, D, R] with R >= d_r")
    d_r = (0 if mode == "top1" else Dv) if d_r is None else _as_int("d_r", d_r)
    if not 0 <= d_r <= Dv:
        width = f"D={Dv}" if Dv == D else f"D={Dv}, v's width; q and k have {D}"
        raise ValueError(f"d_r must be in 0..D ({width}), got {d_r}")

    if basis is not None and mode == "lowrank":
        if not isinstance(basis, Tensor):
            raise TypeError(
                f"basis must be a torch.Tensor [Hq, D, R], got {type(basis).__name__}"
                + (" (pass its .basis[layer] tensor)" if hasattr(basis, "basis") else "")
            )
        if basis.dim() != 3:
            raise ValueError(f"basis must be a tensor [H, D, R], got shape {tuple(basis.shape)}")
        if basis.shape[0] != Hq or basis.shape[1] != Dv:
            raise ValueError(
                f"basis must be [H={Hq}, D={Dv}, R] (one basis per query head, in v's width), got "
                f"{tuple(basis.shape)}"
            )
        if basis.shape[2] < d_r:
            raise ValueError(f"basis has R={basis.shape[2]} columns, fewer than d_r={d_r}")
        if not basis.is_floating_point():
            raise TypeError(f"basis must be floating point, got {basis.dtype}")
        if basis.device != q.device:
            raise ValueError(f"basis is on {basis.device} but q is on {q.device}")

    if scale is None:
        scale = D**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real | Tensor):
        raise TypeError(f"scale must be a number, got {_describe(scale)}")
    scale = float(scale)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number, got {scale}")

    if sliding_window is not None:
        sliding_window = _as_int("sliding_window", sliding_window)
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 (query i sees keys i-w < j <= i), got {sliding_window}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
            raise TypeError(f"softcap must be a number, got {_describe(softcap)}")
        softcap = float(softcap)
        if not (softcap > 0 and math.isfinite(softcap)):
            raise ValueError(f"softcap must be a positive finite number, got {softcap}")
    sink_tokens = _as_int("sink_tokens", sink_tokens)
    if sink_tokens < 0:
        raise ValueError(f"sink_tokens must be >= 0 (keys j < sink_tokens are the sink), got {sink_tokens}")
    if learned_sink is not None:
        if not isinstance(learned_sink, Tensor):
            raise TypeError(
                f"learned_sink must be a torch.Tensor [Hq] / [B, Hq, T] or None, got {_describe(learned_sink)}")
        if not learned_sink.is_floating_point():
            raise TypeError(f"learned_sink must be floating point, got {learned_sink.dtype}")
        if tuple(learned_sink.shape) not in ((Hq,), (B, Hq, T)):
            raise ValueError(
                f"learned_sink must be [Hq={Hq}] (one logit per query head) or [B={B}, Hq={Hq}, T={T}] (one per "
                f"query row: Inkling 2's sink_proj), got {tuple(learned_sink.shape)}"
            )
        if learned_sink.device != q.device:
            raise ValueError(f"learned_sink is on {learned_sink.device} but q is on {q.device}")
        if learned_sink.dim() == 1:
            learned_sink = learned_sink.view(1, Hq, 1).expand(B, Hq, T)
    if attention_chunk is not None:
        attention_chunk = _as_int("attention_chunk", attention_chunk)
        if attention_chunk < 1:
            raise ValueError(
                f"attention_chunk must be >= 1 (query i sees keys j <= i with j // C == i // C), got {attention_chunk}")
        if sliding_window is not None:
            raise ValueError("attention_chunk and sliding_window cannot be combined (no model masks with both)")
        if attention_chunk >= Tk:  # one chunk holds every position: plain causal attention
            attention_chunk = None
    if attn_mask is not None:
        attn_mask = _check_attn_mask(attn_mask, (B, Hq, T, Tk), q.device)
        if sliding_window is not None or attention_chunk is not None:
            raise ValueError("attn_mask defines visibility alone: pass no sliding_window or attention_chunk with it "
                             "(fold them into the mask)")
    if crystal_heads is not None:
        crystal_heads = _check_crystal_heads(crystal_heads, Hq, q.device, mode)
    # Above Tk every key is a sink key: clamping keeps the value an int32 for the kernel, same math.
    return ResolvedArgs(d_r, scale, sliding_window, softcap, Hq // Hkv, min(sink_tokens, Tk), learned_sink, Dv,
                        attention_chunk, attn_mask, crystal_heads)


def _check_crystal_heads(heads: Any, Hq: int, device: torch.device, mode: str) -> Tensor | None:
    """``heads`` checked (a bool tensor ``[Hq]`` on ``device``); None where every head is crystallized anyway (all
    True) or the mode's output is plain attention for every head ("full"): the all-heads path, bit for bit."""
    if not isinstance(heads, Tensor) or heads.dtype != torch.bool:
        raise TypeError(f"crystal_heads must be a bool torch.Tensor [Hq] (True: the head is crystallized) or None, "
                        f"got {_describe(heads)}")
    if tuple(heads.shape) != (Hq,):
        raise ValueError(f"crystal_heads must be [Hq={Hq}] (one flag per query head), got {tuple(heads.shape)}")
    if heads.device != device:
        raise ValueError(f"crystal_heads is on {heads.device} but q is on {device}")
    if mode == "full" or bool(heads.all()):
        return None
    return heads


def _check_attn_mask(mask: Any, shape: tuple[int, int, int, int], device: torch.device) -> Tensor:
    """``mask`` checked (a bool or floating-point tensor on ``device``, each dim of ``shape`` [B, Hq, Tq, Tk] or 1,
    with 2-3 dims read as SDPA reads them: the leading ones are 1) and expanded to ``shape`` (a view)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {_describe(mask)}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True: the key takes part) or floating point, got {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"attn_mask is on {mask.device} but q is on {device}")
    if not 2 <= mask.dim() <= 4 or any(m not in (1, n) for m, n in zip(mask.shape[::-1], shape[::-1], strict=False)):
        raise ValueError(f"attn_mask must broadcast to [B, Hq, Tq, Tk] = {list(shape)} (each dim its size or 1), "
                         f"got shape {tuple(mask.shape)}")
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(shape)

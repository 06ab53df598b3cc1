"""The arguments a model hands its attention function, checked for crystallized attention
(``nqpq.model.crystallize``): the masks it accepts (causal, + a sliding window, + chunks, the module's own mask over
a plain causal one), the keyword arguments it takes or refuses by name, dense sparse-attention indices, learned
sinks, and the probabilities a crystallized layer reports for ``output_attentions``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nqpq_kernels.reference import _hidden_keys, visible_keys

from ..errors import UnsupportedModelError
from .layer_spec import LayerSpec

# Arguments the models hand their attention function that do not change what a causal self-attention over
# whole, unpadded sequences computes. Anything else with a value is refused by name (packed-sequence
# ``cu_seq_lens_*``, ...): never silently ignored.
_NEUTRAL_KWARGS = frozenset({
    "position_ids", "use_cache", "cache_position", "output_attentions", "output_hidden_states", "return_dict",
    "past_key_values", "cache", "layer_idx",
    "logits_to_keep",  # which positions the LM head keeps: passed down with the model's kwargs by some families
})
# s_aux / sinks: learned sink logits, [Hq] (gpt-oss's s_aux) or [B, Hq, T, 1] (Inkling 2's per-row sinks), the op's
# learned_sink; indices: DeepSeek V3.2's / GLM-DSA's selected keys
# per row [B, T, k], passed when the implementation name is not eager/sdpa (ours): dense when k >= T;
# position_bias: an additive score bias [B, Hq, T, Tk] (Inkling's relative logits), part of the op's attn_mask.
_HANDLED_KWARGS = frozenset({"sliding_window", "softcap", "is_causal", "s_aux", "sinks", "indices", "position_bias"})


def _check_mask(mask: Tensor | None, T: int, window: int | None, chunk: int | None = None) -> None:
    """Accept no mask, or exactly the causal (+ window, or + chunk) mask the layer computes; refuse anything else."""
    if mask is None:  # causality (and the window or the chunk, the layer's own) is ours to apply
        return
    if mask.dim() == 2:  # a flash-style [B, T] key mask: only "no padding" is accepted
        if mask.shape[-1] == T and bool(mask.bool().all()):
            return
    else:
        allowed = mask if mask.dtype == torch.bool else mask == 0
        want = visible_keys(T, window, mask.device, chunk)
        if allowed.dim() == 4 and allowed.shape[-2:] == (T, T) and torch.equal(allowed, want.expand_as(allowed)):
            return
    what = "causal" if window is None else f"causal with a sliding window of {window}"
    what += "" if chunk is None else f" in chunks of {chunk}"
    raise ValueError(
        f"crystallized attention supports plain {what} masking only: the model was given a padding or custom "
        f"attention mask ({tuple(mask.shape)} {mask.dtype}). Score unpadded blocks (no attention_mask with zeros)."
    )


def _plain_mask(mask: Tensor | None, T: int, window: int | None, chunk: int | None) -> bool:
    """Whether ``mask`` is no mask, or exactly the causal (+ window, or + chunk) mask of T keys the layer computes."""
    if mask is None:
        return True
    if mask.dim() == 2:  # a flash-style [B, T] key mask: only "no padding"
        return mask.shape[-1] == T and bool(mask.bool().all())
    allowed = mask if mask.dtype == torch.bool else mask == 0
    want = visible_keys(T, window, mask.device, chunk)
    return allowed.dim() == 4 and allowed.shape[-2:] == (T, T) and torch.equal(allowed, want.expand_as(allowed))


def _mask_window(mask: Tensor | None, T: int) -> int | None:
    """The sliding window w < T of a mask that is exactly causal + window w (the same for every batch row and head),
    else None. BLT's local layers get their window only this way: the model builds the mask from a sub-config
    the attention module never reads, and passes no ``sliding_window``."""
    if mask is None or mask.dim() != 4 or mask.shape[-2:] != (T, T) or T < 2:
        return None
    allowed = mask if mask.dtype == torch.bool else mask == 0
    w = int(allowed[0, 0, -1].sum())  # the last row sees its w most recent keys
    if w < 1 or w >= T or not torch.equal(allowed, visible_keys(T, w, mask.device).expand_as(allowed)):
        return None
    return w


def _score_mask(module: nn.Module, spec: LayerSpec, attention_mask: Tensor | None, position_bias: Tensor | None,
                T: int, Tk: int, window: int | None, chunk: int | None) -> Tensor | None:
    """The op's ``attn_mask`` for this call, or None for the plain causal path (the mask checked either way).

    None when the call is plain causal attention over its own T keys (the layer's window / chunk). Otherwise the
    mask the module built itself (not the one it was given: that one must be plain, so a user's padding mask is
    still refused) and/or its ``position_bias``, combined as transformers' eager attention combines them:
    scores + position_bias + mask (a bool mask: -inf where False; no mask: the layer's causal visibility)."""
    own = (attention_mask is not None and attention_mask is not spec.received_mask
           and not (Tk == T and _plain_mask(attention_mask, T, window, chunk)))
    received = spec.received_mask
    cached = received is not None and received.dim() == 4 and received.shape[-1] != T  # the model's mask: past keys
    if (not own and Tk != T) or cached:
        raise ValueError(
            f"crystallized attention scores whole sequences where {type(module).__name__} builds its own attention "
            f"mask or score bias; got {T} queries for {Tk} keys (a KV cache / generation is not supported there)"
        )
    if not own:
        _check_mask(attention_mask, T, window, chunk)  # the plain causal mask, or refused (padding, custom)
        if position_bias is None:
            return None
        attention_mask = ~_hidden_keys(T, window, position_bias.device, chunk)
    else:
        _check_mask(spec.received_mask, T, window, chunk)  # what the module made its mask from: no padding
        if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (T, Tk):
            raise ValueError(
                f"{type(module).__name__} builds an attention mask of shape {tuple(attention_mask.shape)}; "
                f"crystallized attention takes [B, H, T={T}, Tk={Tk}] masks only"
            )
    if position_bias is None:
        return attention_mask.detach()
    position_bias = position_bias.detach()
    if attention_mask.dtype == torch.bool:
        return position_bias.masked_fill(~attention_mask, float("-inf"))
    return position_bias + attention_mask.detach()


def _check_kwargs(module: nn.Module, kwargs: dict) -> None:
    # None or False: the feature is off (e.g. MoE models pass output_router_logits=False).
    unknown = sorted(k for k, v in kwargs.items()
                     if k not in _NEUTRAL_KWARGS | _HANDLED_KWARGS and v is not None and v is not False)
    if unknown:
        raise UnsupportedModelError(
            f"crystallized attention does not implement the attention argument(s) {unknown} that "
            f"{type(module).__name__} passes; they would change the result, so nqpq refuses this model"
        )
    if kwargs.get("is_causal", True) is not True or getattr(module, "is_causal", True) is not True:
        raise UnsupportedModelError(f"{type(module).__name__} asks for non-causal attention; nqpq is causal only")
    indices = kwargs.get("indices")
    if indices is not None and not (isinstance(indices, Tensor) and indices.dim() == 3):
        raise UnsupportedModelError(
            f"{type(module).__name__} passes indices of an unknown form ({type(indices).__name__}); nqpq refuses")


def _check_dense(module: nn.Module, indices: Tensor | None, T: int) -> None:
    """DeepSeek V3.2's indexer selects min(index_topk, T) keys per row: with all T selected the attention is the
    dense causal one nqpq computes; a sparse selection (T > index_topk) is refused by name."""
    if indices is not None and indices.shape[-1] < T:
        raise ValueError(
            f"{type(module).__name__} selects {indices.shape[-1]} of {T} keys per row (sparse attention: DSA's "
            f"index_topk < the sequence length); crystallized attention computes dense causal attention only: "
            f"score blocks of at most {indices.shape[-1]} tokens"
        )


def _attentions_requested(kwargs: dict) -> bool:
    """Whether this forward collects attention weights (``output_attentions=True``)."""
    if kwargs.get("output_attentions"):
        return True
    try:  # transformers ≥ 5 pops the flag and collects the weights with hooks
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - older transformers pass output_attentions down
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _probabilities(query: Tensor, key: Tensor, scale: float, window: int | None, softcap: float | None,
                   learned_sink: Tensor | None = None, chunk: int | None = None,
                   attn_mask: Tensor | None = None) -> Tensor:
    """The attention probabilities p [B, Hq, T, Tk] (fp32 softmax, query dtype) that crystallized layers report
    for ``output_attentions``; grouped kv heads are broadcast, not copied. A learned sink joins the softmax and
    is dropped from p (its probability is what the rows lack of 1), as the models report it. ``attn_mask`` (the
    op's) replaces the causal mask: added to the scores, or -inf where a bool mask is False."""
    B, Hq, T, D = query.shape
    Hkv, Tk = key.shape[1], key.shape[2]
    q = query.float().view(B, Hkv, Hq // Hkv, T, D)
    scores = (q @ key.float()[:, :, None].transpose(-1, -2)).view(B, Hq, T, Tk) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attn_mask is None:
        scores = scores.masked_fill(~visible_keys(T, window, query.device, chunk, Tk), float("-inf"))
    elif attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    else:
        scores = scores + attn_mask.float()
    if learned_sink is None:
        return scores.softmax(-1).to(query.dtype)
    sink = learned_sink.float()
    sink = (sink.view(1, Hq, 1, 1) if sink.dim() == 1 else sink.unsqueeze(-1)).expand(B, Hq, T, 1)
    return torch.cat([scores, sink], dim=-1).softmax(-1)[..., :Tk].to(query.dtype)


def _learned_sink(module: nn.Module, kwargs: dict, query: Tensor) -> Tensor | None:
    """The op's ``learned_sink`` from what the module passes: gpt-oss's ``s_aux`` [Hq] (one logit per head) or
    Inkling 2's ``sinks`` [B, Hq, T, 1] (one per query row, from its hidden state); None without either."""
    sink = kwargs.get("s_aux")
    if sink is None:
        sink = kwargs.get("sinks")
        if sink is not None:
            B, Hq, T = query.shape[:3]
            if not (isinstance(sink, Tensor) and tuple(sink.shape) in ((Hq,), (B, Hq, T, 1))):
                raise UnsupportedModelError(
                    f"{type(module).__name__} passes sinks of an unknown form "
                    f"({tuple(sink.shape) if isinstance(sink, Tensor) else type(sink).__name__}); nqpq refuses")
            sink = sink.squeeze(-1) if sink.dim() == 4 else sink
    return None if sink is None else sink.detach().to(query.device)

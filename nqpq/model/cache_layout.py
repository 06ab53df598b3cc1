"""Where a crystallized attention call's queries and keys sit: a KV cache, a static cache, padded batches.

A model hands its attention function q ``[B, Hq, Tq, D]``, the keys its cache holds ``[B, Hkv, Tk, D]`` and the mask
it built (an eager 4-D float mask, an SDPA bool mask, a flash-style ``[B, Tk]`` key mask, or None). The queries are
Tq consecutive slots of the key tensor: the last Tq with a dynamic cache (bottom-right aligned), the slots from the
cache's current length on with a static cache (the slots after them are padding the mask hides), and a sliding-window
cache past its window holds only the keys the window still sees, so slot j is not position j. ``call_layout`` reads
the mask (and ``position_ids`` when the model passes them) to find, per batch row b, the offset o_b with slot j
holding the token at position j + o_b of its own sequence (left padding: o_b < 0; a sliding cache that dropped keys:
o_b > 0), and which key slots are padding; checks that the mask is exactly causal (+ the layer's window or chunk, read
at those positions) over the non-padding keys; and says how to call the op:

- no padding and the queries the last Tq slots: no mask (the op's bottom-right causal rule, the Triton-capable path),
  ``sink_tokens`` shifted to slots (n − o; sink keys a sliding cache dropped were outside every row's window);
- otherwise an explicit bool mask: the model's visibility, with every pad query row (a query whose own key slot is
  padding) hidden whole, so that it gives a zero output and joins no statistic; with ``sink_tokens`` and offsets that
  differ between rows, one op call per batch row (the sink is each sequence's own first n tokens).

The statistics of a call then read positions: ``argmax_positions`` maps the op's key slots to positions, and
``first_position`` is each row's position of query row 0. Any mask that is not of this form is refused by name.
``run_op`` runs the op on a layout, ``first_key_mass`` reads each row's probability on its sequence's first token
(position 0: slot −o_b) from the op's result, ``feed`` hands its Gram and statistics (at positions) to the sinks, and
``call_backend`` picks the backend of a cached call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nqpq_kernels.contract import ResidualAttentionResult
from nqpq_kernels.dispatch import resolve_backend
from nqpq_kernels.key_mass import key_mass


@dataclass(frozen=True)
class CallLayout:
    """How to run the op for one attention call (see the module docstring)."""

    n_keys: int  # key slots handed to the op: those up to the last query's (a static cache's later slots dropped)
    mask: Tensor | None  # bool [B, 1, Tq, n_keys] for the op, or None: bottom-right causal with window / chunk
    window: int | None  # the op's sliding_window (None under a mask: it holds the window)
    chunk: int | None  # the op's attention_chunk (likewise)
    offsets: Tensor  # int64 [B]: key slot j of row b holds the token at position j + offsets[b]
    first_slot: int  # the slot of query row 0

    def sink_slots(self, sink_tokens: int) -> tuple[int, ...]:
        """The op's ``sink_tokens`` for the positions j < ``sink_tokens``: one value for the batch, or one per batch
        row (then the op runs once per row) where the rows' offsets differ (left padding)."""
        offsets = self.offsets.tolist()
        if not sink_tokens or all(o == offsets[0] for o in offsets):
            return (max(0, sink_tokens - offsets[0]),)
        if self.mask is None:  # pragma: no cover - differing offsets always take the mask path
            raise AssertionError("per-row sink slots without a mask")
        return tuple(max(0, sink_tokens - o) for o in offsets)

    def first_position(self) -> int | Tensor:
        """The position of query row 0: an int when every batch row agrees, else int64 [B]."""
        pos = self.offsets + self.first_slot
        return int(pos[0]) if bool((pos == pos[0]).all()) else pos

    def argmax_positions(self, argmax: Tensor) -> Tensor:
        """The op's argmax [B, Hq, Tq] (key slots; −1 on empty / non-finite rows) as positions of each sequence."""
        if not bool(self.offsets.any()):
            return argmax
        return torch.where(argmax >= 0, argmax + self.offsets.to(argmax.device).view(-1, 1, 1), argmax)


def _refuse(mask: Tensor, what: str, why: str) -> ValueError:
    return ValueError(
        f"crystallized attention supports plain {what} masking only, over the keys of a KV cache, a static cache or "
        f"a left- or right-padded batch: the model was given a custom attention mask ({tuple(mask.shape)} "
        f"{mask.dtype}: {why})"
    )


def _allowed(mask: Tensor, B: int, T: int, Tk: int, what: str) -> Tensor:
    """bool [B, T, Tk]: the keys each query may see, from a 4-D mask (bool: True sees; float: 0 sees) that is the
    same for every head."""
    if mask.dim() != 4 or mask.shape[-2:] != (T, Tk) or mask.shape[0] not in (1, B):
        raise _refuse(mask, what, f"expected [B, 1, {T}, {Tk}]")
    allowed = mask if mask.dtype == torch.bool else mask == 0
    if allowed.shape[1] != 1 and not torch.equal(allowed, allowed[:, :1].expand_as(allowed)):
        raise _refuse(mask, what, "it differs between heads")
    return allowed[:, 0].expand(B, T, Tk)


def call_layout(mask: Tensor | None, B: int, T: int, Tk: int, window: int | None, chunk: int | None,
                position_ids: Tensor | None) -> CallLayout:
    """The layout of an attention call of T queries over Tk key slots (module docstring); refuses any mask that is
    not causal (+ ``window`` / ``chunk``) over the non-padding keys of consecutive query slots."""
    what = "causal" if window is None else f"causal with a sliding window of {window}"
    what += "" if chunk is None else f" in chunks of {chunk}"
    if mask is not None and mask.dim() == 2:  # a flash-style [B, Tk] key mask: the queries are the last T slots
        if mask.shape != (B, Tk) and mask.shape != (1, Tk):
            raise _refuse(mask, what, f"expected a [B, {Tk}] key mask")
        valid = mask.bool().expand(B, Tk)
        first_slot, allowed = Tk - T, None
    elif mask is None:
        valid, first_slot, allowed = None, Tk - T, None
    else:
        allowed = _allowed(mask, B, T, Tk, what)
        seen = allowed.any(dim=1)  # [B, Tk]: keys some query sees
        sees = allowed.any(dim=2)  # [B, T]: queries that see a key
        if not bool(sees.any()):
            raise _refuse(mask, what, "no query sees any key")
        # A query sees its own key last (causal): its slot is the last key it sees, for every row whose own key is not
        # padding; rows are consecutive slots, so the first query's slot is the largest (last seen − row) of all.
        last_seen = Tk - 1 - allowed.flip(-1).to(torch.uint8).argmax(dim=-1)  # [B, T]
        rows = torch.arange(T, device=mask.device)
        first_slot = int(torch.where(sees, last_seen - rows, -1).max())
        valid = seen
    if first_slot < 0 or first_slot + T > Tk:
        if mask is None or mask.dim() == 2:  # pragma: no cover - the op's own check refuses Tq > Tk first
            raise ValueError(f"crystallized attention: {T} queries for {Tk} keys")
        raise _refuse(mask, what, f"its {T} queries cannot sit in {Tk} key slots from slot {first_slot}")
    n_keys = first_slot + T
    device = mask.device if mask is not None else (position_ids.device if position_ids is not None else "cpu")
    q_slots = torch.arange(first_slot, n_keys, device=device)
    if valid is not None:
        valid = valid[:, :n_keys]
        real_q = valid[:, first_slot:]  # [B, T]: queries whose own key is not padding
    else:
        real_q = torch.ones(B, T, dtype=torch.bool, device=device)

    # The offsets: from position_ids where the model passes them ([B or 1, T] positions of each sequence's own),
    # else the leading padding of each row (a left-padded row's first real token is its position 0).
    offsets = None
    if isinstance(position_ids, Tensor) and position_ids.dim() == 2 and position_ids.shape[-1] == T \
            and position_ids.shape[0] in (1, B):
        diff = position_ids.to(device).expand(B, T) - q_slots  # o_b on every real query row
        off = torch.where(real_q, diff, diff.new_full((), torch.iinfo(torch.int64).max)).amin(dim=1)
        off = torch.where(real_q.any(dim=1), off, 0)
        if bool((torch.where(real_q, diff, off[:, None]) == off[:, None]).all()):
            offsets = off
    if offsets is None:
        lead = (~valid).to(torch.int64).cumprod(dim=1).sum(dim=1) if valid is not None else None
        offsets = -lead if lead is not None else torch.zeros(B, dtype=torch.int64, device=device)
    offsets = offsets.to(torch.int64)

    same = bool((offsets == offsets[0]).all())
    chunk_shifted = chunk is not None and bool((offsets % chunk != 0).any())
    if allowed is None and valid is None and same and not chunk_shifted:  # no mask: nothing to check (a decode step)
        return CallLayout(n_keys, None, window, chunk, offsets, first_slot)

    # The visibility the mask must have: causal (+ window, + chunk) at each sequence's positions, over valid keys.
    pos_q = q_slots[None, :] + offsets[:, None]  # [B, T]
    pos_k = torch.arange(n_keys, device=device)[None, :] + offsets[:, None]  # [B, n_keys]
    diff = pos_q[:, :, None] - pos_k[:, None, :]
    base = diff >= 0
    if window is not None:
        base &= diff < window
    if chunk is not None:
        base &= (pos_q[:, :, None].div(chunk, rounding_mode="floor")
                 == pos_k[:, None, :].div(chunk, rounding_mode="floor"))
    want = base if valid is None else base & valid[:, None, :]
    if allowed is not None:
        # Slots after the last query's (a static cache's future slots) must be hidden from every query.
        if n_keys < Tk and bool(allowed[:, :, n_keys:].any()):
            raise _refuse(mask, what, "a query sees a key after the last query")
        if not torch.equal(allowed[:, :, :n_keys], want):
            raise _refuse(mask, what, "not causal over the sequence's own positions")
    padded = valid is not None and not torch.equal(want, base)
    if not padded and same and not chunk_shifted:
        # The queries are the last T of the n_keys slots, unpadded: the op's own bottom-right causal rule.
        return CallLayout(n_keys, None, window, chunk, offsets, first_slot)
    want &= real_q[:, :, None]  # pad queries see nothing: a zero output, no statistic
    return CallLayout(n_keys, want[:, None], None, None, offsets, first_slot)


def call_backend(backend: str, query: Tensor, value: Tensor, cached: bool) -> str:
    """The layer's backend for this call: a cached call (fewer queries than keys, no mask) takes what ``auto``
    picks for it where the layer runs the kernel (the torch path until the kernel takes a cache)."""
    if backend == "triton" and cached:
        return resolve_backend("auto", query.device.type, query.shape[-1], value.shape[-1], cached=True)
    return resolve_backend(backend, query.device.type, query.shape[-1], value.shape[-1])


def run_op(impl, layout: CallLayout | None, query: Tensor, key: Tensor, value: Tensor, sink_tokens: int,
           common: dict, **kw) -> ResidualAttentionResult:
    """The op on this call's layout: the keys up to the last query's slot, the layout's mask (or the causal rule),
    sink_tokens at slots; one call per batch row where the rows' sink keys sit at different slots."""
    if layout is None:
        return impl(query, key, value, sink_tokens=sink_tokens, **common, **kw)
    key, value = key[:, :, :layout.n_keys], value[:, :, :layout.n_keys]
    common = {**common, "sliding_window": layout.window, "attention_chunk": layout.chunk, "attn_mask": layout.mask}
    sinks = layout.sink_slots(sink_tokens)
    if len(sinks) == 1:
        return impl(query, key, value, sink_tokens=sinks[0], **common, **kw)
    parts = []
    for b, n in enumerate(sinks):
        row = {**common, "attn_mask": layout.mask[b:b + 1]}
        sink = common["learned_sink"]
        if sink is not None and sink.dim() == 3:  # one logit per query row
            row["learned_sink"] = sink[b:b + 1]
        parts.append(impl(query[b:b + 1], key[b:b + 1], value[b:b + 1], sink_tokens=n, **row, **kw))
    cat = [None if parts[0][i] is None else torch.cat([p[i] for p in parts]) for i in (0, 1, 3, 4)]
    gram = None if parts[0].gram is None else sum(p.gram for p in parts)
    return ResidualAttentionResult(cat[0], cat[1], gram, cat[2], cat[3])


def first_key_mass(query: Tensor, key: Tensor, res: ResidualAttentionResult, layout: CallLayout | None,
                   common: dict) -> Tensor:
    """float32 ``[B, Hq, Tq]``: each row's attention probability on its sequence's first token (position 0, Gu et
    al.'s α₁ per row), from the call's ``res`` (argmax in slots, top1_prob) and the q, k and ``common`` keywords it
    was run with (``nqpq_kernels.key_mass``). Position 0 sits at slot −o_b; a sliding cache that dropped it (o_b > 0)
    holds it for no row's window: 0."""
    kw = {name: common.get(name) for name in ("scale", "softcap", "sliding_window", "attention_chunk", "attn_mask")}
    if layout is None:
        return key_mass(query, key, res.argmax, res.top1_prob, **kw)
    kw.update(sliding_window=layout.window, attention_chunk=layout.chunk, attn_mask=layout.mask)
    return key_mass(query, key[:, :, :layout.n_keys], res.argmax, res.top1_prob, key_slot=-layout.offsets, **kw)


def feed(layer: int, gram_acc, stats_acc, res: ResidualAttentionResult, layout: CallLayout | None = None,
         first_key: Tensor | None = None) -> None:
    """Hand a call's Gram and statistics to the sinks; with a layout, the argmax as positions and ``first_position``
    (passed only when it is not 0, so sinks written for whole sequences keep working); ``first_key``
    (``first_key_mass``), where given, as ``first_key_mass``."""
    if gram_acc is not None:
        gram_acc.add(layer, res.gram)
    if stats_acc is not None:
        argmax, extra = res.argmax, {}
        if layout is not None:  # positions of each sequence: a cache's, a padded row's
            argmax = layout.argmax_positions(argmax)
            first = layout.first_position()
            if not (isinstance(first, int) and first == 0):
                extra["first_position"] = first
        if first_key is not None:
            extra["first_key_mass"] = first_key
        if res.sink_mass is None:
            stats_acc.add(layer, argmax, res.top1_prob, **extra)
        else:
            stats_acc.add(layer, argmax, res.top1_prob, res.sink_mass, **extra)

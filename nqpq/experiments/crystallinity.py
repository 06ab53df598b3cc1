"""How crystalline is each attention head: top-1 probability and where the winner sits.

For every query row t of every observed (layer, head), attention picks i* (the first
index of the maximal score) with probability max_j p[t, j]. ``CrystallinityAccumulator``
sums, per (layer, head):

- ``top1_prob_mean``: the mean over rows of max_j p[t, j];
- ``sink_frac``: the fraction of rows with i* = 0 (the attention sink);
- ``self_frac``: i* = t (the token itself);
- ``prev_frac``: i* = t − 1 (the previous token);
- ``sink_mass_mean``: the mean over rows of the sink mass Σ_{j<n} p[t, j] + p_sink[t] (0 with n = 0 sink tokens
  and no learned sink);
- ``winner_share_mean``: the mean of p[t, i*ᴿ] / (1 − sink mass), the winner's share of the attention that
  is not on the sink, over the rows that see a key beyond the sink (= ``top1_prob_mean`` with n = 0 and no
  learned sink);
- ``first_key_mass_mean``: α₁, the mean over rows of p[t, 0], the attention on the sequence's first token (Gu et al.,
  ICLR 2025: the head is a sink head when α₁ > ε; ``nqpq.results.crystallinity_table.sink_metrics``). p is the
  model's own softmax (with a learned sink: over the real keys and the sink, so a row's real keys hold 1 − m_L); a row
  whose window or mask hides the first token puts 0 on it and still counts. Present only where the calls were fed a
  ``first_key_mass`` (every call of ``observe_residuals`` and of a crystallized layer is).

A model with learned attention sinks (gpt-oss's ``sinks``: one logit per head joining every row's softmax with
a zero value) has p_sink[t] > 0 on every row, and p is that softmax (the model's own). With n = 0 sink tokens
``sink_mass_mean`` is each head's mean learned-sink mass m_L, and ``winner_share_mean`` the winner's share of
what the learned sink leaves; with n > 0 the mass is m_S + m_L, the sink keys' and the learned sink's together.

With ``sink_tokens=n > 0`` (``nqpq.residual_attention``), i* is i*ᴿ, the winner among the keys j >= n, and
``top1_prob`` its probability: ``sink_frac`` then counts only the rows t < n, which see nothing else.

Every row counts in every denominator, but a row with no visible key (argmax −1 with top1_prob 0: a pad query of a
padded batch), which counts nowhere. Positions are each sequence's own (``first_position``: one per batch row for a
padded batch, the cache's for a generation step), so a row counts once, at its position, however it was computed.
Row 0 is both sink and self, and never prev.
A row the op reports as non-finite (argmax −1, top1_prob NaN) counts in the
denominators, in none of the fractions, and turns its head's ``top1_prob_mean`` into
NaN: a NaN is reported, never averaged away.

It is fed by ``observe_residuals(..., stats_acc=acc)``, which rides along a baseline
pass: the model's own attention output is kept. A module that calls its attention function more than once per
forward on the same q and k (DiffLlama: once per half of V) is one attention with one softmax: its rows are
counted once (``nqpq.model.crystallize`` feeds only the first such call).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .distributed import all_reduce_sum

_COLUMNS = 10  # the per-head sums kept per layer (see __init__)


class CrystallinityAccumulator:
    """Per-(layer, head) sums of the top-1 probability and of the sink/self/prev counts.

    ``layers``: the layers that will be observed; ``n_heads``: query heads per layer (one int for all, or a
    mapping layer → heads where layers differ: dots3).
    Both are fixed up front so that every rank of a torchrun job (even one given no
    blocks) reduces tensors of the same shape.
    """

    def __init__(self, layers: Sequence[int], n_heads: int | Mapping[int, int], sink_tokens: int = 0) -> None:
        layers = sorted(set(int(li) for li in layers))
        if not layers:
            raise ValueError("CrystallinityAccumulator needs at least one layer")
        heads = {li: n_heads[li] if isinstance(n_heads, Mapping) else n_heads for li in layers}
        for h in heads.values():
            if isinstance(h, bool) or not isinstance(h, int) or h < 1:
                raise ValueError(f"n_heads must be a positive int, got {h!r}")
        self.layers = layers
        self.n_heads = heads  # layer → query heads
        self.sink_tokens = sink_tokens  # the op's sink_tokens for the calls this accumulator is fed
        # One row per layer: [H, 10] = Σ top1_prob, #sink, #self, #prev, #rows, Σ sink mass, Σ winner share,
        # #rows with a key beyond the sink, Σ first-key mass, #rows fed a first-key mass (float64: counts are exact
        # to 2^53).
        self._sums = {li: torch.zeros(heads[li], _COLUMNS, dtype=torch.float64) for li in layers}

    def add(self, layer: int, argmax: Tensor, top1_prob: Tensor, sink_mass: Tensor | None = None,
            first_position: int | Tensor = 0, first_key_mass: Tensor | None = None) -> None:
        """Count one attention call: ``argmax`` int64 ``[B, Hq, T]``, ``top1_prob`` float32 ``[B, Hq, T]`` and,
        for ``sink_tokens > 0`` or a learned sink, ``sink_mass`` float32 ``[B, Hq, T]`` (None: no sink, a mass of 0).
        ``first_position``: the absolute position of row 0 (a call with a KV cache holds the last T of Tk
        positions: Tk − T), so that self and prev compare i* with each row's own position; each row counts once.
        An int, or int64 ``[B]``: one per batch row (a padded batch: each sequence's own positions; argmax then holds
        positions too). A row with no visible key (argmax −1 with top1_prob 0: a pad query) counts nowhere.
        ``first_key_mass``: float ``[B, Hq, T]``, each row's p on its sequence's first token
        (``nqpq.model.cache_layout.first_key_mass``); None: α₁ not measured by this call."""
        if sink_mass is None and self.sink_tokens:
            raise ValueError(f"sink_mass is needed for sink_tokens={self.sink_tokens}")
        if layer not in self._sums:
            raise ValueError(f"layer {layer!r} is not one of the accumulator's layers {self.layers}")
        tensors = (("argmax", argmax), ("top1_prob", top1_prob))
        for name, t in tensors + ((("first_key_mass", first_key_mass),) if first_key_mass is not None else ()):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3 or t.shape[1] != self.n_heads[layer]:
                raise ValueError(f"{name} must be [B, Hq={self.n_heads[layer]}, T], got shape {tuple(t.shape)}")
        if isinstance(first_position, Tensor):
            if first_position.shape != argmax.shape[:1] or first_position.dtype != torch.int64:
                raise ValueError(f"first_position must be an int >= 0 or int64 [B={argmax.shape[0]}], got "
                                 f"{first_position.dtype} {tuple(first_position.shape)}")
        elif isinstance(first_position, bool) or not isinstance(first_position, int) or first_position < 0:
            raise ValueError(f"first_position must be an int >= 0 or int64 [B], got {first_position!r}")
        if argmax.shape != top1_prob.shape:
            raise ValueError(
                f"argmax and top1_prob must have one shape, got {tuple(argmax.shape)} and {tuple(top1_prob.shape)}"
            )
        if first_key_mass is not None and (first_key_mass.shape != argmax.shape
                                           or not first_key_mass.is_floating_point()):
            raise ValueError(f"first_key_mass must be a float tensor of argmax's shape {tuple(argmax.shape)}, got "
                             f"{first_key_mass.dtype} {tuple(first_key_mass.shape)}")
        if argmax.dtype != torch.int64:
            raise TypeError(f"argmax must be int64, got {argmax.dtype}")
        if not top1_prob.is_floating_point():
            raise TypeError(f"top1_prob must be floating point, got {top1_prob.dtype}")
        B, H, T = argmax.shape
        # The rows' absolute positions, [1 or B, 1, T].
        start = first_position.to(argmax.device).view(-1, 1, 1) if isinstance(first_position, Tensor) else \
            torch.tensor(first_position, device=argmax.device).view(1, 1, 1)
        t = start + torch.arange(T, device=argmax.device)
        real = ~((argmax == -1) & (top1_prob == 0))  # empty rows (no visible key) count nowhere
        sink = ((argmax == 0) & real).sum(dim=(0, 2))
        self_ = ((argmax == t) & real).sum(dim=(0, 2))
        # Position 0 has no previous token; an argmax of −1 (a non-finite row) must not count there.
        prev = ((argmax == t - 1) & (t >= 1) & real).sum(dim=(0, 2))
        top1_64 = top1_prob.to(torch.float64)
        top1 = top1_64.sum(dim=(0, 2))  # empty rows add 0
        rows = real.sum(dim=(0, 2)).double()
        if sink_mass is None:
            mass, share, share_rows = torch.zeros_like(top1), top1, rows
        else:
            mass64 = sink_mass.to(torch.float64)
            mass = mass64.sum(dim=(0, 2))  # empty rows add 0
            # Rows t < n see only sink keys (mass 1): they have no winner beyond the sink. NaN rows stay NaN.
            beyond = ~(mass64 == 1.0) & real
            share = torch.where(beyond, top1_64 / (1.0 - mass64), 0.0).sum(dim=(0, 2))
            share_rows = beyond.sum(dim=(0, 2)).double()
        if first_key_mass is None:
            first_key, first_key_rows = torch.zeros_like(top1), torch.zeros_like(rows)
        else:  # empty rows add 0 (their first-key mass is 0); a non-finite row's NaN stays
            first_key = torch.where(real, first_key_mass.to(torch.float64), 0.0).sum(dim=(0, 2))
            first_key_rows = rows
        step = torch.stack([top1, sink.double(), self_.double(), prev.double(), rows, mass, share, share_rows,
                            first_key, first_key_rows], dim=1)
        self._sums[layer] += step.cpu()

    def results(self) -> list[dict]:
        """One dict per (layer, head), sorted: ``{"layer", "head", "top1_prob_mean", "sink_frac", ...}``.

        Under torch.distributed this is a collective (the sums are added across ranks):
        every rank must call it, the same number of times.
        """
        # One collective for every layer: the per-layer [H, 8] sums, flattened and concatenated.
        packed = all_reduce_sum(torch.cat([self._sums[li].flatten() for li in self.layers]))
        out = []
        sizes = [self._sums[li].numel() for li in self.layers]
        for li, flat in zip(self.layers, packed.split(sizes)):
            per_layer = flat.view(-1, _COLUMNS)
            for head, (top1, sink, self_, prev, rows, mass, share, share_rows, first_key, first_key_rows) in \
                    enumerate(per_layer.tolist()):
                if rows == 0:
                    raise RuntimeError(f"crystallinity: layer {li} was never observed (no rows counted)")
                entry = {"layer": li, "head": head, "top1_prob_mean": top1 / rows, "sink_frac": sink / rows,
                         "self_frac": self_ / rows, "prev_frac": prev / rows, "sink_mass_mean": mass / rows,
                         "winner_share_mean": share / share_rows if share_rows else float("nan")}
                if first_key_rows == rows:  # every row of the head was fed its first-key mass
                    entry["first_key_mass_mean"] = first_key / rows
                elif first_key_rows:
                    raise RuntimeError(f"crystallinity: layer {li} head {head}: {int(first_key_rows)} of "
                                       f"{int(rows)} rows came with a first-key mass (feed it with every call or none)")
                out.append(entry)
        return out


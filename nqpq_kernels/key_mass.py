"""The attention probability of one key per row, from what the op already returns: no T × T buffer.

Gu et al. (ICLR 2025) measure the attention sink by α₁, the mean over rows of p[t, 0], the probability the row puts
on the first key. The op does not return p, but each row's ``argmax`` i and ``top1_prob`` p[t, i] determine every
other probability of the row: p[t, j] = p[t, i] · exp(s[t, j] − s[t, i]) (one softmax, one normalizer), so

    p[t, j] = top1_prob[t] · exp(s[t, j] − s[t, argmax[t]])

needs two scores per row, s[t, j] and s[t, argmax[t]]: two dot products of width D (O(B · Hq · Tq · D), the size of
q), whatever backend computed the row. p is the op's own softmax: with a learned sink (gpt-oss) it is the softmax
over the visible keys and the sink logit, so Σ_j p[t, j] = 1 − m_L; under an ``attn_mask`` a float mask's value is
added to the score, and a key the row does not see has p = 0.

Exact where p[t, argmax] is a normal float32: always with ``sink_tokens=0``, where the argmax is the row's maximum
(p >= 1 / (Tk + 1)); with ``sink_tokens > 0`` the argmax is the winner beyond the sink, whose probability underflows
only if the sink keys outscore it by more than ~87 (then the result is 0 where it should be the sink's share).
"""

from __future__ import annotations

import torch
from torch import Tensor


def key_mass(
    q: Tensor,
    k: Tensor,
    argmax: Tensor,
    top1_prob: Tensor,
    *,
    key_slot: int | Tensor = 0,
    scale: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    attention_chunk: int | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """float32 ``[B, Hq, Tq]``: p[t, key_slot], the probability each row puts on key ``key_slot`` (an int, or int64
    ``[B]``: one slot per batch row; a slot outside 0..Tk−1 is a key no row sees: 0).

    ``q``, ``k``, ``scale``, ``softcap``, ``sliding_window``, ``attention_chunk`` and ``attn_mask`` are those of the op
    call that returned ``argmax`` and ``top1_prob`` (``[B, Hq, Tq]``; any ``sink_tokens`` and ``learned_sink``: both
    are in ``top1_prob`` already). Without a mask, query row r sits at position Tk − Tq + r and sees the key if it is
    causal, in the window and in the chunk (``reference.visible_keys``); under a mask, if its masked score is finite.
    A row with argmax −1 gives top1_prob · 0: 0 on an empty row, NaN on a non-finite one.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if argmax.shape != (B, Hq, Tq) or top1_prob.shape != (B, Hq, Tq):
        raise ValueError(f"argmax and top1_prob must be [B={B}, Hq={Hq}, Tq={Tq}], got {tuple(argmax.shape)} and "
                         f"{tuple(top1_prob.shape)}")
    device = q.device
    scale = D ** -0.5 if scale is None else float(scale)
    slot = torch.as_tensor(key_slot, dtype=torch.int64, device=device).reshape(-1).expand(B)
    in_range = (slot >= 0) & (slot < Tk)  # [B]
    b_idx = torch.arange(B, device=device)
    kv_head = torch.arange(Hq, device=device) // (Hq // Hkv)  # query head h reads kv head h // group
    qf = q.float()

    def scores(keys: Tensor) -> Tensor:  # keys [B, Hq, Tq, D] or [B, Hq, 1, D] → the row's scaled, capped scores
        s = (qf * keys.float()).sum(dim=-1) * scale
        return s if softcap is None else torch.tanh(s / softcap) * softcap

    k_first = k[b_idx[:, None], kv_head[None, :], slot.clamp(0, Tk - 1)[:, None]]  # [B, Hq, D]
    winner = argmax.clamp(min=0)
    k_win = k[b_idx[:, None, None], kv_head[None, :, None], winner]  # [B, Hq, Tq, D]
    s_first, s_win = scores(k_first[:, :, None, :]), scores(k_win)
    seen = in_range[:, None, None].expand(B, Hq, Tq)
    if attn_mask is None:
        pos = torch.arange(Tk - Tq, Tk, device=device)[None, None, :]  # the rows' positions
        j = slot[:, None, None]
        seen = seen & (j <= pos)
        if sliding_window is not None:
            seen = seen & (pos - j < sliding_window)
        if attention_chunk is not None:
            seen = seen & (pos.div(attention_chunk, rounding_mode="floor")
                           == j.div(attention_chunk, rounding_mode="floor"))
    else:
        mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)).expand(B, Hq, Tq, Tk)
        first = mask[b_idx, :, :, slot.clamp(0, Tk - 1)]  # [B, Hq, Tq]
        if mask.dtype == torch.bool:
            seen = seen & first
        else:
            s_first = s_first + first.float()
            s_win = s_win + mask.gather(3, winner[..., None]).squeeze(3).float()
            seen = seen & torch.isfinite(s_first)
    p = top1_prob.float() * torch.exp(s_first - s_win)
    p = torch.where(seen, p, torch.zeros((), device=device))
    return torch.where(argmax < 0, top1_prob.float() * 0.0, p)

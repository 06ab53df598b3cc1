"""The census's checks of a crystallized model against the model's own logits and losses and a float64 per-head
computation, with the inputs each family takes (the tiny random models they run on are ``nqpq.model.tiny_models``).

``python -m benchmarks.census`` runs it over every family in worker processes and writes
``benchmarks/results/census.md``; the tests of the model families use the same models and checks. Everything
transformers-specific is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:  # annotations only
    from .parts import ModelParts

TOL = 1e-5
SHARPEN = 4.0  # the "sharp" weight scale: every Linear inside an attention module times this


def rel_error(got: Tensor, want: Tensor) -> float:
    import torch

    got, want = got.double(), want.double()
    if got.shape != want.shape:
        return math.inf
    if not bool(torch.isfinite(got).all() and torch.isfinite(want).all()):
        return math.inf if not torch.equal(got.isnan(), want.isnan()) else 0.0
    return (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)


def chunk_of(module: nn.Module, layer: int) -> int | None:
    """The chunk size of a Llama 4 chunked-attention layer, read from the module's config as the model's forward
    reads it to build the mask (not from nqpq's geometry: the reference stays independent), else None."""
    config = module.config
    types = getattr(config, "layer_types", None)
    if types is None or layer >= len(types) or types[layer] != "chunked_attention":
        return None
    return config.attention_chunk_size


def float64_reference(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None, softcap: float | None,
                      s_aux: Tensor | None, mode: str, basis: Tensor | None, d_r: int | None, chunk: int | None = None,
                      mask: Tensor | None = None, position_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The float64 per-head definition of top-1 / low-rank on one call's q [B, Hq, T, Dqk], k [B, Hkv, Tk, Dqk],
    v [B, Hkv, Tk, Dv]; a learned sink (``s_aux`` [Hq], or Inkling 2's ``sinks`` [B, Hq, T, 1]) is a key of value
    zero whose mass joins the ground state.
    ``mask``, the attention mask the call received (the model's, or one its attention module built), is applied as
    transformers' eager attention applies it: scores (+ ``position_bias``) + mask, or -inf where a bool mask is
    False; it alone decides the keys a row sees (a key masked to the float32 minimum, as transformers masks, is
    hidden). Without one: causal over Tk = T keys (the window, the chunk).
    Returns (out [B, T, Hq, Dv], mask [B, T, Hq] of the rows whose argmax has a clear margin)."""
    import torch

    Bq, Hq, Tq, _ = q.shape
    G = Hq // k.shape[1]
    kk = k.double().repeat_interleave(G, dim=1)
    vv = v.double().repeat_interleave(G, dim=1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if position_bias is not None:
        s = s + position_bias.double()
    if mask is None:
        i = torch.arange(Tq)
        visible = i[None, :] <= i[:, None]
        if window is not None:
            visible &= i[None, :] > i[:, None] - window
        if chunk is not None:  # Llama 4's chunked layers: only the keys of the query's own chunk
            visible &= i[None, :] // chunk == i[:, None] // chunk
    elif mask.dtype == torch.bool:
        visible = mask.expand_as(s)
    else:
        s = s + mask.double()
        visible = (s > torch.finfo(torch.float32).min / 2).expand_as(s)
    s = s.masked_fill(~visible, float("-inf"))
    if s_aux is not None:
        sink = s_aux.double()  # one logit per head (gpt-oss), or per row [B, Hq, T, 1] (Inkling 2's sinks)
        sink = (sink.view(1, Hq, 1, 1) if sink.dim() == 1 else sink.reshape(Bq, Hq, Tq, 1)).expand(Bq, Hq, Tq, 1)
        p = torch.cat([s, sink], dim=-1).softmax(-1)
        mass, p = p[..., -1:], p[..., :-1]
    else:
        p, mass = s.softmax(-1), torch.zeros(Bq, Hq, Tq, 1, dtype=torch.float64)
    ctx = p @ vv
    top2 = s.topk(min(2, s.shape[-1]), dim=-1)
    star = s.argmax(-1, keepdim=True)  # the first maximum, as the op takes it
    ground = (1 - mass) * vv.gather(2, star.expand(-1, -1, -1, vv.shape[-1]))
    out = ground
    if mode == "lowrank":
        P = basis[:, :, :d_r].double()  # [Hq, Dv, r]
        out = ground + ((ctx - ground) @ P) @ P.transpose(-1, -2)
    # Rows 1..: a clear maximum (row 0 sees one key). Margin relative to the call's largest |score|.
    gap = (top2.values[..., 0] - top2.values[..., -1]) if s.shape[-1] > 1 else torch.ones(Bq, Hq, Tq)
    finite = s.masked_fill(~visible, 0).abs().amax()
    # A row whose visible scores are all equal (Zaya's keys are zero at init) ties in every precision: first key.
    flat = s.masked_fill(~visible, float("inf")).amin(-1) == top2.values[..., 0]
    clear = (gap > 1e-4 * max(finite.item(), 1e-30)) | (visible.sum(-1) == 1) | flat
    return out.permute(0, 2, 1, 3), clear.permute(0, 2, 1)


class AttentionSpy:
    """Records the crystallized calls of a model (inside ``crystallize``): q, k, v, their kwargs and the output."""

    def __init__(self, model: nn.Module) -> None:
        from transformers import AttentionInterface

        self.name = "nqpq_" + model.config._attn_implementation
        self.mapping = AttentionInterface._global_mapping
        self.calls: list = []

    def __enter__(self) -> AttentionSpy:
        self.real = self.mapping[self.name]

        def spy(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            out = self.real(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
            self.calls.append((module, query, key, value, scaling, {**kwargs, "attention_mask": attention_mask},
                               out[0]))
            return out

        self.mapping[self.name] = spy
        return self

    def __exit__(self, *exc: object) -> None:
        self.mapping[self.name] = self.real


def model_inputs(model: nn.Module, ids: Tensor) -> dict:
    """What the model's forward takes for the token ids ``ids``: the ids, except for a drafter that runs on its target
    model's state (a config with ``backbone_hidden_size``: the Gemma 4 assistants). That one is fed as transformers'
    candidate generator feeds it: one query per row, its input the target's token embedding beside the target's
    last hidden state, and every layer's keys and values the target's of its layer type, for the ``T`` tokens before
    it (random here, seeded, like the model's weights: the census has no target model)."""
    import torch

    backbone = getattr(model.config, "backbone_hidden_size", None)
    if backbone is None:
        return {"input_ids": ids}
    g = torch.Generator().manual_seed(1)
    n_rows, n_keys = ids.shape
    shapes = {}  # layer type → (kv heads, head width) of the layers that reuse the target's key/value states
    for module in model.modules():
        if getattr(module, "is_kv_shared_layer", False):
            kv_heads = module.config.num_attention_heads // module.num_key_value_groups
            shapes[module.layer_type] = (kv_heads, module.head_dim)
    return {
        "inputs_embeds": torch.randn(n_rows, 1, 2 * backbone, generator=g),
        "shared_kv_states": {kind: (torch.randn(n_rows, h, n_keys, d, generator=g),
                                    torch.randn(n_rows, h, n_keys, d, generator=g))
                             for kind, (h, d) in shapes.items()},
        "position_ids": torch.full((n_rows, 1), n_keys - 1, dtype=torch.long),  # the last target token's, as there
    }


def logits_of(model: nn.Module, inputs: dict) -> Tensor:
    import torch

    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def model_losses(logits: Tensor, ids: Tensor) -> Tensor:
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].double().flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
        ids.shape[0], -1).mean(1)


def crystallized_checks(model: nn.Module, parts: ModelParts, ids: Tensor, tag: str, modes: bool) -> dict[str, float]:
    """rel errors of every check under the model's current implementation and weights, on the token ids ``ids``
    (fed as ``model_inputs`` feeds them)."""
    import torch

    from .crystallize import crystallize
    from .replay import PrefixRunner

    out: dict[str, float] = {}
    attn = parts.attn_layers
    inputs = model_inputs(model, ids)
    base = logits_of(model, inputs)
    with crystallize(model, [attn[-1]], mode="full", backend="torch", parts=parts):
        out[f"{tag} full last"] = rel_error(logits_of(model, inputs), base)
    with crystallize(model, attn, mode="full", backend="torch", parts=parts):
        out[f"{tag} full all"] = rel_error(logits_of(model, inputs), base)
    want = model_losses(base, ids)
    starts = sorted({attn[0], attn[-1]})
    runner = PrefixRunner(model, ids, [slice(0, ids.shape[0])], start=starts, parts=parts)
    out[f"{tag} replay baseline"] = rel_error(runner.capture_baseline(), want)
    for s in starts:
        with crystallize(model, [li for li in attn if li >= s], mode="full", backend="torch", parts=parts):
            out[f"{tag} replay full from {s}"] = rel_error(runner.losses(start=s), want)
    if modes:
        # The last attention layer, and the last chunked one where it is another (Llama 4's last layer is a full one).
        chunked = [li for li in attn if parts.geometry[li].attention_chunk is not None]
        for li in sorted({attn[-1], *chunked[-1:]}):
            geo = parts.geometry[li]
            g = torch.Generator().manual_seed(li)
            basis = torch.linalg.qr(torch.randn(geo.n_heads, geo.v_dim, geo.v_dim, generator=g))[0]
            d_r = max(1, geo.v_dim // 4)
            for mode in ("top1", "lowrank"):
                with (crystallize(model, [li], mode=mode, basis={li: basis}, d_r=d_r, backend="torch", parts=parts),
                      AttentionSpy(model) as spy):
                    logits_of(model, inputs)
                if not spy.calls:
                    raise RuntimeError(f"layer {li} was crystallized but its attention function was never called")
                worst = 0.0
                for module, q, k, v, scaling, kwargs, got in spy.calls:
                    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
                    want_out, clear = float64_reference(
                        q, k, v, scale, kwargs.get("sliding_window"), kwargs.get("softcap"),
                        kwargs.get("s_aux", kwargs.get("sinks")), mode, basis, d_r, chunk_of(module, li),
                                                 kwargs["attention_mask"], kwargs.get("position_bias"))
                    if clear.float().mean().item() < 0.5:
                        raise RuntimeError(f"{tag} {mode}: fewer than half the rows have a clear argmax")
                    diff = (got.double() - want_out).abs().amax(-1)[clear]
                    worst = max(worst, diff.max().item() / max(want_out.abs().max().item(), 1e-30))
                out[f"{tag} {mode} layer {li}"] = worst
    return out


def sharpen(parts: ModelParts) -> None:
    import torch

    with torch.no_grad():
        for module in parts.attn.values():
            for sub in module.modules():
                if isinstance(sub, torch.nn.Linear):
                    sub.weight.mul_(SHARPEN)

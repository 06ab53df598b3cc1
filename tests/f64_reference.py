"""An independent float64 implementation of the scan's and the crystallinity's definitions (test helper).

The model under test is copied to float64, and its attention runs through a function registered here
that computes every (batch, query head) with its own loop: masked scaled scores, softmax, i* = the
first index of the maximal score, the top-1 probability max_j p[j], ε = p @ V − V[i*], and, on the one
crystallized layer, V[i*] (top-1) or V[i*] + P_r P_rᵀ ε (low-rank). Nothing of nqpq is used.

Also the tiny GQA Llama the scan and crystallinity tests share.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

NAME = "nqpq_test_f64"
VARIANCE_TARGET = 0.90


def _f64_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    ref: F64Reference = module._nqpq_f64
    B, Hq, T, D = query.shape
    group = Hq // key.shape[1]  # query head h reads kv head h // group (transformers' repeat_kv order)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    if attention_mask is not None:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        assert torch.equal(allowed, causal.expand_as(allowed)), "the reference handles plain causal masks only"
    layer = module.layer_idx
    mode, P = ref.crystal.get(layer, (None, None))
    out = torch.empty(B, T, Hq, D, dtype=torch.float64)
    probs = torch.empty(B, Hq, T, T, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            q, k, v = query[b, h].double(), key[b, h // group].double(), value[b, h // group].double()
            s = (q @ k.T * scaling).masked_fill(~causal, -math.inf)
            p = torch.softmax(s, dim=-1)
            i_star = s.argmax(dim=-1)  # first index of the max score
            v_star, ctx = v[i_star], p @ v
            eps = ctx - v_star
            if layer in ref.observed:
                # Conditioning: the top-2 score gap relative to the scores' size (rounding is relative).
                top = s[1:].topk(2, dim=-1).values  # row 0 sees one key: its argmax cannot flip
                ref.gaps.append(((top[:, 0] - top[:, 1]).min() / s[causal].abs().max()).item())
                ref.stats.setdefault(layer, []).append((h, i_star, p.max(dim=-1).values))
                if ref.grams is not None:
                    g = ref.grams.setdefault(layer, torch.zeros(Hq, D, D, dtype=torch.float64))
                    g[h] += eps.T @ eps
            if mode is None:
                o = ctx
            elif mode == "top1":
                o = v_star
            else:
                o = v_star + eps @ P[h] @ P[h].T
            out[b, :, h], probs[b, h] = o, p
    return out, probs


class F64Reference:
    """A float64 copy of ``model`` whose attention is computed by the loop above."""

    def __init__(self, model: torch.nn.Module) -> None:
        if NAME not in AttentionInterface._global_mapping:
            AttentionInterface.register(NAME, _f64_attention)
            AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"])
        self.model = copy.deepcopy(model).double().eval()
        self.model.set_attn_implementation(NAME)
        for module in self.model.modules():
            if hasattr(module, "layer_idx") and hasattr(module, "scaling"):  # the attention modules
                module._nqpq_f64 = self
        self.crystal: dict[int, tuple[str, torch.Tensor | None]] = {}
        self.observed: set[int] = set()
        self.grams: dict[int, torch.Tensor] | None = None
        self.stats: dict[int, list] = {}
        self.gaps: list[float] = []  # per observed call: min top-2 score gap / max |score|

    @torch.no_grad()
    def block_losses(self, blocks: torch.Tensor) -> torch.Tensor:
        """Per-block mean next-token loss (float64) of the model as configured."""
        logits = self.model(input_ids=blocks, use_cache=False).logits.double()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1),
                              reduction="none")
        return nll.view(blocks.shape[0], -1).mean(dim=1)

    def ppl(self, blocks: torch.Tensor) -> float:
        return math.exp(self.block_losses(blocks).mean().item())

    def baseline(self, blocks: torch.Tensor, calib_blocks: int, layers: Sequence[int]) -> float:
        """Baseline PPL; observes ``layers``: Grams on the first ``calib_blocks`` blocks, stats on all."""
        self.observed = set(layers)
        self.grams = {}
        self.block_losses(blocks[:calib_blocks])
        grams, self.grams = self.grams, None
        self.block_losses(blocks[calib_blocks:])
        self.observed = set()
        self.basis, self.r90, self.cv = {}, {}, {}
        for layer, gram in grams.items():
            evals, evecs = torch.linalg.eigh(gram)
            evals, evecs = evals.flip(-1).clamp(min=0), evecs.flip(-1)
            cv = evals.cumsum(-1) / evals.sum(-1, keepdim=True)
            self.basis[layer], self.cv[layer] = evecs, cv
            self.r90[layer] = (cv < VARIANCE_TARGET).sum(-1) + 1
        return self.ppl(blocks)

    def crystallinity(self) -> list[dict]:
        """Per (layer, head), from the rows the baseline observed, counted one by one."""
        out = []
        for layer in sorted(self.stats):
            per_head: dict[int, list[float]] = {}
            for h, i_star, top1 in self.stats[layer]:
                acc = per_head.setdefault(h, [0.0, 0, 0, 0, 0])
                for t in range(i_star.numel()):
                    i = int(i_star[t])
                    acc[0] += float(top1[t])
                    acc[1] += i == 0
                    acc[2] += i == t
                    acc[3] += t >= 1 and i == t - 1
                    acc[4] += 1
            for h in sorted(per_head):
                top1, sink, self_, prev, rows = per_head[h]
                out.append({"layer": layer, "head": h, "top1_prob_mean": top1 / rows, "sink_frac": sink / rows,
                            "self_frac": self_ / rows, "prev_frac": prev / rows})
        return out

    def layer_ppl(self, blocks: torch.Tensor, layer: int, mode: str, d_r: int | None = None) -> float:
        """PPL with only ``layer`` crystallized (``lowrank`` uses the basis from ``baseline``)."""
        P = self.basis[layer][:, :, :d_r] if mode == "lowrank" else None
        self.crystal = {layer: (mode, P)}
        try:
            return self.ppl(blocks)
        finally:
            self.crystal = {}


def build_llama(vocab_size: int, seed: int = 0, sharpen: float = 12.0) -> LlamaForCausalLM:
    """Tiny random Llama with grouped-query attention (Hq 4, Hkv 2, D 16).

    q and k are scaled by ``sharpen`` (scores by its square): peaked rows as in trained models, so the
    top-1 probabilities and the sink/self/prev fractions are far from uniform.
    """
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= sharpen
            layer.self_attn.k_proj.weight *= sharpen
    model.set_attn_implementation("eager")
    return model.float().eval()

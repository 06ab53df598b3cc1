"""Sizing a sweep or scan of a model spread over several GPUs (``--device-map``), from the model's geometry alone.

    python -m benchmarks.sizing --preset llama-3-70b --cards 2 4 --card-gib 80

For each card count: the weights per card (bf16 by default, split evenly as ``--device-map balanced`` does),
what is left per card, the default batch size nqpq would choose there (``nqpq.experiments.batching.default_batch_size``
with that free memory on every card: the tightest card decides), the prefix record, the per-block buffers,
and the time of a sweep and of a scan **estimated from FLOP counts** (2 FLOPs per weight per token, plus
attention's QKᵀ and PV; at ``--tflops`` per card × ``--efficiency``). These are estimates, not
measurements: no multi-GPU run was measured for them. Under a device map accelerate runs the layers one
device after the other (no pipelining), so the time is that of one card doing all the FLOPs; more cards add
memory, not speed.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from nqpq.experiments.batching import batch_bytes_per_block, default_batch_size
from nqpq.experiments.config import SPEC_D_R

GIB = 1 << 30


@dataclass(frozen=True)
class Geometry:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    tied: bool = False  # LM head shares the input embedding

    def layer_params(self) -> int:
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.intermediate  # gated MLP: gate, up, down
        return q_o + k_v + mlp + 2 * self.hidden  # + the two norms

    def params(self) -> int:
        embed = self.vocab * self.hidden
        return self.layers * self.layer_params() + embed * (1 if self.tied else 2) + self.hidden


PRESETS = {
    "llama-3-70b": Geometry(hidden=8192, layers=80, heads=64, kv_heads=8, head_dim=128, vocab=128256,
                            intermediate=28672),
    "llama-3-8b": Geometry(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256,
                           intermediate=14336),
    "qwen2.5-72b": Geometry(hidden=8192, layers=80, heads=64, kv_heads=8, head_dim=128, vocab=152064,
                            intermediate=29568),
}


def layer_flops_per_token(g: Geometry, seq_len: int) -> float:
    """Forward FLOPs of one decoder layer per token: 2 per weight, plus causal QKᵀ and PV (T/2 keys on average)."""
    return 2 * g.layer_params() + 2 * 2 * (seq_len / 2) * g.heads * g.head_dim


def sizing_rows(g: Geometry, cards: list[int], card_gib: float, *, dtype: torch.dtype, n_blocks: int, seq_len: int,
                n_ranks: int, overhead_gib: float, tflops: float, efficiency: float) -> list[dict]:
    elem = torch.finfo(dtype).bits // 8
    weights = g.params() * elem
    widest = {"n_heads": g.heads, "n_kv_heads": g.kv_heads, "qk_dim": g.head_dim, "v_dim": g.head_dim}
    parts = SimpleNamespace(largest=lambda field, layers=None: widest[field],
                            lm_head=SimpleNamespace(weight=torch.empty(g.vocab, g.hidden, device="meta")))
    crystallized = max(1, g.layers // 4)  # the sweep's default: the last quarter
    tokens = n_blocks * seq_len
    layer = layer_flops_per_token(g, seq_len)
    head = 2 * g.vocab * g.hidden
    full_pass = g.layers * layer + head
    configs = 2 + n_ranks  # top-1, full, one per rank
    sweep_flops = tokens * (full_pass + configs * (crystallized * layer + head))
    # The scan replays layers L..n-1 and the head for each layer L and each of its n_ranks + 1 configurations.
    scan_flops = tokens * (full_pass + (n_ranks + 1) * (g.layers * (g.layers + 1) / 2 * layer + g.layers * head))
    rate = tflops * 1e12 * efficiency
    rows = []
    for n in cards:
        free = card_gib * GIB - weights / n - overhead_gib * GIB
        devices = [torch.device("cuda", i) for i in range(n)]  # never touched: only their free memory is given
        row = {"cards": n, "weights_gib": weights / GIB, "weights_per_card_gib": weights / n / GIB,
               "free_per_card_gib": free / GIB, "fits": free > 0}
        if free > 0:
            for kind, records in (("sweep", 1), ("scan", g.layers)):
                row[f"{kind}_batch"] = default_batch_size(
                    devices[0], parts, seq_len, n_blocks, dtype, hidden=g.hidden, n_records=records,
                    free={d: int(free) for d in devices}, devices=devices)
                row[f"{kind}_record_gib"] = records * n_blocks * seq_len * g.hidden * elem / GIB
        row.update(per_block_mib=batch_bytes_per_block(parts, g.hidden, seq_len, dtype) / (1 << 20),
                   sweep_pflop=sweep_flops / 1e15, sweep_s=sweep_flops / rate, scan_pflop=scan_flops / 1e15,
                   scan_s=scan_flops / rate)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| cards | weights / card | free / card | sweep batch | scan batch (record) | sweep (FLOP est.) "
             "| scan (FLOP est.) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["fits"]:
            lines.append(f"| {r['cards']} | {r['weights_per_card_gib']:.1f} GiB | does not fit | | | | |")
            continue
        lines.append(f"| {r['cards']} | {r['weights_per_card_gib']:.1f} GiB | {r['free_per_card_gib']:.1f} GiB "
                     f"| {r['sweep_batch']} | {r['scan_batch']} ({r['scan_record_gib']:.1f} GiB) "
                     f"| {r['sweep_pflop']:.0f} PFLOP ≈ {r['sweep_s']:.0f} s | {r['scan_pflop']:.0f} PFLOP ≈ "
                     f"{r['scan_s'] / 60:.0f} min |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama-3-70b")
    for name in ("hidden", "layers", "heads", "kv-heads", "head-dim", "vocab", "intermediate"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the preset's value")
    p.add_argument("--cards", type=int, nargs="+", default=[2, 4])
    p.add_argument("--card-gib", type=float, default=80.0, help="memory per card (default: 80)")
    p.add_argument("--overhead-gib", type=float, default=2.0,
                   help="per card: CUDA context, allocator reserve, accelerate's headroom (default: 2)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--n-blocks", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--tflops", type=float, default=989.0,
                   help="dense peak TFLOP/s of one card in this dtype (default: 989, H100 SXM bf16)")
    p.add_argument("--efficiency", type=float, default=0.4, help="fraction of the peak reached (default: 0.4)")
    args = p.parse_args(argv)
    g = PRESETS[args.preset]
    g = Geometry(**{f: getattr(args, f.replace("-", "_")) or getattr(g, f.replace("-", "_")) for f in
                    ("hidden", "layers", "heads", "kv_heads", "head_dim", "vocab", "intermediate")})
    n_ranks = sum(1 for d in SPEC_D_R if d <= g.head_dim)
    rows = sizing_rows(g, args.cards, args.card_gib, dtype=getattr(torch, args.dtype), n_blocks=args.n_blocks,
                       seq_len=args.seq_len, n_ranks=n_ranks, overhead_gib=args.overhead_gib, tflops=args.tflops,
                       efficiency=args.efficiency)
    print(f"{args.preset}: {g.params() / 1e9:.1f} B parameters, {rows[0]['weights_gib']:.1f} GiB in {args.dtype}; "
          f"{args.n_blocks} x {args.seq_len} tokens, {n_ranks} ranks, per block {rows[0]['per_block_mib']:.0f} MiB "
          f"of buffers; times at {args.tflops:g} TFLOP/s x {args.efficiency:g} on one card at a time")
    print(markdown(rows))


if __name__ == "__main__":
    main()

"""The launch table as rules (nqpq_kernels.launch) gives exactly the configs of the nested ifs it replaced.

tests/data/launch_table_before.csv holds what the old ``_pick_config`` (nqpq_kernels/residual_attention.py at
dd40f62) returned over the whole grid it branched on: device × padded width × dtype × mode × Gram × sink × v's
padded width (None or any width up to the padded head dim) × attn_mask. It was captured by running that function
before the table was rewritten; every row must come back the same.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from nqpq_kernels import launch

BEFORE = Path(__file__).parent / "data" / "launch_table_before.csv"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OPTIONAL = ("R_BLOCK", "GRAM_COLS")


def _captured() -> list[dict[str, str]]:
    with open(BEFORE, newline="") as f:
        return list(csv.DictReader(f))


def test_rule_table_returns_the_old_configs_on_the_whole_grid():
    rows = _captured()
    # The grid as captured: 2 devices x 5 widths x 3 dtypes x 3 modes x 2^3 flags x (1 + the v widths <= width).
    assert len(rows) == 2 * 3 * 3 * 8 * sum(1 + w for w in range(1, 6))
    mismatches = []
    for row in rows:
        vw = int(row["value_width"]) if row["value_width"] else None
        got = launch.pick_config(int(row["D"]), DTYPES[row["dtype"]], row["mode"], row["gram"] == "1",
                                 torch.device(row["device"]), sink=row["sink"] == "1", value_width=vw,
                                 bias=row["bias"] == "1")
        want = {k: int(row[k]) for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}
        want.update({k: int(row[k]) for k in OPTIONAL if row[k]})
        if row["SPLIT_GRAM"] == "1":
            want["SPLIT_GRAM"] = True
        # An absent SPLIT_GRAM and SPLIT_GRAM=False launch the same kernel (kernel_meta reads .get(..., False)).
        got_cmp = {k: v for k, v in got.items() if not (k == "SPLIT_GRAM" and v is False)}
        if got_cmp != want:
            mismatches.append((dict(row), got))
    assert not mismatches, f"{len(mismatches)} configs changed, first: {mismatches[:3]}"


@pytest.mark.parametrize("rules", [launch.BASE_RULES, launch.ADJUSTMENTS])
def test_every_rule_says_why_in_one_line(rules):
    for rule in rules:
        assert rule.why and "\n" not in rule.why and len(rule.why) <= 120, rule.why


def test_every_rule_is_used_on_the_grid():
    """A rule that no case on the grid reaches is dead: the table must not carry one."""
    used = set()
    for device in ("cuda",):
        for row in _captured():
            if row["device"] != device:
                continue
            vw = int(row["value_width"]) if row["value_width"] else None
            case = launch.LaunchCase(width=int(row["D"]), half=row["dtype"] != "float32", mode=row["mode"],
                                     gram=row["gram"] == "1", sink=row["sink"] == "1", bias=row["bias"] == "1",
                                     narrow_v=vw is not None and vw <= 128)
            used.add(next(i for i, r in enumerate(launch.BASE_RULES) if r.when(case)))
            used.update(len(launch.BASE_RULES) + i for i, r in enumerate(launch.ADJUSTMENTS) if r.when(case))
    assert used == set(range(len(launch.BASE_RULES) + len(launch.ADJUSTMENTS)))


def test_kernel_meta_reads_the_table_and_one_precision():
    """kernel_meta takes its block sizes from the table, and one input precision serves every dot."""
    for dtype, allow_tf32, precision in ((torch.float32, False, "ieee"), (torch.float32, True, "tf32"),
                                         (torch.bfloat16, False, "tf32"), (torch.float16, False, "tf32")):
        meta, opts = launch.kernel_meta(64, dtype, "lowrank", "cuda", return_gram=True, allow_tf32=allow_tf32)
        cfg = launch.pick_config(64, dtype, "lowrank", True, torch.device("cuda"), value_width=64)
        assert (meta["BLOCK_M"], meta["BLOCK_N"]) == (cfg["BLOCK_M"], cfg["BLOCK_N"])
        assert opts == dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        assert meta["DOT_PREC"] == precision and "EPI_PREC" not in meta


def test_decode_plan_goes_through_vp_for_evaluation_where_it_compiles_clean():
    """The decode kernels' low rank through V·P_r: evaluation only (no Gram, a rank given); on CUDA 16-bit at every
    width and fp32 without a sink or at D <= 64 (benchmarks/results/launch_table.md); the interpreter always."""
    def plan(D, dv, dtype, device, **kw):
        p = launch.decode_plan(D, dv, dtype, "lowrank", device, group=4, n_queries=1, n_keys=4096, kv_programs=8,
                               **kw)
        assert p.split_meta["VP"] == p.combine_meta["VP"] and p.split_meta["DR_PAD"] == p.combine_meta["DR_PAD"]
        return p.split_meta["VP"], p.split_meta["DR_PAD"]

    assert plan(128, 128, torch.bfloat16, "cuda", lowrank_rank=40) == (True, 64)
    assert plan(192, 128, torch.float16, "cuda", lowrank_rank=8, sink=True) == (True, 16)
    assert plan(64, 64, torch.float32, "cuda", lowrank_rank=8, sink=True)[0]
    assert not plan(128, 128, torch.float32, "cuda", lowrank_rank=8, sink=True)[0]
    assert plan(128, 128, torch.float32, "cpu", lowrank_rank=8, sink=True)[0]  # the interpreter: always
    assert not plan(64, 64, torch.bfloat16, "cuda", lowrank_rank=8, return_gram=True)[0]  # calibration: whole ε
    assert not plan(64, 64, torch.bfloat16, "cuda")[0]  # no rank named

"""An older results.json read under today's rule (nqpq.results.upgrade): a format-2 file, made here from a tiny
run's format-3 one by taking away what format 3 added and putting back format 2's numbers where the rule changed,
comes back equal to the format-3 run; the committed format-2 runs are read the same way by ``nqpq report``."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
from conftest import HEAD_DIM, REPO, build_model

from nqpq.cli import main as cli_main
from nqpq.experiments.config import SweepConfig
from nqpq.experiments.scan import run_scan
from nqpq.experiments.sweep import run_sweep
from nqpq.results.results_file import json_ready, load_results
from nqpq.results.upgrade import upgrade

LAYERS = (2, 3)
COMMITTED = REPO / "benchmarks" / "results"


def tiny_run(run, tokenizer, token_ids) -> dict:
    """A format-3 run as results.json holds it: two sink settings, two calibration draws, 8 blocks (intervals)."""
    cfg = SweepConfig(layers=LAYERS, d_r=(1, 4, HEAD_DIM), n_blocks=8, seq_len=32, calib_blocks=2, calib_draws=2,
                      sink_tokens=(0, 1), device="cpu", batch_size=4, progress=False)
    results = run(cfg, model=build_model(vocab_size=len(tokenizer)), ids=token_ids, log=lambda *_: None)
    return json.loads(json.dumps(json_ready(results)))


def as_format_2(results: dict) -> dict:
    """What format 2 wrote for the same losses: no outcome/reason/explanation/top-1 interval in a verdict, no
    min_blocks/distinct_resamples, no model_class/model_given, no per-layer verdict in a scan; and the numbers the rule
    changed set to what no re-derivation would give (so that the test sees them recomputed, not kept)."""
    old = copy.deepcopy(results)
    old["format_version"] = 2
    for key in ("min_blocks", "distinct_resamples"):
        del old["bootstrap"][key]
    for key in ("model_class", "model_given"):
        del old["config"][key]

    def spoil(entry: dict) -> None:
        entry["top1_delta_ppl_ci95"] = [-1.0, 1.0]
        for curve in [entry["curve"]] + [d["curve"] for d in entry["draws"]]:
            for c in curve:
                c.update(recovered_pct=4.7e10, recovered_pct_ci95=[108.8, 47028434469.07], delta_ppl_ci95=None)

    analyses = [e for s in old["sinks"] for e in s["layers"]] if old["kind"] == "scan" else old["sinks"]
    for e in analyses:
        if old["kind"] == "scan":
            del e["verdict"]
        else:
            e["verdict"] = {"compressible": True, "d_r_min": 1, "settled": True}
        spoil(e)
    if old["kind"] == "scan":
        old["layers"] = copy.deepcopy(next(s for s in old["sinks"] if s["sink_tokens"] == old["sink_tokens"])["layers"])
    else:
        old["verdict"] = {"compressible": True, "d_r_min": 1, "settled": True}
        spoil(old)
        old["full_delta_ppl_ci95"] = None
    return old


def expected(results: dict) -> dict:
    return {**results, "upgraded_from": 2, "config": {**results["config"], "model_class": None, "model_given": None}}


@pytest.mark.parametrize("run", [run_sweep, run_scan], ids=["sweep", "scan"])
def test_a_format_2_file_upgraded_is_the_format_3_run(run, tokenizer, token_ids):
    results = tiny_run(run, tokenizer, token_ids)
    upgraded = upgrade(as_format_2(results), 2)
    assert json.loads(json.dumps(upgraded)) == expected(results)


@pytest.mark.parametrize("run", [run_sweep, run_scan], ids=["sweep", "scan"])
def test_nqpq_report_of_a_format_2_file_says_it_was_upgraded(run, tokenizer, token_ids, tmp_path, capsys):
    results = tiny_run(run, tokenizer, token_ids)
    old = as_format_2(results)
    text = json.dumps(old, indent=2)
    (tmp_path / "results.json").write_text(text)
    assert load_results(str(tmp_path)) == expected(results)
    assert cli_main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(" note: a format-2 results.json, read under format 3's rule")
    assert "47028434469" not in out and "108.8" not in out
    assert (tmp_path / "results.json").read_text() == text  # the file on disk is not rewritten


def test_a_file_format_2_could_not_have_written_is_refused(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"kind": "sweep", "format_version": 2, "config": {}}))
    assert cli_main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "format version 2 that cannot be re-derived under version 3's rule (KeyError" in err
    assert os.listdir(tmp_path) == ["results.json"]
    with pytest.raises(ValueError, match="format version 1 cannot be upgraded"):
        upgrade({"kind": "sweep"}, 1)


def test_committed_runs_read_under_todays_rule():
    """The committed SmolLM2 runs: the intervals format 2 stored come back exactly (same losses, same seed, same
    resamples); Gemma 3's 2-block scan has no interval and every layer is INCONCLUSIVE (too few blocks)."""
    stored = json.loads((COMMITTED / "smollm2" / "sweep-8-heldout" / "results.json").read_text())
    assert stored["format_version"] == 2
    now = load_results(str(COMMITTED / "smollm2" / "sweep-8-heldout"))
    assert now["upgraded_from"] == 2 and now["format_version"] == 3
    assert now["top1_delta_ppl_ci95"] == stored["top1_delta_ppl_ci95"]
    assert [c["delta_ppl_ci95"] for c in now["curve"]] == [c["delta_ppl_ci95"] for c in stored["curve"]]
    assert [c["recovered_pct_ci95"] for c in now["curve"]] == [c["recovered_pct_ci95"] for c in stored["curve"]]
    assert (now["verdict"]["outcome"], now["verdict"]["best_d_r"], now["verdict"]["settled"]) == ("PARTIAL", 32, True)
    scan = load_results(str(COMMITTED / "gemma3-270m" / "scan-2"))
    assert scan["bootstrap"]["n_blocks"] == 2 and len(scan["layers"]) == 18
    assert {e["verdict"]["reason"] for e in scan["layers"]} == {"too_few_blocks"}
    assert all(e["top1_delta_ppl_ci95"] is None and e["verdict"]["settled"] is False for e in scan["layers"])


def test_committed_report_txt_is_what_nqpq_report_prints(tmp_path, capsys):
    """Each committed run's report.txt is ``nqpq report DIR``'s output (re-made after the upgrade)."""
    for run_dir in sorted(COMMITTED.glob("*/*/results.json")):
        copy_dir = tmp_path / run_dir.parent.parent.name / run_dir.parent.name
        shutil.copytree(run_dir.parent, copy_dir)
        assert cli_main(["report", str(copy_dir)]) == 0
        printed = capsys.readouterr().out.replace(str(copy_dir), str(run_dir.parent.relative_to(REPO)))
        assert printed == (run_dir.parent / "report.txt").read_text(), run_dir.parent

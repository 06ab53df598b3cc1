"""The results comparison that proves a refactor left results unchanged (``benchmarks.compare_results``)."""

import copy
import json

import torch

from benchmarks.compare_results import differences, main

RESULTS = {"kind": "sweep", "ppl_baseline": 20.5, "curve": [{"d_r": 4, "ppl": 21.25}], "verdict": "PASS",
           "config": {"out": "/tmp/a", "layers": [9, 10, 11]}, "timings": {"total_s": 1.0},
           "sinks": [{"sink_tokens": 0, "recovered": None}, {"sink_tokens": 1, "recovered": float("nan")}]}


def test_timings_and_out_folder_are_ignored():
    other = copy.deepcopy(RESULTS)
    other["timings"] = {"total_s": 2.0, "baseline_s": 1.5}
    other["config"]["out"] = "/tmp/b"
    assert differences(RESULTS, other) == []


def test_every_other_change_is_named_by_its_path():
    other = copy.deepcopy(RESULTS)
    other["curve"][0]["ppl"] = 21.250000000000004  # one ulp: compared exactly
    other["config"]["layers"] = [9, 10]
    other["sinks"][0]["recovered"] = 0.0
    other["extra"] = 1
    assert differences(RESULTS, other) == [
        "config.layers: 3 entries before, 2 after",
        "curve[0].ppl: 21.25 before, 21.250000000000004 after",
        "extra: only in after",
        "sinks[0].recovered: None before, 0.0 after",
    ]
    assert differences({"x": 1}, {"x": 1.0}) == ["x: 1 before, 1.0 after"]  # an int become a float is a change


def test_folders_with_their_bases(tmp_path, capsys):
    for name, scale in (("a", 1.0), ("b", 1.0), ("c", 2.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(RESULTS))
        basis = {"basis": {9: torch.eye(2) * scale}, "r90": {9: torch.ones(2)}}
        torch.save(basis, tmp_path / name / "basis.pt")
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert main([str(tmp_path / "a"), str(tmp_path / "c" / "results.json")]) == 1
    assert "basis.pt basis[9] differs" in capsys.readouterr().out

"""The CLI around named models and shipped texts: `nqpq models`, and the one-line refusals (exit 2, nothing written)
of a mistyped model name offline, an unknown text name, and two flags naming the same text."""

from __future__ import annotations

import pytest

from nqpq.cli import main
from nqpq.sources import hub


def test_models_lists_every_name(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "size", "family", "geometry", "cached"]
    rows = {line.split()[0]: line for line in out[1:-1]}
    assert set(rows) == {"smollm2-135m", "gemma3-270m"}
    assert "llama" in rows["smollm2-135m"] and "gemma3_text" in rows["gemma3-270m"]
    assert rows["gemma3-270m"].split()[-1] in ("yes", "no") and out[-1].startswith("cache: ")


def one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("nqpq: error: "), err
    return lines[0]


def test_unknown_model_offline_names_the_first_command_and_the_names(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    out = tmp_path / "runs" / "x"
    line = one_line_error(capsys, ["sweep", "--model", "smollm2-135", "--text", "wikitext-103-valid", "--n-blocks",
                                   "1", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert "nqpq sweep --model smollm2-135m --out runs/smollm2" in line
    assert "smollm2-135m, gemma3-270m" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--text", "wikitext-2"], "--text 'wikitext-2': nqpq ships wikitext-103-valid, wikitext-103-test"),
    (["--calib-text", "wiki"], "--calib-text 'wiki': nqpq ships wikitext-103-valid, wikitext-103-test"),
    (["--text", "wikitext-103-valid", "--text-file", "x.raw"], "--text-file and --text both name the text"),
    (["--calib-text", "wikitext-103-test", "--calib-text-file", "x.raw"],
     "--calib-text-file and --calib-text both name the text"),
    (["--calib-text", "wikitext-103-test", "--calib-from", "eval"], "--calib-text calibrates on another text"),
])
def test_bad_text_flags_refused_before_loading(tmp_path, capsys, flags, needle):
    out = tmp_path / "runs" / "x"
    line = one_line_error(capsys, ["sweep", "--model", "smollm2-135m", *flags, "--device", "cpu", "--no-progress",
                                   "--out", str(out)])
    assert needle in line, line
    assert not (tmp_path / "runs").exists()

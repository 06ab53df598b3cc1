"""The CLI around named models and shipped texts: `nqpq models`, and the one-line refusals (exit 2, nothing written)
of a mistyped model name, flags the named model cannot take (before anything is fetched), an unknown text name, and
two flags naming the same text."""

from __future__ import annotations

import re

import pytest

from nqpq.cli import main
from nqpq.experiments import setup
from nqpq.sources import checkpoints, fetch, hub
from nqpq.sources.registry import MODELS


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


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if anything is fetched, or any tokenizer, config or weight is read."""
    def refuse(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} was called before the refusal")
        return fail

    monkeypatch.setattr(fetch, "fetch_model", refuse("fetch_model"))
    monkeypatch.setattr(checkpoints, "load_config", refuse("load_config"))
    for name in ("load_model", "load_tokenizer", "demo_model"):
        monkeypatch.setattr(setup, name, refuse(name))
    monkeypatch.setattr(hub, "hub_reachable", refuse("hub_reachable"))


@pytest.mark.parametrize("name", ["smollm3-135m", "smollm2-135", "gemma-270m"])
def test_unknown_bare_model_name_is_refused_by_name(name, tmp_path, capsys, nothing_loads):
    """A bare name (no '/') that is no registry name, no path, no owner-less hub model and not in the hub cache: one
    line naming it and the known names, before the hub, a tokenizer or a weight is asked for."""
    out = tmp_path / "runs" / "x"
    line = one_line_error(capsys, ["sweep", "--model", name, "--text", "wikitext-103-valid", "--n-blocks", "1",
                                   "--device", "cpu", "--no-progress", "--out", str(out)])
    assert line == (f"nqpq: error: unknown model name {name!r}; known: smollm2-135m, gemma3-270m (or a local "
                    "directory / hub id org/name; nqpq models lists the known names)")
    assert not (tmp_path / "runs").exists()


def test_unknown_hub_id_offline_names_the_first_command_and_the_names(tmp_path, capsys, monkeypatch):
    """A hub id (owner/name) the unreachable hub cannot give: the first command that works offline and the names."""
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    out = tmp_path / "runs" / "x"
    line = one_line_error(capsys, ["sweep", "--model", "HuggingFaceTB/smollm2-135", "--text", "wikitext-103-valid",
                                   "--n-blocks", "1", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert "nqpq sweep --model smollm2-135m --out runs/smollm2" in line
    assert "smollm2-135m, gemma3-270m" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["sweep", "scan"])
@pytest.mark.parametrize("model, flags, needle", [
    ("smollm2-135m", ["--layers", "99"], "--layers [99]: the model has layers 0..29"),
    ("smollm2-135m", ["--layers", "3", "30"], "--layers [30]: the model has layers 0..29"),
    ("smollm2-135m", ["--d-r", "8", "65"], "--d-r [65]: each d_r must be in 1..64 (the head "
     "dimension; rank 0 is top-1)"),
    ("gemma3-270m", ["--layers", "18"], "--layers [18]: the model has layers 0..17"),
    ("gemma3-270m", ["--d-r", "257"], "--d-r [257]: each d_r must be in 1..256 (the head "
     "dimension; rank 0 is top-1)"),
    ("smollm2-135m", ["--layers", "29", "--heads", "29:0,9"], "--heads: the heads of layer 29 [9]: layer 29 has "
     "query heads 0..8"),
    ("gemma3-270m", ["--layers", "16", "17", "--heads", "17:4"], "--heads: the heads of layer 17 [4]: layer 17 has "
     "query heads 0..3"),
])
def test_flags_a_named_model_cannot_take_are_refused_before_fetching(command, model, flags, needle, tmp_path, capsys,
                                                                      nothing_loads):
    """The registry's geometry answers --layers and --d-r: nothing is fetched, no tokenizer or weight read."""
    out = tmp_path / "runs" / "x"
    line = one_line_error(capsys, [command, "--model", model, *flags, "--n-blocks", "4", "--device", "cpu",
                                   "--no-progress", "--out", str(out)])
    assert line == f"nqpq: error: {needle}"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_head_indices_a_named_model_lacks_are_refused_before_fetching(command, tmp_path, capsys, nothing_loads):
    """nqpq eval and nqpq generate check --heads against the registry's geometry as the sweep does: nothing fetched,
    no tokenizer, config or weight read."""
    out = tmp_path / "runs" / "x"
    flags = ["--tasks", "hellaswag"] if command == "eval" else ["--prompt", "x"]
    line = one_line_error(capsys, [command, "--model", "smollm2-135m", *flags, "--layers", "29", "--heads", "29:9",
                                   "--device", "cpu", "--out", str(out)])
    assert line == "nqpq: error: --heads: the heads of layer 29 [9]: layer 29 has query heads 0..8"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("model", list(MODELS.values()), ids=lambda m: m.name)
def test_registry_geometry_fields_agree_with_its_description(model):
    """n_layers, head_dim and n_heads (what flags are checked against before fetching) are the numbers `nqpq models`
    shows; tests/test_real_model.py checks SmolLM2's against the loaded checkpoint."""
    assert re.match(rf"{model.n_layers} layers, Hq {model.n_heads}, ", model.geometry), model.geometry
    assert f" D {model.head_dim}," in model.geometry, model.geometry


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

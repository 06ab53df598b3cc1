"""The packaged WikiText (nqpq/sources/wikitext): the spec's bytes, named by --text, and the offline default."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from nqpq.errors import NqpqError
from nqpq.sources import text

# The published digests of WikiText-103 raw validation and test (nqpq/sources/wikitext/README.md lists how they were
# checked).
SHA256 = {"wikitext-103-valid": "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
          "wikitext-103-test": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"}
LINES = {"wikitext-103-valid": 3760, "wikitext-103-test": 4358}


@pytest.mark.parametrize("name", sorted(SHA256))
def test_packaged_splits_are_wikitext_byte_for_byte(name):
    data = Path(text.packaged_text(name)).read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHA256[name]
    assert data.count(b"\n") == LINES[name] and b"\r" not in data
    license_file = Path(text.packaged_text(name)).parent / "README.md"
    assert "CC BY-SA 3.0" in license_file.read_text(encoding="utf-8")


def test_packaged_rows_are_the_files_lines():
    rows, label = text.text_rows(None, "wikitext-103-test", demo=False)
    rows = list(rows)
    assert len(rows) == LINES["wikitext-103-test"] and rows[1] == " = Robert Boulter = \n"
    assert label == "wikitext-103-test (WikiText-103 raw test, packaged with nqpq)"
    assert "/" not in label


def test_offline_default_is_the_packaged_validation_split(monkeypatch):
    """No --text-file/--text, hub unreachable: the packaged validation split, and the label says why."""
    monkeypatch.setattr(text, "hub_reachable", lambda: False)
    monkeypatch.setattr(text, "rows_from_hub", lambda: pytest.fail("asked the unreachable hub"))
    rows, label = text.text_rows(None, None, demo=False)
    assert next(iter(rows)) == " \n" and "wikitext-103-valid" in label and "hub is unreachable" in label


def test_reachable_hub_stays_the_default(monkeypatch):
    monkeypatch.setattr(text, "hub_reachable", lambda: True)
    monkeypatch.setattr(text, "rows_from_hub", lambda: iter(["hub row\n"]))
    rows, label = text.text_rows(None, None, demo=False)
    assert list(rows) == ["hub row\n"] and label == text.HUB_TEXT


def test_a_file_and_the_demo_come_first(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "hub_reachable", lambda: pytest.fail("asked the hub"))
    path = tmp_path / "t.raw"
    path.write_text("a\nb\n", encoding="utf-8")
    rows, label = text.text_rows(str(path), None, demo=True)
    assert list(rows) == ["a\n", "b\n"] and label == str(path)
    rows, label = text.text_rows(None, None, demo=True)
    assert next(iter(rows)) and "demo" in label


def test_calibration_text_by_name_or_file(tmp_path):
    assert text.calib_text_rows(None, None) is None
    rows, label = text.calib_text_rows(None, "wikitext-103-test")
    assert next(iter(rows)) == " \n" and label.startswith("wikitext-103-test ")
    with pytest.raises(NqpqError, match=r"--calib-text 'wiki': nqpq ships wikitext-103-valid, wikitext-103-test"):
        text.calib_text_rows(None, "wiki")


def test_unknown_text_name_lists_the_known_ones():
    with pytest.raises(NqpqError, match=r"^--text 'wikitext-2': nqpq ships wikitext-103-valid, wikitext-103-test"):
        text.packaged_text("wikitext-2")


def test_a_sweep_on_the_packaged_texts_equals_one_on_their_files(saved_model, real_files, tmp_path):
    """--text / --calib-text read the same bytes as --text-file / --calib-text-file on copies of the files elsewhere:
    the same results, number for number; results.json names the packaged texts, not a path."""
    import shutil

    from nqpq import SweepConfig, run_sweep

    model_dir, _ = saved_model
    valid, test = shutil.copy(real_files.wiki_valid, tmp_path), shutil.copy(real_files.wiki_test, tmp_path)
    common = dict(model=str(model_dir), layers=[3], d_r=[2], n_blocks=2, seq_len=16, calib_blocks=1, device="cpu",
                  batch_size=2, progress=False)
    by_name = run_sweep(SweepConfig(**common, text="wikitext-103-valid", calib_text="wikitext-103-test"),
                        log=lambda line: None)
    by_file = run_sweep(SweepConfig(**common, text_file=str(valid), calib_text_file=str(test)), log=lambda line: None)
    for key in ("ppl_baseline", "ppl_top1", "ppl_full", "curve", "spectrum", "block_losses"):
        assert by_name[key] == by_file[key], key
    cfg = by_name["config"]
    assert cfg["text_source"] == "wikitext-103-valid (WikiText-103 raw validation, packaged with nqpq)"
    assert cfg["calibration"]["source"] == "text"
    assert cfg["calibration"]["text"] == "wikitext-103-test (WikiText-103 raw test, packaged with nqpq)"

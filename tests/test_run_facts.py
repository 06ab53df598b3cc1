"""Facts found once (issue 33): a run finds the model's parts once (``nqpq.experiments.setup.run_facts``) and passes
them down to the baseline observation, the calibration passes, the prefix runner and every crystallization, instead
of each re-deriving them (``model_parts`` ran 22 times in a default sweep, plus 2 per batch)."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch

import nqpq.model.parts as parts_module
from nqpq.cli import main
from nqpq.experiments.config import SweepConfig
from nqpq.experiments.scan import run_scan
from nqpq.experiments.sweep import run_sweep

ORIGINAL = parts_module.model_parts


@pytest.fixture
def parts_calls(monkeypatch) -> Counter:
    """Every call of ``model_parts`` wherever nqpq bound the name, counted by the model it was given (its id); calls
    on a model built on the meta device (``config_parts``: the config's geometry, checked before any weight loads)
    are counted under "meta"."""
    calls: Counter = Counter()

    def counted(model):
        on_meta = any(p.is_meta for p in model.parameters())
        calls["meta" if on_meta else id(model)] += 1
        return ORIGINAL(model)

    for name, module in list(sys.modules.items()):
        if (name == "nqpq" or name.startswith("nqpq.")) and getattr(module, "model_parts", None) is ORIGINAL:
            monkeypatch.setattr(module, "model_parts", counted)
    return calls


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).eval()


def test_demo_sweep_finds_the_parts_once(parts_calls, tmp_path, capsys):
    """The issue's demo sweep (two sink settings, held-out calibration: a calibration pass of its own), from the
    CLI: one ``model_parts`` of the loaded model, and one of the config's meta model before loading."""
    code = main(["sweep", "--demo", "--n-blocks", "4", "--seq-len", "32", "--calib-blocks", "2", "--d-r", "4", "16",
                 "--sink-tokens", "0", "1", "--layers", "10", "11", "--batch-size", "2", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    loaded = {k: v for k, v in parts_calls.items() if k != "meta"}
    assert list(loaded.values()) == [1], parts_calls
    assert parts_calls["meta"] == 1, parts_calls


@pytest.mark.parametrize("calib_from", ["eval", "heldout"])
def test_sweep_and_scan_of_a_given_model_find_its_parts_once(parts_calls, calib_from):
    """A model passed in (no pre-load check): exactly one ``model_parts`` per run, sweep or scan, whether the basis
    rides along the baseline pass (eval) or takes a calibration pass of its own (heldout), over several batches."""
    model = tiny_llama()
    ids = torch.randint(0, 64, (10 * 16,), generator=torch.Generator().manual_seed(1))
    cfg = SweepConfig(model="tiny llama", d_r=(2, 4), n_blocks=6, seq_len=16, calib_blocks=2, calib_from=calib_from,
                      sink_tokens=(0, 1), batch_size=2, device="cpu", backend="torch", progress=False)
    run_sweep(cfg, model=model, ids=ids, log=lambda *_: None)
    assert parts_calls == Counter({id(model): 1})
    parts_calls.clear()
    run_scan(cfg, model=model, ids=ids, log=lambda *_: None)
    assert parts_calls == Counter({id(model): 1})


def test_entry_points_called_alone_still_find_the_parts(parts_calls):
    """``crystallize`` and ``calibrate`` called alone derive the parts themselves (the argument is optional)."""
    from nqpq import calibrate, crystallize

    model = tiny_llama()
    blocks = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    with crystallize(model, [1], mode="top1", backend="torch"):
        pass
    assert parts_calls == Counter({id(model): 1})
    basis = calibrate(model, blocks, [1, 2], backend="torch")
    assert basis.layers == [1, 2] and parts_calls == Counter({id(model): 2})

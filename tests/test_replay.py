"""The prefix replay of bodies that do more than "layer after layer, then one final module": Dory (recurrent loops
that mix the input section's output back in), HY-V4 (hyper-connection streams folded by ``hc_head``) and Gemma 3n
(AltUp streams unstacked after the last layer, per-layer inputs, key/value states shared between layers).

``PrefixRunner`` replays them by the body's own forward with the lower layer calls short-circuited; each check
compares with the model's own forward (float64 losses of its logits) or, for top-1, with the census's float64
per-head computation on the q, k, v the layer received.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from nqpq import PrefixRunner, block_losses, crystallize
from nqpq.model.parts import model_parts

FAMILIES = ("dory", "hy_v4", "gemma3n_text")


def tiny_model(family: str) -> torch.nn.Module:
    """The census's tiny random model of ``family`` (its own defaults, shrunk); Dory with a real recurrent section
    (layer 0 in, layers 1-3 looped twice, layer 4 out), which the census's shrunk layer counts leave empty."""
    from nqpq.model.tiny_models import tiny_config

    config = tiny_config(family)
    if family == "dory":
        config = type(config)(**{**config.to_dict(), "num_hidden_layers": 5, "n_input_layers": 1,
                                 "n_recurrent_layers": 3, "n_output_layers": 1, "n_recurrent_loops": 2,
                                 "layer_types": ["sliding_attention"] * 5})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.float().eval()


def blocks(n: int) -> torch.Tensor:
    return torch.randint(3, 256, (n, 24), generator=torch.Generator().manual_seed(0))


def model_losses(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-block mean next-token loss of the model's own logits, in float64."""
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].double().flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
        ids.shape[0], -1).mean(1)


def starts_of(family: str, parts) -> tuple[int, int]:
    # Dory: layer 2 is the middle of the looped section (its first call comes after layer 1's, and the loops need
    # the input section's output as well: every lower call's output matters), layer 4 its output layer.
    return (2, 4) if family == "dory" else (parts.attn_layers[1], parts.attn_layers[-1])


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_body_replay_equals_the_model(family):
    """Baseline and replays from two start layers give the model's own losses; crystallized layers give what the
    model gives under the same crystallization (full mode: its own losses; top-1: a real change)."""
    model = tiny_model(family)
    parts = model_parts(model)
    ids = blocks(5)
    starts = starts_of(family, parts)
    runner = PrefixRunner(model, ids, [slice(0, 2), slice(2, 4), slice(4, 5)], start=starts)
    want = model_losses(model, ids)
    baseline = runner.capture_baseline()
    assert runner._via_body  # the direct replay cannot express these bodies
    torch.testing.assert_close(baseline, want, rtol=1e-6, atol=0)
    for s in starts:
        torch.testing.assert_close(runner.losses(start=s), want, rtol=1e-6, atol=0)
        upper = [li for li in parts.attn_layers if li >= s]
        with crystallize(model, upper, mode="full", backend="torch"):
            torch.testing.assert_close(runner.losses(start=s), want, rtol=1e-5, atol=0)
        with crystallize(model, [s], mode="top1", backend="torch"):
            got = runner.losses(start=s)
            # Same batches, same arithmetic: the replay computes the full forward's attention inputs.
            torch.testing.assert_close(got, model_losses(model, ids), rtol=1e-6, atol=0)
        assert (got - want).abs().max() > 1e-4  # top-1 changed the losses: the replay ran the crystallized layer
    assert not any("forward" in layer.__dict__ for layer in parts.layers)  # no short-circuit left behind


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_census_checks_pass(family):
    """The census's checks (full mode on the last / every attention layer, the replay, top-1 and low-rank against
    float64 on the q, k, v received) on the census's own tiny model: all within its tolerance."""
    from nqpq.model.census import TOL, crystallized_checks, sharpen

    model = tiny_model(family)
    parts = model_parts(model)
    ids = blocks(2)
    errors = crystallized_checks(model, parts, ids, "eager", modes=True)
    sharpen(parts)
    errors.update(crystallized_checks(model, parts, ids, "eager sharp", modes=True))
    assert max(errors.values()) <= TOL, {k: v for k, v in errors.items() if v > TOL}


@torch.no_grad()
def test_gemma3n_shared_key_values_are_written_by_the_short_circuited_layers():
    """Gemma 3n's last layers read the keys and values an earlier layer stored in a dict the body hands every layer;
    a short-circuited layer writes its baseline entries there, so a replay from a layer that reads them is the
    model."""
    model = tiny_model("gemma3n_text")
    assert model.config.num_kv_shared_layers == 2
    ids = blocks(2)
    runner = PrefixRunner(model, ids, [slice(0, 2)], start=5)
    want = model_losses(model, ids)
    torch.testing.assert_close(runner.capture_baseline(), want, rtol=1e-6, atol=0)
    written = [w for _, writes in runner._lower[0] for w in writes]
    assert written  # the layers that share their keys and values wrote them
    torch.testing.assert_close(runner.losses(), want, rtol=1e-6, atol=0)


@torch.no_grad()
def test_body_replay_under_an_offloading_hook(tmp_path):
    """A disk-offloaded model (accelerate's hooks on every module, weights loaded per call): the short-circuited
    layers return their records without loading anything, the others run under their hooks."""
    from accelerate import dispatch_model

    model = tiny_model("hy_v4")
    ids = blocks(3)
    want = model_losses(model, ids)
    # Layers 0, 2 and 4 on disk (accelerate loads their weights per call), the rest of the model on the cpu.
    device_map = {f"model.{name}": "cpu" for name, _ in model.model.named_children() if name != "layers"}
    device_map.update({f"model.layers.{i}": "disk" if i % 2 == 0 else "cpu" for i in range(len(model.model.layers))})
    device_map["lm_head"] = "cpu"
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "off"))
    assert model.model.layers[0].self_attn.q_a_proj.weight.device.type == "meta"  # really offloaded
    parts = model_parts(model)
    hooked = [layer.__dict__.get("forward") for layer in parts.layers]  # accelerate's wrappers
    assert all(f is not None for f in hooked)
    starts = starts_of("hy_v4", parts)
    runner = PrefixRunner(model, ids, [slice(0, 2), slice(2, 3)], start=starts, record_budget=0)
    torch.testing.assert_close(runner.capture_baseline(), want, rtol=1e-6, atol=0)
    for s in starts:
        torch.testing.assert_close(runner.losses(start=s), want, rtol=1e-6, atol=0)
        with crystallize(model, [s], mode="top1", backend="torch"):
            torch.testing.assert_close(runner.losses(start=s), block_losses(model, ids, 2), rtol=1e-6, atol=0)
    # accelerate's wrappers are back in place, no short-circuit left
    assert all(layer.__dict__.get("forward") is f for layer, f in zip(parts.layers, hooked))


@torch.no_grad()
def test_sweep_and_scan_on_a_looping_body():
    """The sweep on Dory (baseline and top-1 by the body-forward replay) gives the model's own block losses, plain
    and with the default layer crystallized; the scan covers its attention layers."""
    from nqpq import make_blocks
    from nqpq.experiments.config import SweepConfig
    from nqpq.experiments.scan import run_scan
    from nqpq.experiments.sweep import run_sweep

    model = tiny_model("dory")
    ids = torch.randint(3, 256, (400,), generator=torch.Generator().manual_seed(1))
    common = dict(d_r=(1, 4), n_blocks=4, seq_len=24, calib_blocks=2, device="cpu", batch_size=2, progress=False,
                  backend="torch")
    results = run_sweep(SweepConfig(**common), model=model, ids=ids, log=lambda *_: None)
    layers = results["config"]["layers"]
    assert layers == [4]
    scored = make_blocks(ids, 24, 4)
    torch.testing.assert_close(torch.tensor(results["block_losses"]["baseline"], dtype=torch.float64),
                               block_losses(model, scored, 2), rtol=1e-6, atol=0)
    with crystallize(model, layers, mode="top1", backend="torch"):
        want = block_losses(model, scored, 2)
    torch.testing.assert_close(torch.tensor(results["block_losses"]["top1"], dtype=torch.float64), want,
                               rtol=1e-6, atol=0)
    scan = run_scan(SweepConfig(**common), model=model, ids=ids, log=lambda *_: None)
    assert [row["layer"] for row in scan["layers"]] == list(model_parts(model).attn_layers)

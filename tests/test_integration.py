"""crystallize / crystallize_layers / uncrystallize on a tiny random GPT-2 (eager and sdpa)."""

from __future__ import annotations

import inspect
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import (
    HEAD_DIM,
    N_HEAD,
    N_LAYER,
    REPO,
    assert_clear_argmax,
    build_model,
    gpt2_scores,
    score_margins,
    tiny_config,
)
from transformers import GPT2LMHeadModel

from nqpq import GramAccumulator, crystallize, crystallize_layers, uncrystallize
from nqpq.model.crystallize import observe_residuals

SPEC_ATTR = "_nqpq_layer_spec"


def batch(vocab=300, B=2, T=40, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def random_basis(layers, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {li: torch.linalg.qr(torch.randn(N_HEAD, HEAD_DIM, HEAD_DIM, generator=g))[0] for li in layers}


@torch.no_grad()
def logits(model, ids, **kw):
    return model(input_ids=ids, use_cache=False, **kw).logits


def max_diff(a, b):
    return (a - b).abs().max().item()


@torch.no_grad()
def test_full_mode_equals_unpatched_model(model):
    ids = batch()
    base = logits(model, ids)
    for layers in ([0], [2], [1, 3], [0, 1, 2, 3]):
        with crystallize(model, layers, mode="full", backend="torch"):
            assert max_diff(logits(model, ids), base) <= 1e-5, layers


@torch.no_grad()
@pytest.mark.parametrize("option", ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "no_scaling"])
def test_full_mode_with_gpt2_attention_options(option):
    """The scale GPT-2 hands the attention function (layer-index scaling, or none) is the one used."""
    kwargs = {"scale_attn_weights": False} if option == "no_scaling" else {option: True}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(tiny_config(**kwargs)).eval()
    ids = batch()
    base = logits(model, ids)
    with crystallize(model, [1, 3], mode="full", backend="torch"):
        assert max_diff(logits(model, ids), base) <= 1e-5
    with crystallize(model, [1, 3], mode="top1", backend="torch"):
        assert max_diff(logits(model, ids), base) > 1e-3


@torch.no_grad()
def test_lowrank_limits(model):
    ids, layers = batch(), [1, 3]
    basis = random_basis(layers)
    with crystallize(model, layers, mode="full", backend="torch"):
        full = logits(model, ids)
    with crystallize(model, layers, mode="top1", backend="torch"):
        top1 = logits(model, ids)
    with crystallize(model, layers, mode="lowrank", basis=basis, d_r=HEAD_DIM, backend="torch"):
        assert max_diff(logits(model, ids), full) <= 1e-5
    with crystallize(model, layers, mode="lowrank", basis=basis, d_r=0, backend="torch"):
        assert max_diff(logits(model, ids), top1) <= 1e-5
    assert max_diff(top1, full) > 1e-2  # top-1 really changes the model


@torch.no_grad()
def test_leaving_restores_model_exactly(model):
    ids = batch()
    original = model.config._attn_implementation
    base = logits(model, ids)
    with crystallize(model, [1, 2], mode="top1", backend="torch"):
        # Only the crystallized modules carry their own config naming nqpq's function; the model's is untouched.
        assert model.config._attn_implementation == original
        names = [block.attn.config._attn_implementation for block in model.transformer.h]
        assert names == [original, "nqpq_" + original, "nqpq_" + original, original]
        assert model.transformer.h[0].attn.config is model.config
        assert not torch.equal(logits(model, ids), base)
    assert model.config._attn_implementation == original
    assert all(block.attn.config is model.config for block in model.transformer.h)
    assert not any(hasattr(block.attn, SPEC_ATTR) for block in model.transformer.h)
    assert torch.equal(logits(model, ids), base)

    patch = crystallize_layers(model, [3], mode="top1", backend="torch")
    assert hasattr(model.transformer.h[3].attn, SPEC_ATTR)
    uncrystallize(patch)
    assert model.config._attn_implementation == original
    assert torch.equal(logits(model, ids), base)


@torch.no_grad()
def test_context_restores_after_an_error(model):
    original = model.config._attn_implementation
    with pytest.raises(KeyError), crystallize(model, [1], mode="top1", backend="torch"):
        raise KeyError("boom")
    assert model.config._attn_implementation == original
    assert not hasattr(model.transformer.h[1].attn, SPEC_ATTR)


@torch.no_grad()
def test_other_layers_untouched(model):
    """Blocks below the crystallized one give identical outputs; those above still run the original attention."""
    ids = batch()
    captured = {}

    def keep(i):
        def hook(module, args, kwargs, output):
            captured[i] = (args, kwargs, output)
        return hook

    blocks = model.transformer.h
    handles = [block.attn.register_forward_hook(keep(i), with_kwargs=True) for i, block in enumerate(blocks)]
    try:
        logits(model, ids)
        base = dict(captured)
        with crystallize(model, [2], mode="top1", backend="torch"):
            assert [hasattr(b.attn, SPEC_ATTR) for b in model.transformer.h] == [False, False, True, False]
            logits(model, ids)
        crystal = dict(captured)
    finally:
        for h in handles:
            h.remove()
    for i in (0, 1):
        assert torch.equal(crystal[i][2][0], base[i][2][0])
    assert not torch.equal(crystal[2][2][0], base[2][2][0])
    # Layer 3 saw other inputs, but computed them with the model's own attention.
    args, kwargs, output = crystal[3]
    assert torch.equal(model.transformer.h[3].attn(*args, **kwargs)[0], output[0])


def plain_attention(module, hidden, mode, basis=None, d_r=None):
    """GPT-2 attention with residual replacement, as the spec computes it, in float64 per head."""
    B, T, C = hidden.shape
    q, k, v = (x.view(B, T, N_HEAD, HEAD_DIM).transpose(1, 2).double()
               for x in module.c_attn(hidden).split(C, dim=2))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    out = torch.empty(B, N_HEAD, T, HEAD_DIM, dtype=torch.float64)
    for b in range(B):
        for h in range(N_HEAD):
            p = (q[b, h] @ k[b, h].T / math.sqrt(HEAD_DIM)).masked_fill(~causal, -math.inf).softmax(-1)
            ctx, v_star = p @ v[b, h], v[b, h][p.argmax(-1)]
            if mode == "top1":
                out[b, h] = v_star
            elif mode == "full":
                out[b, h] = ctx
            else:
                P = basis[h, :, :d_r].double()
                out[b, h] = v_star + (ctx - v_star) @ P @ P.T
    merged = out.transpose(1, 2).reshape(B, T, C).to(hidden.dtype)
    return module.c_proj(merged)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["top1", "full", "lowrank"])
def test_matches_hand_computed_attention(model, mode):
    """The crystallized model equals the unpatched model with the layers' attention recomputed by hand."""
    ids, layers, d_r = batch(T=50), [1, 3], 3
    basis = random_basis(layers)

    def replace(li):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            return (plain_attention(module, hidden, mode, basis[li], d_r), *output[1:])
        return hook

    handles = [model.transformer.h[li].attn.register_forward_hook(replace(li), with_kwargs=True) for li in layers]
    try:
        with score_margins(model, layers) as hand_gaps:
            want = logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    with crystallize(model, layers, mode=mode, basis=basis, d_r=d_r, backend="torch"), \
            score_margins(model, layers) as crystal_gaps:
        got = logits(model, ids)
    # float64 (hand) and fp32 (ours) feed layer 3 inputs ~1e-6 apart: both must pick the same i*.
    assert_clear_argmax(hand_gaps + crystal_gaps)
    assert max_diff(got, want) <= 1e-5
    if mode == "top1":
        assert max_diff(got, logits(model, ids)) > 1e-2


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_equals_each_sequence_alone(model, side):
    """Issue 34 item 4: left or right padding through the model's attention mask; each row's real positions give the
    logits of its sequence alone (position_ids from the mask, as generate builds them), and a custom 4-D mask is
    still refused by name."""
    ids = batch(B=3, T=12)
    lengths = [12, 7, 3]
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1 if side == "right" else 0
        if side == "left":
            mask[b, 12 - n:] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with crystallize(model, [1, 2], mode="lowrank", basis=random_basis([1, 2]), d_r=4, backend="torch"):
        padded = logits(model, ids, attention_mask=mask, position_ids=position_ids)
        for b, n in enumerate(lengths):
            real = slice(0, n) if side == "right" else slice(12 - n, 12)
            alone = logits(model, ids[b:b + 1, real])
            assert max_diff(padded[b:b + 1, real], alone) <= 1e-4
        with pytest.raises(ValueError, match="custom attention mask"):
            logits(model, ids, attention_mask=torch.zeros(3, 1, 12, 12))  # bidirectional: not causal


@torch.no_grad()
def test_kv_cache_equals_the_recompute(model):
    """Issue 34 item 3: a step with a KV cache gives the logits of the whole sequence recomputed, and generate its
    tokens."""
    ids = batch(B=1, T=8)
    cache_kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    with crystallize(model, [1], mode="top1", backend="torch"):
        out = model(input_ids=ids[:, :5], use_cache=True)
        step = model(input_ids=ids[:, 5:6], use_cache=True, **{cache_kw: out.past_key_values}).logits
        assert max_diff(step, logits(model, ids[:, :6])[:, 5:6]) <= 1e-4
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
        cur = ids
        for _ in range(4):
            cur = torch.cat([cur, logits(model, cur)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(seq, cur)


@pytest.mark.parametrize("layers", [[4], [-1], [1, 1], [], [1.0], [True]])
def test_bad_layers(eager_model, layers):
    with pytest.raises(ValueError, match="layer"):
        crystallize_layers(eager_model, layers, mode="top1", backend="torch")
    assert eager_model.config._attn_implementation == "eager"


def test_bad_mode_and_lowrank_arguments(eager_model):
    basis = random_basis([1])
    with pytest.raises(ValueError, match="mode must be one of"):
        crystallize_layers(eager_model, [1], mode="softmax", backend="torch")
    with pytest.raises(ValueError, match=r"mode must be one of .*got Tensor\(40, 40\) torch\.float32$"):
        crystallize_layers(eager_model, [1], mode=torch.zeros(40, 40), backend="torch")  # named, never printed
    with pytest.raises(ValueError, match="needs a residual basis for layers \\[2\\]"):
        crystallize_layers(eager_model, [1, 2], mode="lowrank", basis=basis, d_r=2, backend="torch")
    with pytest.raises(ValueError, match="needs a residual basis"):
        crystallize_layers(eager_model, [1], mode="lowrank", d_r=2, backend="torch")
    for d_r in (-1, HEAD_DIM + 1, None):
        with pytest.raises(ValueError, match="d_r must be an int in 0..16"):
            crystallize_layers(eager_model, [1], mode="lowrank", basis=basis, d_r=d_r, backend="torch")
    with pytest.raises(ValueError, match=r"basis for layer 1 must be \[H=4, D=16, R\]"):
        crystallize_layers(eager_model, [1], mode="lowrank", basis={1: torch.randn(4, 8, 8)}, d_r=2, backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        crystallize_layers(eager_model, [1], mode="top1", backend="jax")
    assert eager_model.config._attn_implementation == "eager"
    assert not any(hasattr(block.attn, SPEC_ATTR) for block in eager_model.transformer.h)


def test_nesting_refused(model):
    original = model.config._attn_implementation
    with crystallize(model, [1], mode="top1", backend="torch"):
        with pytest.raises(RuntimeError, match="already crystallized"):
            crystallize_layers(model, [2], mode="full", backend="torch")
        with pytest.raises(RuntimeError, match="already crystallized"), crystallize(model, [2], mode="full"):
            pass
    assert model.config._attn_implementation == original


def test_dropout_in_train_mode_refused(model):
    ids = batch()
    with crystallize(model, [1], mode="full", backend="torch"):
        model.train()
        try:
            with pytest.raises(ValueError, match="inference-only"):
                model(input_ids=ids)
        finally:
            model.eval()


@torch.no_grad()
def test_rejected_call_leaves_no_layer_crystallized(eager_model):
    """Issue 14 (1): every layer is checked before any is attached; a refused call changes nothing."""
    ids = batch()
    with crystallize(eager_model, [3], mode="top1", backend="torch"):
        want = logits(eager_model, ids)
    good = random_basis([1])[1]
    with pytest.raises(ValueError, match="basis for layer 2"):
        crystallize_layers(eager_model, [1, 2], mode="lowrank", basis={1: good, 2: torch.randn(4, 8, 8)}, d_r=1,
                           backend="torch")
    assert not any(hasattr(block.attn, SPEC_ATTR) for block in eager_model.transformer.h)
    assert all(block.attn.config is eager_model.config for block in eager_model.transformer.h)
    with crystallize(eager_model, [3], mode="top1", backend="torch"):
        assert torch.equal(logits(eager_model, ids), want)


def test_failure_while_attaching_is_undone(eager_model, monkeypatch):
    """Issue 14 (1): an exception half-way through attaching removes what was attached."""
    import nqpq.model.crystallize as integration

    real, copies = integration.copy.deepcopy, []

    def failing_second_copy(obj, *args):
        copies.append(obj)
        if len(copies) == 2:
            raise MemoryError("simulated")
        return real(obj, *args)

    monkeypatch.setattr(integration.copy, "deepcopy", failing_second_copy)
    with pytest.raises(MemoryError):
        crystallize_layers(eager_model, [1, 2], mode="top1", backend="torch")
    assert not any(hasattr(block.attn, SPEC_ATTR) for block in eager_model.transformer.h)
    assert all(block.attn.config is eager_model.config for block in eager_model.transformer.h)


@torch.no_grad()
def test_output_attentions_keeps_every_layer(eager_model):
    """Issue 14 (2): a crystallized layer reports its probabilities p; the tuple keeps one entry per layer."""
    ids = batch()
    plain = eager_model(input_ids=ids, output_attentions=True).attentions
    hidden = {}
    handle = eager_model.transformer.h[1].attn.register_forward_pre_hook(
        lambda m, args, kwargs: hidden.update(h=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        with crystallize(eager_model, [1], mode="top1", backend="torch"):
            got = eager_model(input_ids=ids, output_attentions=True).attentions
    finally:
        handle.remove()
    assert len(got) == len(plain) == N_LAYER
    assert torch.equal(got[0], plain[0])
    want = gpt2_scores(eager_model.transformer.h[1].attn, hidden["h"]).softmax(-1)
    torch.testing.assert_close(got[1].double(), want, rtol=0, atol=1e-6)


def test_output_attentions_refused_without_weights():
    """Issue 14 (2): under sdpa the model's own layers return no weights; crystallized ones refuse clearly."""
    model = build_model("sdpa")
    with torch.no_grad(), crystallize(model, [1], mode="top1", backend="torch"):
        with pytest.raises(ValueError, match="output_attentions=True.*attn_implementation='eager'"):
            model(input_ids=batch(), output_attentions=True)


@torch.no_grad()
def test_reorder_and_upcast_path_kept():
    """Issue 14 (3): fp16 GPT-2 with reorder_and_upcast_attn: observing is bit-identical to the plain model, and
    layers below a crystallized one run the model's own upcast path (bit-identical hidden states)."""
    model = build_model("eager", reorder_and_upcast_attn=True).half()
    ids = batch()
    plain = model(input_ids=ids, output_hidden_states=True)
    with observe_residuals(model, [1, 3], GramAccumulator(), backend="torch"):
        assert torch.equal(model(input_ids=ids).logits, plain.logits)
    with crystallize(model, [3], mode="full", backend="torch"):
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    for i in range(4):  # embeddings and the outputs of layers 0..2
        assert torch.equal(hidden[i], plain.hidden_states[i]), i


@torch.no_grad()
def test_flash_attention_2_model_crystallizes():
    """Issue 14 (6): a model configured for flash_attention_2 (forced; flash-attn is not installed here) gets
    nqpq's function on its crystallized modules only; the model-wide name is left alone."""
    eager, flash = build_model("eager"), build_model("eager")
    flash.config._attn_implementation = "flash_attention_2"
    ids = batch()
    with crystallize(eager, range(N_LAYER), mode="top1", backend="torch"):
        want = logits(eager, ids)
    with crystallize(flash, range(N_LAYER), mode="top1", backend="torch"):
        assert flash.config._attn_implementation == "flash_attention_2"
        assert {b.attn.config._attn_implementation for b in flash.transformer.h} == {"nqpq_flash_attention_2"}
        assert torch.equal(logits(flash, ids), want)
    assert all(b.attn.config is flash.config for b in flash.transformer.h)


@torch.no_grad()
def test_integer_types_for_layers_and_d_r(eager_model):
    """Issue 10: numpy / torch integer scalars are ints; floats and bools are not."""
    ids, basis = batch(), random_basis([1, 2])
    with crystallize(eager_model, [1, 2], mode="lowrank", basis=basis, d_r=3, backend="torch"):
        want = logits(eager_model, ids)
    with crystallize(eager_model, [np.int64(1), torch.tensor(2)], mode="lowrank", basis=basis, d_r=np.int32(3),
                     backend="torch"):
        assert torch.equal(logits(eager_model, ids), want)
    for bad in (np.float64(1.0), np.bool_(True), torch.tensor(True), torch.tensor(1.0)):
        with pytest.raises(ValueError, match="layer index must be an int"):
            crystallize_layers(eager_model, [bad], mode="top1", backend="torch")


def run_python(code: str, cwd) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("where", ["elsewhere", "checkout"])
def test_kernel_folder_installs_as_nqpq_kernels(tmp_path, where):
    # From the checkout's root too: the current directory comes first on sys.path there, and a folder named like
    # Hugging Face's `kernels` package (which transformers imports) would shadow it.
    # Elsewhere, the import finds the installed project, which need not be this folder (CI runs the suite a second time
    # from a copy of the checkout while the editable install points at the clone): the kernels come from the same
    # project as the installed nqpq. From the checkout's root, both come from this folder.
    out = run_python("""
        import importlib.util, pathlib
        import nqpq, nqpq_kernels
        print(pathlib.Path(nqpq_kernels.__file__).resolve())
        print(pathlib.Path(nqpq.__file__).resolve().parent.parent)
        spec = importlib.util.find_spec("kernels")
        print(None if spec is None else spec.origin)
    """, cwd=tmp_path if where == "elsewhere" else REPO)
    ours, project, theirs = out.splitlines()
    assert ours == str(pathlib.Path(project) / "nqpq_kernels" / "__init__.py")
    if where == "checkout":
        assert project == str(REPO.resolve())
    assert theirs == "None" or REPO not in pathlib.Path(theirs).resolve().parents


def test_nqpq_does_not_change_kernels_probe(tmp_path):
    probe = """
        {imp}
        import transformers.utils as u
        print(u.is_kernels_available() if hasattr(u, "is_kernels_available") else "absent")
    """
    without = run_python(probe.format(imp=""), cwd=tmp_path)
    with_nqpq = run_python(probe.format(imp="import nqpq, nqpq_kernels"), cwd=tmp_path)
    if without == "absent":
        pytest.skip("this transformers has no is_kernels_available")
    assert without.splitlines()[-1] == with_nqpq.splitlines()[-1]


# --- layers read as they are meant (issue 32): a choice nqpq would misread is refused, the model left as it was ---

BAD_LAYER_CHOICES = {
    # A list of lists would be read as layers of layers: heads are chosen with a mapping layer -> heads.
    "nested": ([[2, 0], [3, 1]], r"entry \[2, 0\] is not a layer index; to choose heads pass a mapping"),
    "one_element_tensor": ([torch.tensor([2])], r"is not a layer index; to choose heads pass a mapping"),
    # A mapping chooses heads (issue 36): its mistakes are named per layer.
    "heads_out_of_range": ({2: [0, N_HEAD]}, rf"^layers: the heads of layer 2 \[{N_HEAD}\]: layer 2 has query heads "
                                             rf"0..{N_HEAD - 1}$"),
    "heads_empty": ({2: []}, r"^layers: the heads of layer 2: an empty list chooses no head"),
    "heads_repeat": ({2: [1, 1]}, r"^layers: the heads of layer 2 repeats a head: \[1, 1\]$"),
    "heads_bare_int": ({2: 1}, r"^layers: the heads of layer 2 \(1\) must be a list of query-head indices"),
    "heads_layer_out_of_range": ({N_LAYER: [0]}, rf"^layers \[{N_LAYER}\]: the model has layers 0..{N_LAYER - 1}$"),
    "repeat": ([2, 3, 2], r"^layers repeats an index: \[2, 3, 2\]$"),
    "bool": ([True], r"^layers \[True\]: layer index must be an int, got bool$"),
    "float": ([2.0], r"^layers \[2.0\]: layer index must be an int, got float$"),
    "out_of_range": ([1, N_LAYER], rf"^layers \[{N_LAYER}\]: the model has layers 0..{N_LAYER - 1}$"),
    "negative": ([-1], r"^layers \[-1\]: layer indices start at 0 \(they are not counted from the end\)$"),
    "empty": ([], r"^layers: choose at least one layer$"),
    "string": ("23", r"^layers '23': pass a list of layer indices, e.g. \[9, 10, 11\], or a mapping"),
    "bare_int": (2, r"^layers 2: pass a list of layer indices"),
}


@pytest.mark.parametrize("case", sorted(BAD_LAYER_CHOICES))
def test_layer_choices_that_would_be_misread_are_refused(case, eager_model):
    """One NqpqError line (a ValueError too) from crystallize, crystallize_layers and calibrate alike; nothing is
    attached to the model."""
    from nqpq import NqpqError, calibrate

    layers, message = BAD_LAYER_CHOICES[case]
    attn = [block.attn.config._attn_implementation for block in eager_model.transformer.h]
    blocks = batch(vocab=eager_model.config.vocab_size, B=2, T=16)
    for attempt in (lambda: crystallize(eager_model, layers, mode="top1", backend="torch").__enter__(),
                    lambda: crystallize_layers(eager_model, layers, mode="top1", backend="torch"),
                    lambda: calibrate(eager_model, blocks, layers, backend="torch")):
        with pytest.raises(NqpqError, match=message) as caught:
            attempt()
        assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)
    assert [block.attn.config._attn_implementation for block in eager_model.transformer.h] == attn
    assert not any(hasattr(block.attn, SPEC_ATTR) for block in eager_model.transformer.h)


@torch.no_grad()
def test_layer_choices_of_any_integer_iterable_are_read_as_lists(eager_model):
    """A tuple, a range, a 1-D integer tensor or array, numpy/torch integer scalars: the same layers as the list."""
    ids = batch(vocab=eager_model.config.vocab_size)
    with crystallize(eager_model, [1, 3], mode="top1", backend="torch") as patch:
        want = logits(eager_model, ids)
        assert patch.layers == (1, 3)
    for layers in ((1, 3), range(1, 4, 2), torch.tensor([1, 3]), np.array([1, 3]), [np.int64(1), torch.tensor(3)]):
        with crystallize(eager_model, layers, mode="top1", backend="torch") as patch:
            assert patch.layers == (1, 3) and all(type(li) is int for li in patch.layers)
            assert torch.equal(logits(eager_model, ids), want)


# --- a model passed to run_sweep / run_scan labels the run itself (issue 32) ---

def test_a_model_passed_in_labels_the_run(eager_model, token_ids):
    """results.json and the report's checkpoint line name the model that ran: its name_or_path, class and layer
    count, never SweepConfig's default; a name the caller sets in SweepConfig.model is used as given."""
    from nqpq import SweepConfig, run_sweep
    from nqpq.experiments.scan import run_scan

    common = dict(layers=[3], d_r=[2], n_blocks=2, seq_len=16, calib_blocks=1, calib_from="eval", device="cpu",
                  backend="torch", batch_size=2, progress=False)
    ids = token_ids[: 2 * 16]
    eager_model.config.name_or_path = "someone/tiny-gpt2"
    lines: list[str] = []
    named = run_sweep(SweepConfig(**common), model=eager_model, ids=ids, log=lines.append)["config"]
    assert named["model"] == f"someone/tiny-gpt2 (GPT2LMHeadModel, {N_LAYER} layers, passed in)"
    assert named["model_class"] == "GPT2LMHeadModel" and named["model_given"] is True
    assert (named["family"], named["n_layers"], named["n_heads"], named["head_dim"]) == ("gpt2", N_LAYER, N_HEAD,
                                                                                         HEAD_DIM)
    assert f" checkpoint: someone/tiny-gpt2 (GPT2LMHeadModel, {N_LAYER} layers, passed in)" in lines
    assert not any("gpt2," in line and "checkpoint" in line and "someone" not in line for line in lines)
    eager_model.config.name_or_path = ""
    scan = run_scan(SweepConfig(**common), model=eager_model, ids=ids, log=lambda line: None)["config"]
    assert scan["model"] == (f"unnamed model (GPT2LMHeadModel, {N_LAYER} layers, passed in; "
                             "config.name_or_path is empty)")
    given = run_sweep(SweepConfig(**common, model="my tiny GPT-2"), model=eager_model, ids=ids,
                      log=lambda line: None)["config"]
    assert given["model"] == "my tiny GPT-2" and given["model_class"] == "GPT2LMHeadModel"

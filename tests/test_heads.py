"""Causal LMs with something between the base model's output and the LM head's Linear: BERT-style prediction heads
(BERT's ``cls``, RoBERTa's ``lm_head``: dense, activation, LayerNorm, then the decoder Linear), ELECTRA's
``generator_predictions`` beside its ``generator_lm_head``, ModernBERT-decoder's ``lm_head`` beside its ``decoder``.

``nqpq.model.lm_head.head_transform`` finds that step and ``lm_losses`` applies it; every check here compares the
sweep's loss paths (``block_losses``, ``PrefixRunner``'s baseline and replays) with the float64 losses of the model's
own logits, on the census's tiny random models (``is_decoder=True``: what makes these families causal).
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from test_replay import blocks, model_losses  # the same blocks and float64 model losses as the replay tests

from nqpq import PrefixRunner, block_losses, crystallize
from nqpq.errors import UnsupportedModelError
from nqpq.model.lm_head import UpToHead
from nqpq.model.losses import lm_losses
from nqpq.model.parts import model_parts

# family → where its head transform is: a module holding the LM head (run up to it), a child module beside the
# head, or nothing (BertGeneration's ``lm_head`` holds only the decoder Linear).
FAMILIES = {
    "bert": "holder", "roberta-prelayernorm": "holder", "electra": "generator_predictions",
    "modernbert-decoder": "lm_head", "bert-generation": None,
}


def tiny_model(family: str) -> torch.nn.Module:
    """The census's tiny random model of ``family`` (its own defaults shrunk, ``is_decoder=True``), float32, eval."""
    from nqpq.model.tiny_models import tiny_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager")
    return model.float().eval()


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_sweep_losses_are_the_models(family):
    """block_losses, the replay's baseline and its replays from two start layers give the model's own losses; a
    top-1 layer gives what the model gives under the same crystallization (and really changes them)."""
    model = tiny_model(family)
    parts = model_parts(model)
    where = FAMILIES[family]
    if where is None:
        assert parts.head_transform is None
    elif where == "holder":
        assert isinstance(parts.head_transform, UpToHead)
    else:
        assert parts.head_transform is getattr(model, where)
    ids = blocks(3)
    want = model_losses(model, ids)
    torch.testing.assert_close(block_losses(model, ids, 2), want, rtol=1e-6, atol=0)
    if parts.head_transform is not None:  # the step matters: without it the head sees another hidden state
        hidden = parts.body(input_ids=ids, use_cache=False, return_dict=True).last_hidden_state
        moved = parts.head_transform(hidden)
        assert moved.shape != hidden.shape or (moved - hidden).abs().max() > 1e-2
        torch.testing.assert_close(lm_losses(model, hidden, ids, parts=parts), want, rtol=1e-6, atol=0)
    starts = (parts.attn_layers[1], parts.attn_layers[-1])
    runner = PrefixRunner(model, ids, [slice(0, 2), slice(2, 3)], start=starts)
    torch.testing.assert_close(runner.capture_baseline(), want, rtol=1e-6, atol=0)
    assert not runner._via_body  # layer after layer, then the body's final step (RoBERTa-PreLayerNorm's LayerNorm)
    for s in starts:
        torch.testing.assert_close(runner.losses(start=s), want, rtol=1e-6, atol=0)
        with crystallize(model, [li for li in parts.attn_layers if li >= s], mode="full", backend="torch"):
            torch.testing.assert_close(runner.losses(start=s), want, rtol=1e-5, atol=0)
        with crystallize(model, [s], mode="top1", backend="torch"):
            got = runner.losses(start=s)
            torch.testing.assert_close(got, model_losses(model, ids), rtol=1e-6, atol=0)
        assert (got - want).abs().max() > 1e-4  # top-1 changed the losses: the replay ran the crystallized layer


@torch.no_grad()
def test_bert_as_a_decoder_is_causal_and_bidirectional_bert_is_refused():
    """With is_decoder=True a token's logits do not depend on later tokens (what nqpq's causal attention assumes);
    without it BERT attends both ways and is refused."""
    model = tiny_model("bert")
    ids = blocks(1)
    later = ids.clone()
    later[0, 12:] = (later[0, 12:] + 7) % 256
    a, b = model(input_ids=ids).logits, model(input_ids=later).logits
    assert torch.equal(a[0, :12], b[0, :12]) and (a[0, 12:] - b[0, 12:]).abs().max() > 1e-3
    bidirectional = tf.BertLMHeadModel(tf.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                     intermediate_size=32, vocab_size=50)).eval()
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        model_parts(bidirectional)


def test_the_probe_runs_no_layer_and_a_usual_head_no_forward():
    """The probe stubs the body (no attention runs, so an active crystallization observes nothing); a causal LM whose
    head is a child of the model beside its body alone is taken without any forward."""
    calls = []
    bert = tiny_model("bert")
    handles = [layer.register_forward_pre_hook(lambda *_: calls.append("layer")) for layer in bert.bert.encoder.layer]
    handles.append(bert.register_forward_pre_hook(lambda *_: calls.append("model")))
    model_parts(bert)
    assert calls == ["model"]
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=32,
                                               num_attention_heads=4, vocab_size=50)).eval()
    llama.register_forward_pre_hook(lambda *_: calls.append("llama"))
    assert model_parts(llama).head_transform is None
    assert calls == ["model"]
    for handle in handles:
        handle.remove()
    assert "forward" not in bert.bert.__dict__  # the stub is gone


def test_heads_nqpq_cannot_follow_are_refused_by_name():
    # Something that is no module of the model acts between the transform and the head.
    electra = tiny_model("electra")
    electra.generator_lm_head.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
    with pytest.raises(UnsupportedModelError, match="cannot tell what it applies between its base model and its LM"):
        model_parts(electra)
    # Something acts on the head's output.
    electra = tiny_model("electra")
    electra.register_forward_hook(lambda module, args, out: type(out)(logits=out.logits * 2))
    with pytest.raises(UnsupportedModelError, match="its logits are not its LM head's output"):
        model_parts(electra)
    # XLM's adaptive softmax gives log-probabilities of a tree of clusters, not a Linear's logits.
    config = tf.XLMConfig(n_layers=2, emb_dim=32, n_heads=4, n_words=50, asm=True, asm_cutoffs=[10, 20])
    config.asm_div_value = 4.0  # the model reads it; transformers 5.25's XLMConfig no longer sets it
    with pytest.raises(UnsupportedModelError, match="adaptive softmax"):
        model_parts(tf.XLMWithLMHeadModel(config))
    # Musicgen Melody's heads: one Linear per codebook. Refused by model_parts, before any forward runs.
    config = tf.MusicgenMelodyDecoderConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                            num_attention_heads=4, num_codebooks=2)
    with pytest.raises(UnsupportedModelError, match="its LM head is a ModuleList, not one Linear"):
        model_parts(tf.MusicgenMelodyForCausalLM(config))


@torch.no_grad()
def test_an_offloaded_prediction_head(tmp_path):
    """BERT's prediction head offloaded to disk (accelerate loads its weights per call): the transform runs under its
    hooks, the head's weight is loaded for lm_losses, and every weight of the head is back off the device after."""
    from accelerate import dispatch_model

    model = tiny_model("bert")
    ids = blocks(3)
    want = model_losses(model, ids)
    device_map = {"bert.embeddings": "cpu", "bert.encoder": "cpu", "cls": "disk"}
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "off"))
    offloaded = lambda: {n for n, p in model.cls.named_parameters() if p.device.type == "meta"}  # noqa: E731
    names = offloaded()  # all but the decoder's weight, tied to the input embedding (on the cpu)
    assert {"predictions.bias", "predictions.transform.dense.weight"} <= names
    parts = model_parts(model)
    assert isinstance(parts.head_transform, UpToHead)
    torch.testing.assert_close(block_losses(model, ids, 2), want, rtol=1e-6, atol=0)
    runner = PrefixRunner(model, ids, [slice(0, 2), slice(2, 3)], start=[parts.attn_layers[-1]])
    torch.testing.assert_close(runner.capture_baseline(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(runner.losses(), want, rtol=1e-6, atol=0)
    assert names <= offloaded()  # the stop at the head left no weight loaded (BERT's output bias included)

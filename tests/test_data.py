"""Loading: text streamed only as far as the blocks need, checkpoints that must never run half-random."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import build_model, wikitext_lines
from safetensors.torch import load_file, save_file

from nqpq import data
from nqpq.data import NqpqError, check_ids_fit, ids_for_blocks, join_rows, load_model, rows_from_file


def spec_ids(rows, tokenizer) -> torch.Tensor:
    """Today's (the spec's) preparation, whole: non-blank rows joined by blank lines, tokenized at once."""
    return torch.tensor(tokenizer.encode("\n\n".join(t for t in rows if t.strip())), dtype=torch.long)


class CountingRows:
    """An iterable of rows that records how many were consumed."""

    def __init__(self, rows):
        self.rows, self.taken = list(rows), 0

    def __iter__(self):
        for row in self.rows:
            self.taken += 1
            yield row


@pytest.mark.parametrize("needed", [1, 37, 500, 2_000, 6_000])
def test_streamed_ids_equal_whole_text_ids(tokenizer, needed):
    rows = wikitext_lines(n_articles=60, seed=5)
    whole = spec_ids(rows, tokenizer)
    assert whole.numel() > 6_000 + data.CUT_MARGIN_TOKENS
    counting = CountingRows(rows)
    got = ids_for_blocks(counting, tokenizer, needed)
    torch.testing.assert_close(got, whole[:needed], rtol=0, atol=0)
    if needed <= 500:
        assert counting.taken < len(rows) // 2, "read far more rows than the blocks need"


def test_streamed_ids_when_the_text_runs_out(tokenizer):
    rows = wikitext_lines(n_articles=2, seed=6)
    whole = spec_ids(rows, tokenizer)
    torch.testing.assert_close(ids_for_blocks(rows, tokenizer, whole.numel() + 10), whole, rtol=0, atol=0)
    torch.testing.assert_close(ids_for_blocks(rows, tokenizer, whole.numel() - 3), whole[:-3], rtol=0, atol=0)


def test_streamed_ids_cut_everywhere_in_a_real_tokenizer(shared_data):
    """The GPT-2 tokenizer on WikiText: every cut inside a window of rows gives the whole text's ids."""
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(str(shared_data))
    rows = list(rows_from_file(str(shared_data / "wiki.valid.raw")))[:400]
    whole = spec_ids(rows, tokenizer)
    rng = random.Random(0)
    for needed in sorted(rng.sample(range(1, whole.numel() - 2 * data.CUT_MARGIN_TOKENS), 12)):
        torch.testing.assert_close(ids_for_blocks(rows, tokenizer, needed), whole[:needed], rtol=0, atol=0)


def test_rows_from_file_equal_splitlines(tmp_path):
    """Lazy rows are exactly ``read().splitlines(keepends=True)``, odd line boundaries included."""
    text = " = A = \r\n \npara one\x0bstill\x0c\u2028x\r\rlast without newline"
    path = tmp_path / "t.raw"
    path.write_bytes(text.encode("utf-8"))
    with open(path, encoding="utf-8") as f:
        want = f.read().splitlines(keepends=True)
    assert list(rows_from_file(str(path))) == want
    assert join_rows(rows_from_file(str(path))) == "\n\n".join(t for t in want if t.strip())


def test_rows_from_file_errors(tmp_path):
    with pytest.raises(NqpqError, match="--text-file"):
        list(rows_from_file(str(tmp_path / "missing.raw")))
    bad = tmp_path / "bad.raw"
    bad.write_bytes(b"fine line\n" * 10 + b"\xff\xfe broken\n")
    with pytest.raises(NqpqError, match="--text-file"):
        list(rows_from_file(str(bad)))


def test_hub_rows_are_read_lazily(monkeypatch, tokenizer):
    """The hub split is iterated in batches as consumed, never materialised as a whole column."""
    import datasets

    rows = wikitext_lines(n_articles=80, seed=7)
    pulled = []

    class Split:
        def iter(self, batch_size):
            for s in range(0, len(rows), batch_size):
                pulled.append(batch_size)
                yield {"text": rows[s : s + batch_size]}

        def __getitem__(self, key):
            raise AssertionError(f"the whole {key!r} column was materialised")

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: Split())
    monkeypatch.setattr(data, "hub_reachable", lambda: True)
    got = ids_for_blocks(data.rows_from_hub(batch_rows=16), tokenizer, 200)
    torch.testing.assert_close(got, spec_ids(rows, tokenizer)[:200], rtol=0, atol=0)
    assert sum(pulled) < len(rows) // 2


def test_check_ids_fit():
    model = build_model(vocab_size=100)
    check_ids_fit(torch.tensor([0, 99]), model, 100)
    with pytest.raises(NqpqError, match=r"vocabulary \(300 tokens\).*embedding \(100 rows\).*token id 250"):
        check_ids_fit(torch.tensor([3, 250]), model, 300)


# --- checkpoints ---------------------------------------------------------------------------------------------

def tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def edit_weights(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


def test_tied_checkpoints_load(tmp_path):
    """A tied LM head is legitimately absent from the file: that is no missing weight."""
    model = tiny_llama(tie=True)
    model.save_pretrained(tmp_path / "llama")
    assert "lm_head.weight" not in load_file(str(tmp_path / "llama" / "model.safetensors"))
    loaded = load_model(str(tmp_path / "llama"), "cpu", torch.float32)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    for name, p in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], p, rtol=0, atol=0)


def test_missing_weight_refused(tmp_path):
    tiny_llama(tie=False).save_pretrained(tmp_path / "llama")
    edit_weights(tmp_path / "llama", lambda s: s.pop("lm_head.weight"))
    with pytest.raises(NqpqError, match=r"1 missing \(lm_head.weight\).*randomly initialised"):
        load_model(str(tmp_path / "llama"), "cpu", torch.float32)


def test_unexpected_weight_refused(tmp_path):
    build_model().save_pretrained(tmp_path / "gpt2")
    edit_weights(tmp_path / "gpt2", lambda s: s.update({"transformer.h.0.attn.extra": torch.zeros(3)}))
    with pytest.raises(NqpqError, match=r"unexpected \(transformer.h.0.attn.extra\)"):
        load_model(str(tmp_path / "gpt2"), "cpu", torch.float32)


def test_llama_weights_under_a_gpt2_config_refused(tmp_path):
    """The original bug: a GPT-2 config over someone else's weights loaded as a random GPT-2."""
    tiny_llama(tie=False).save_pretrained(tmp_path / "llama")
    build_model().config.save_pretrained(tmp_path / "llama")  # overwrite config.json with a GPT-2 one
    with pytest.raises(NqpqError, match=r"missing .*unexpected"):
        load_model(str(tmp_path / "llama"), "cpu", torch.float32)


def test_mismatched_shape_refused(tmp_path):
    build_model().save_pretrained(tmp_path / "gpt2")
    edit_weights(tmp_path / "gpt2", lambda s: s.update({"transformer.ln_f.weight": torch.ones(7)}))
    with pytest.raises(NqpqError, match="transformer.ln_f.weight|size|shape"):
        load_model(str(tmp_path / "gpt2"), "cpu", torch.float32)


def test_truncated_weights_refused(tmp_path):
    build_model().save_pretrained(tmp_path / "gpt2")
    path = tmp_path / "gpt2" / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(NqpqError, match="Could not load the model"):
        load_model(str(tmp_path / "gpt2"), "cpu", torch.float32)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_encoder_models_refused(tmp_path, family):
    from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

    if family == "bert":
        model = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=64))
    else:
        model = T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                    num_heads=2))
    model.save_pretrained(tmp_path / family)
    with pytest.raises(NqpqError, match="encoder"):
        load_model(str(tmp_path / family), "cpu", torch.float32)


def test_bare_gpt2_tokenizer_files_load(shared_data):
    """OpenAI's GPT-2 files alone (vocab.json + merges.txt, no config): GPT-2's byte-level BPE, as before."""
    from transformers import GPT2TokenizerFast

    from nqpq.data import load_tokenizer

    text = " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : Unrecorded Chronicles"
    assert load_tokenizer(str(shared_data)).encode(text) == GPT2TokenizerFast.from_pretrained(
        str(shared_data)).encode(text)

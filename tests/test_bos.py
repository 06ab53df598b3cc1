"""Blocks as the model expects them: BOS first when the tokenizer puts it first, the spec's blocks otherwise."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import wikitext_lines
from test_sweep import hf_perplexity, save_family, tiny_llama
from transformers import PreTrainedTokenizerFast

from nqpq import make_blocks
from nqpq.cli import main
from nqpq.errors import NqpqError
from nqpq.sources.text import choose_bos, tokenizer_bos_id

SEQ_LEN, N_BLOCKS = 32, 4


def bos_tokenizer(gpt2_like) -> PreTrainedTokenizerFast:
    """The tiny BPE with a post-processor that puts BOS first in every text, as Gemma's and Llama 3's do."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    backend = Tokenizer.from_str(gpt2_like.backend_tokenizer.to_str())
    bos = gpt2_like.bos_token_id
    backend.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def text_ids(tokenizer, text: str) -> list[int]:
    """The text's tokens without special tokens, computed straight from the tokenizer's own call."""
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("first_block", [0, 2])
def test_make_blocks_with_bos_is_bos_then_seq_len_minus_one_text_tokens(first_block):
    ids = torch.arange(100, 200)
    blocks = make_blocks(ids, 10, 3, bos_id=7, first_block=first_block)
    expect = [[7] + list(range(100 + 9 * (first_block + b), 100 + 9 * (first_block + b + 1))) for b in range(3)]
    assert blocks.tolist() == expect
    plain = make_blocks(ids, 10, 3, first_block=first_block)
    assert plain.tolist() == [list(range(100 + 10 * (first_block + b), 110 + 10 * (first_block + b)))
                              for b in range(3)]


def test_make_blocks_with_bos_counts_text_tokens():
    with pytest.raises(ValueError, match=r"n_blocks=4 blocks of BOS \+ 9 text tokens need 36 tokens; the text has 35"):
        make_blocks(torch.arange(35), 10, 4, bos_id=0)
    assert make_blocks(torch.arange(36), 10, 4, bos_id=0).shape == (4, 10)


def test_bos_follows_the_tokenizer(tokenizer):
    assert tokenizer("x").input_ids[0] != tokenizer.bos_token_id  # GPT-2 style: adds none
    assert tokenizer_bos_id(tokenizer) is None
    with_bos = bos_tokenizer(tokenizer)
    assert with_bos("x").input_ids[0] == tokenizer.bos_token_id
    assert tokenizer_bos_id(with_bos) == tokenizer.bos_token_id
    assert choose_bos(with_bos, False) is None and choose_bos(tokenizer, True) == tokenizer.bos_token_id


def test_forcing_bos_without_a_bos_token_is_an_error():
    from nqpq.sources.checkpoints import ByteTokenizer

    assert choose_bos(ByteTokenizer(), None) is None
    with pytest.raises(NqpqError, match="no BOS token"):
        choose_bos(ByteTokenizer(), True)


@pytest.fixture(scope="module")
def bos_llama(tmp_path_factory, tokenizer):
    """A tiny Llama saved with the BOS-first tokenizer, and a WikiText-like text file."""
    root = tmp_path_factory.mktemp("bos")
    with_bos = bos_tokenizer(tokenizer)
    model_dir = save_family(root, "llama-bos", tiny_llama(len(tokenizer)), with_bos)
    text_file = root / "wiki.valid.raw"
    text = "".join(wikitext_lines(seed=3))
    text_file.write_text(text, encoding="utf-8")
    joined = "\n\n".join(t for t in text.splitlines(keepends=True) if t.strip())
    return model_dir, text_file, with_bos, joined


def sweep(model_dir, text_file, out, *flags) -> tuple[int, dict]:
    code = main(["sweep", "--model", str(model_dir), "--text-file", str(text_file), "--n-blocks", str(N_BLOCKS),
                 "--seq-len", str(SEQ_LEN), "--calib-blocks", "2", "--layers", "3", "--d-r", "2", "--device", "cpu",
                 "--backend", "torch", "--no-progress", "--out", str(out), *flags])
    return code, json.loads((out / "results.json").read_text()) if code == 0 else {}


def bos_perplexity(model, ids: list[int], bos: int) -> float:
    """The model's own perplexity of blocks [BOS] + seq_len - 1 text tokens, from its logits in float64."""
    per = SEQ_LEN - 1
    blocks = torch.tensor([[bos] + ids[b * per : (b + 1) * per] for b in range(N_BLOCKS)])
    with torch.no_grad():
        logits = model(input_ids=blocks, use_cache=False).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1),
                                            reduction="none")
    return nll.view(N_BLOCKS, per).mean(dim=1).mean().exp().item()


def test_sweep_starts_every_block_with_bos_when_the_tokenizer_does(bos_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model_dir, text_file, with_bos, joined = bos_llama
    code, results = sweep(model_dir, text_file, tmp_path / "auto")
    report = capsys.readouterr().out
    assert code == 0
    config = results["config"]
    assert config["bos"] is True and config["bos_token_id"] == with_bos.bos_token_id
    assert f"each BOS (id {with_bos.bos_token_id}) + {SEQ_LEN - 1} text tokens" in report
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    expect = bos_perplexity(model, text_ids(with_bos, joined), with_bos.bos_token_id)
    assert abs(results["ppl_baseline"] - expect) <= 1e-5 * expect


def test_no_bos_gives_the_spec_blocks(bos_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model_dir, text_file, with_bos, joined = bos_llama
    code, results = sweep(model_dir, text_file, tmp_path / "nobos", "--no-bos")
    report = capsys.readouterr().out
    assert code == 0 and results["config"]["bos"] is False and "no BOS" in report
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    expect = hf_perplexity(model, torch.tensor(text_ids(with_bos, joined)), SEQ_LEN, N_BLOCKS)
    assert abs(results["ppl_baseline"] - expect) <= 1e-5 * expect


def test_gpt2_tokenizer_blocks_are_unchanged_and_bos_can_be_forced(tokenizer, saved_model, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model_dir, text_file = saved_model
    code, results = sweep(model_dir, text_file, tmp_path / "gpt2", "--layers", "2", "3")
    capsys.readouterr()
    assert code == 0 and results["config"]["bos"] is False
    joined = "\n\n".join(t for t in text_file.read_text().splitlines(keepends=True) if t.strip())
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer.encode(joined)  # the spec's own preparation: encode the whole text
    assert abs(results["ppl_baseline"] - hf_perplexity(model, torch.tensor(ids), SEQ_LEN, N_BLOCKS)) <= (
        1e-5 * results["ppl_baseline"])
    code, forced = sweep(model_dir, text_file, tmp_path / "forced", "--bos")
    capsys.readouterr()
    assert code == 0 and forced["config"]["bos"] is True
    expect = bos_perplexity(model, ids, tokenizer.bos_token_id)
    assert abs(forced["ppl_baseline"] - expect) <= 1e-5 * expect


def test_bos_forced_on_the_demo_byte_tokenizer_is_exit_2(tmp_path, capsys):
    code = main(["sweep", "--demo", "--bos", "--n-blocks", "1", "--seq-len", "16", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "demo")])
    err = capsys.readouterr().err
    assert code == 2 and "no BOS token" in err and err.count("\n") == 1
    assert not (tmp_path / "demo").exists()

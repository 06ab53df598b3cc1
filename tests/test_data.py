"""Loading: text streamed only as far as the blocks need, checkpoints that must never run half-random."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model, wikitext_lines
from safetensors.torch import load_file, save_file

from nqpq.errors import NqpqError
from nqpq.sources import text as data
from nqpq.sources.checkpoints import load_model
from nqpq.sources.text import check_ids_fit, ids_for_blocks, join_rows, rows_from_file


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


def test_streamed_ids_cut_everywhere_in_a_real_tokenizer(real_files):
    """The GPT-2 tokenizer on WikiText: every cut inside a window of rows gives the whole text's ids."""
    from transformers import GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(str(real_files.gpt2_tokenizer))
    rows = list(rows_from_file(str(real_files.wiki_valid)))[:400]
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


def test_bare_gpt2_tokenizer_files_load(real_files):
    """OpenAI's GPT-2 files alone (vocab.json + merges.txt, no config): GPT-2's byte-level BPE, as before."""
    from transformers import GPT2TokenizerFast

    from nqpq.sources.checkpoints import load_tokenizer

    text = " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : Unrecorded Chronicles"
    folder = str(real_files.gpt2_tokenizer)
    assert load_tokenizer(folder).encode(text) == GPT2TokenizerFast.from_pretrained(folder).encode(text)


# --- GGUF files (nqpq.sources.checkpoints): refused before anything is built, never taken for a hub name ---


def write_gguf(path: Path, arch: str, n_floats: int = 4096, name: str | None = None) -> Path:
    """A small, well-formed GGUF file (gguf's own writer) naming ``arch`` (and ``general.name``), holding one F32
    tensor."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch=arch)
    if name is not None:
        writer.add_name(name)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(n_floats, dtype=np.float32).reshape(-1, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """{case: (a .gguf path nqpq must refuse, a regex its error must match)}."""
    not_gguf = tmp_path / "not-gguf.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip file, not a GGUF one" * 10)
    cut_data = write_gguf(tmp_path / "cut-data.gguf", "llama")
    with open(cut_data, "r+b") as f:
        f.truncate(cut_data.stat().st_size - 100)  # the tensor's last 100 bytes are gone
    cut_header = write_gguf(tmp_path / "cut-header.gguf", "llama")
    with open(cut_header, "r+b") as f:
        f.truncate(40)  # magic and version survive, the metadata does not
    return {
        "not_gguf": (not_gguf, r"is not a GGUF file \(it starts with b'PK"),
        "truncated_data": (cut_data, r"truncated or corrupt GGUF file"),
        "truncated_header": (cut_header, r"truncated or corrupt GGUF file"),
        "unsupported_arch": (write_gguf(tmp_path / "rwkv.gguf", "rwkv7"),
                             r"GGUF architecture 'rwkv7' is not supported by transformers .*'s GGUF loader"),
        "missing": (tmp_path / "no-such-file.gguf", r"no such GGUF file"),
    }


@pytest.mark.parametrize("case", ["not_gguf", "truncated_data", "truncated_header", "unsupported_arch", "missing"])
def test_bad_gguf_files_refused(tmp_path, case):
    """The model loader and the tokenizer loader both refuse, with one line and never the hub's error."""
    from nqpq.sources.checkpoints import load_tokenizer

    path, pattern = gguf_cases(tmp_path)[case]
    for load in (lambda: load_model(str(path), "cpu", torch.float32), lambda: load_tokenizer(str(path))):
        with pytest.raises(NqpqError, match=pattern) as info:
            load()
        message = str(info.value)
        assert "\n" not in message and "hub" not in message


def test_gguf_architecture_check_follows_transformers():
    """Every architecture transformers' GGUF loader lists is accepted (its config sections are not)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from nqpq.sources.gguf import supported_architectures

    names = supported_architectures()
    assert {"llama", "qwen2", "gemma2", "gpt2"} <= names
    assert set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"} <= names
    assert not {"general", "tokenizer"} & names


def test_gguf_file_info(tmp_path):
    """results.json's record of a GGUF file: its name, size, sha256 and tensor types, from the file itself."""
    import hashlib

    from nqpq.sources.gguf import gguf_file_info, gguf_label

    path = write_gguf(tmp_path / "tiny.gguf", "llama")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert gguf_file_info(path) == {"name": None, "registry_name": None, "file": "tiny.gguf",
                                    "size_bytes": path.stat().st_size, "sha256": digest, "quantization_types": ["F32"]}
    assert gguf_label(gguf_file_info(path)) == f"tiny.gguf (tiny.gguf, sha256 {digest[:12]})"
    named = write_gguf(tmp_path / "named.gguf", "llama", name="Tiny Llama 1K")
    info = gguf_file_info(named, registry_name="tiny-1k")
    assert info["name"] == "Tiny Llama 1K" and info["registry_name"] == "tiny-1k"
    assert gguf_label(info) == f"Tiny Llama 1K (tiny-1k: named.gguf, sha256 {info['sha256'][:12]})"
    assert str(tmp_path) not in f"{info} {gguf_label(info)}"  # never the local path


def test_bad_gguf_refused_by_the_cli_before_writing(tmp_path, capsys, saved_model):
    """`nqpq sweep --model bad.gguf`: exit 2, one line, and the --out directory it would create never appears."""
    from nqpq.cli import main

    _, text_file = saved_model
    path, _ = gguf_cases(tmp_path)["unsupported_arch"]
    out = tmp_path / "runs" / "gguf"
    code = main(["sweep", "--model", str(path), "--text-file", str(text_file), "--n-blocks", "2", "--seq-len", "16",
                 "--device", "cpu", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nqpq: error: ") and "rwkv7" in lines[0], err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("package", ["gguf", "accelerate"])
def test_missing_gguf_package_named_with_the_install_command(tmp_path, monkeypatch, package):
    path = write_gguf(tmp_path / "tiny.gguf", "llama")
    monkeypatch.setitem(sys.modules, package, None)  # `import gguf` now raises ImportError
    with pytest.raises(NqpqError, match=rf"needs the '{package}' package: pip install -e \"\.\[gguf\]\""):
        load_model(str(path), "cpu", torch.float32)


def test_a_missing_weight_on_the_meta_device_is_not_taken_for_a_tied_one():
    """Offloaded weights sit on the meta device, where every data_ptr is 0: tying is told by the Parameter itself."""
    from conftest import tiny_config
    from transformers import GPT2LMHeadModel

    from nqpq.sources.loading import unloaded_weights

    with torch.device("meta"):
        model = GPT2LMHeadModel(tiny_config())
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    info = {"missing_keys": ["lm_head.weight"]}
    assert unloaded_weights(model, info) == []
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))  # untied, still meta
    assert unloaded_weights(model, info) == ["1 missing (lm_head.weight)"]


TEST_DATA_SHA256 = {"vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                    "exp_q03_residual.py": "bf93b6e52771856ed590e070f07f0907642c6dde52956e35e094e7fec9af1e5b"}


@pytest.mark.parametrize("name", sorted(TEST_DATA_SHA256))
def test_shipped_test_data_is_byte_for_byte(name):
    """tests/data holds the files its README lists, unmodified (the GPT-2 digests are OpenAI's published ones)."""
    import hashlib

    from conftest import TEST_DATA

    assert hashlib.sha256((TEST_DATA / name).read_bytes()).hexdigest() == TEST_DATA_SHA256[name]
    readme = (TEST_DATA / "README.md").read_text(encoding="utf-8")
    assert f"`{name}`" in readme and TEST_DATA_SHA256[name] in readme
    assert "Modified MIT License" in (TEST_DATA / "LICENSE-gpt2.txt").read_text(encoding="utf-8")

"""Models spread over devices with a device map (accelerate): the same results as the plain single-device run.

On CPU the maps put some layers (and for Llama the LM head) on "disk": accelerate keeps their weights on the
meta device and loads them for each forward, so every path that touches weights or moves activations (the
prefix record and its replays, the LM head's losses, the Gram sums, the crystallinity counts) is exercised.
The reference is the same checkpoint run without a map; the results must be identical, not close.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import drop_measured_cost, wikitext_text
from test_sweep import save_family, tiny_llama

from nqpq.cli import main
from nqpq.errors import NqpqError
from nqpq.experiments.batching import default_batch_size
from nqpq.experiments.config import SweepConfig
from nqpq.experiments.sweep import run_sweep
from nqpq.model.devices import execution_device, input_device, parse_max_memory

GIB = 1 << 30

# Keys of results.json's config that say how the run was placed and where it wrote, not what it computed.
PLACEMENT_KEYS = {"device_map", "max_memory", "offload_folder", "out"}


def tiny_gpt2(vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=4, n_embd=64, vocab_size=vocab_size, n_positions=128,
                                      bos_token_id=0, eos_token_id=0)).eval()


def llama16(vocab_size: int):
    """The tiny Llama with head dim 16 (the Triton kernel's smallest)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=64,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128)).eval()


# Layers 1 and 2 on disk; Llama's (untied) LM head on disk too. GPT-2's head is tied to wte: both stay on cpu.
MAPS = {
    "llama": {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
              "lm_head": "disk"},
    "gpt2": {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "transformer.h.0": "cpu",
             "transformer.h.1": "disk", "transformer.h.2": "disk", "transformer.h.3": "cpu", "transformer.ln_f": "cpu",
             "lm_head": "cpu"},
}
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("device_map")
    text = root / "wiki.valid.raw"
    text.write_text(wikitext_text(seed=3), encoding="utf-8")
    dirs = {family: save_family(root, family, build(len(tokenizer)), tokenizer) for family, build in BUILD.items()}
    dirs["llama16"] = save_family(root, "llama16", llama16(len(tokenizer)), tokenizer)
    for family, mapping in MAPS.items():
        (root / f"{family}_map.json").write_text(json.dumps(mapping))
    return root, dirs, text


def run(command: str, model_dir: Path, text: Path, out: Path, *extra: str) -> dict:
    code = main([command, "--model", str(model_dir), "--text-file", str(text), "--n-blocks", "4", "--seq-len", "32",
                 "--calib-blocks", "2", "--batch-size", "2", "--no-progress", "--out", str(out), *extra])
    assert code == 0
    return json.loads((out / "results.json").read_text())


def computed(results: dict) -> dict:
    """results.json without its timings and placement settings: everything the run computed."""
    results = copy.deepcopy(results)
    drop_measured_cost(results)  # the op's measured times differ run to run; the cost formulas must agree
    config = {k: v for k, v in results["config"].items() if k not in PLACEMENT_KEYS}
    return {**{k: v for k, v in results.items() if k not in ("timings", "config")}, "config": config}


@pytest.mark.parametrize("command", ["sweep", "scan"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_disk_offload_equals_the_plain_cpu_run(saved, family, command, tmp_path, capsys):
    root, dirs, text = saved
    layers = ["--layers", "1", "3"] if command == "scan" else ["--layers", "2", "3"]
    flags = [*layers, "--d-r", "1", "4", "--backend", "torch"]
    plain = run(command, dirs[family], text, tmp_path / "plain", "--device", "cpu", *flags)
    mapped = run(command, dirs[family], text, tmp_path / "mapped", "--device-map", str(root / f"{family}_map.json"),
                 "--offload-folder", str(tmp_path / "offload"), *flags)
    capsys.readouterr()
    assert mapped["config"]["device"] == "cpu"
    assert computed(mapped) == computed(plain)
    if command == "sweep":
        assert (tmp_path / "mapped" / "basis.pt").is_file()
        torch.testing.assert_close(torch.load(tmp_path / "mapped" / "basis.pt"),
                                   torch.load(tmp_path / "plain" / "basis.pt"), rtol=0, atol=0)


def test_disk_offload_triton_interpreter_equals_the_plain_run(saved, tmp_path, capsys):
    """The Triton kernel (interpreter on CPU) on disk-offloaded layers: one crystallized layer, one rank."""
    root, dirs, text = saved
    flags = ["--layers", "2", "--d-r", "4", "--backend", "triton", "--n-blocks", "2", "--calib-blocks", "1"]
    plain = run("sweep", dirs["llama16"], text, tmp_path / "plain", "--device", "cpu", *flags)
    mapped = run("sweep", dirs["llama16"], text, tmp_path / "mapped", "--device-map",
                 str(root / "llama_map.json"), "--offload-folder", str(tmp_path / "offload"), *flags)
    capsys.readouterr()
    assert computed(mapped) == computed(plain)


def test_python_api_takes_a_model_loaded_with_a_device_map(saved, tokenizer, tmp_path, capsys):
    """run_sweep(model=...) runs a model the user dispatched as it is; the same results as the plain model."""
    from transformers import AutoModelForCausalLM

    _, dirs, text = saved
    ids = torch.tensor(tokenizer.encode(text.read_text()))
    cfg = SweepConfig(layers=(2, 3), d_r=(2,), n_blocks=4, seq_len=32, calib_blocks=2, batch_size=2, backend="torch",
                      progress=False)
    plain = AutoModelForCausalLM.from_pretrained(dirs["llama"]).eval()
    mapped = AutoModelForCausalLM.from_pretrained(dirs["llama"], device_map=MAPS["llama"],
                                                  offload_folder=str(tmp_path / "off")).eval()
    assert mapped.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    assert execution_device(mapped.model.layers[1]) == input_device(mapped) == torch.device("cpu")
    a, b = run_sweep(cfg, model=plain, ids=ids), run_sweep(cfg, model=mapped, ids=ids)
    capsys.readouterr()
    for key in ("ppl_baseline", "ppl_top1", "ppl_full", "curve", "spectrum", "crystallinity"):
        assert a[key] == b[key], key
    with pytest.raises(NqpqError, match="a model passed to run_sweep stays where it is"):
        run_sweep(SweepConfig(**{**vars(cfg), "device_map": "auto"}), model=mapped, ids=ids)


def test_tensor_parallel_models_refused(saved, tokenizer):
    from transformers import AutoModelForCausalLM

    _, dirs, _ = saved
    model = AutoModelForCausalLM.from_pretrained(dirs["llama"]).eval()
    model._tp_size = 2  # what from_pretrained(tp_plan="auto") sets on a split model (read as model.tp_size)
    ids = torch.arange(200) % 50
    with pytest.raises(NqpqError, match=r"tensor-parallel models .*--device-map auto") as err:
        run_sweep(SweepConfig(n_blocks=2, seq_len=32, calib_blocks=1, progress=False), model=model, ids=ids)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("flags, message", [
    (["--device-map", "fastest"], "--device-map 'fastest': use one of auto, balanced"),
    (["--device-map", "BAD_JSON"], "not valid JSON"),
    (["--device-map", "LIST_JSON"], "the JSON must be an object"),
    (["--device-map", "GPU_JSON"], "needs CUDA, which this machine does not have"),
    (["--device-map", "auto", "--max-memory", "cpu=lots"], "a size is a byte count"),
    (["--device-map", "auto", "--max-memory", "gpu0=1GiB"], "a device is a GPU index"),
    (["--max-memory", "cpu=1GiB"], "give --device-map too"),
    (["--device-map", "DISK_JSON"], "give --offload-folder DIR"),
])
def test_bad_placement_flags_exit_2_one_line_nothing_written(saved, flags, message, tmp_path, capsys):
    root, dirs, text = saved
    files = {"BAD_JSON": "{not json", "LIST_JSON": "[1, 2]", "GPU_JSON": json.dumps({"model.layers.0": 0}),
             "DISK_JSON": json.dumps(MAPS["llama"])}
    for i, flag in enumerate(flags):
        if flag in files:
            path = tmp_path / f"{flag.lower()}.json"
            path.write_text(files[flag])
            flags[i] = str(path)
    out = tmp_path / "out"
    code = main(["sweep", "--model", str(dirs["llama"]), "--text-file", str(text), "--n-blocks", "2", "--seq-len",
                 "32", "--no-progress", "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_device_must_be_the_input_embeddings_device(saved, tmp_path, capsys):
    """With a device map --device names where the inputs go: the embedding's device, nothing else."""
    root, dirs, text = saved
    cfg = SweepConfig(model=str(dirs["llama"]), text_file=str(text), n_blocks=2, seq_len=32, calib_blocks=1,
                      progress=False, device_map=str(root / "llama_map.json"), offload_folder=str(tmp_path / "off"),
                      device="cuda:0")
    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine cuda:0 is a device the map could use")
    with pytest.raises(NqpqError, match="--device cuda:0: the device map puts the input embedding on cpu"):
        run_sweep(cfg)


def test_max_memory_forms():
    assert parse_max_memory(["0=70GiB", "1=70GiB", "cpu=200GiB"]) == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    assert parse_max_memory('{"0": "10GB", "cpu": 1000}') == {0: "10GB", "cpu": 1000}
    assert parse_max_memory({"cpu": "123"}) == {"cpu": 123}


class _Parts:
    lm_head = torch.nn.Linear(1, 1)  # no body: the devices are those given

    def largest(self, field, layers=None):  # what batching reads of ModelParts: the widest attention layer
        return {"n_heads": 32, "n_kv_heads": 8, "qk_dim": 128, "v_dim": 128}[field]


def test_default_batch_size_the_tightest_device_decides():
    cpu, a, b = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)
    parts = _Parts()
    kwargs = dict(hidden=4096, n_records=1)

    def batch(free, devices):
        return default_batch_size(cpu, parts, 1024, 10_000, torch.float32, free=free, devices=devices, **kwargs)

    roomy, tight = 80 * GIB, 20 * GIB
    alone_roomy = batch({cpu: roomy}, [cpu])
    alone_tight = batch({cpu: tight}, [cpu])
    assert alone_tight < alone_roomy
    # Two more devices: whichever has the least free memory sets the batch, whatever the order.
    assert batch({cpu: roomy, a: roomy, b: tight}, [a, b]) == alone_tight
    assert batch({cpu: roomy, a: tight, b: roomy}, [b, a]) == alone_tight
    assert batch({cpu: roomy, a: roomy, b: roomy}, [a, b]) == alone_roomy
    # A map that uses a CUDA device: memory alone decides there too (the kernel launches batch · Hq in chunks of
    # CUDA's grid rows), past the 65535 // Hq blocks a grid cap would allow.
    huge = batch({cpu: 10_000 * GIB, a: 10_000 * GIB}, [a])
    assert huge == batch({cpu: 10_000 * GIB}, [cpu]) and huge > 65535 // 32


def test_default_batch_size_finds_the_devices_of_a_mapped_model(saved, tmp_path, monkeypatch):
    """Given a dispatched model's parts, every device its modules compute on is measured."""
    from transformers import AutoModelForCausalLM

    from nqpq.experiments import batching
    from nqpq.model.parts import model_parts

    _, dirs, _ = saved
    mapped = AutoModelForCausalLM.from_pretrained(dirs["llama"], device_map=MAPS["llama"],
                                                  offload_folder=str(tmp_path / "off")).eval()
    asked = []
    monkeypatch.setattr(batching, "free_memory", lambda dev: asked.append(dev) or 8 * GIB)
    default_batch_size(torch.device("cpu"), model_parts(mapped), 32, 4, torch.float32)
    assert asked == [torch.device("cpu")]  # disk-offloaded layers compute on the cpu: one device, measured once


def test_torchrun_with_a_cpu_disk_map(saved, tmp_path, capsys):
    """torchrun (2 gloo ranks) combines with a map onto cpu and disk: each rank loads its own copy and offloads to
    its own subfolder; the results equal the single-process run up to the order of the cross-rank sums."""
    import os
    import subprocess
    import sys

    root, dirs, text = saved
    flags = ["--layers", "2", "3", "--d-r", "2", "--backend", "torch", "--device-map", str(root / "llama_map.json"),
             "--offload-folder", str(tmp_path / "off")]
    one = run("sweep", dirs["llama"], text, tmp_path / "one", *flags)
    capsys.readouterr()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "nqpq", "sweep",
               "--model", str(dirs["llama"]), "--text-file", str(text), "--n-blocks", "4", "--seq-len", "32",
               "--calib-blocks", "2", "--batch-size", "2", "--no-progress", *flags, "--out", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["config"]["world_size"] == 2
    for key in ("ppl_baseline", "ppl_top1", "ppl_full"):
        assert abs(two[key] - one[key]) <= 1e-6 * one[key], key
    assert abs(two["curve"][0]["ppl"] - one["curve"][0]["ppl"]) <= 1e-6 * one["curve"][0]["ppl"]


def test_torchrun_with_a_gpu_map_refused(monkeypatch):
    from nqpq.experiments import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(NqpqError, match="use either torchrun .* or --device-map in a single process"):
        distributed.check_device_map({"model.layers.0": 0, "model.layers.1": "cpu"})
    distributed.check_device_map({"model.layers.0": "cpu", "model.layers.1": "disk"})  # accepted


# --- with a lent GPU ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("command", ["sweep", "scan"])
def test_mixed_cuda_cpu_map_equals_single_device(saved, command, backend, tmp_path, capsys):
    """The first half of the layers on cuda:0, the rest on "cpu" (accelerate offloads them: their weights stay
    in host memory and are brought to cuda:0 for each forward), against the whole model on cuda:0."""
    _, dirs, text = saved
    mapping = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": "cpu",
               "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": 0, "lm_head": "cpu"}
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    flags = ["--layers", "1", "3", "--d-r", "4", "--backend", backend]
    plain = run(command, dirs["llama16"], text, tmp_path / "plain", "--device", "cuda:0", *flags)
    mapped = run(command, dirs["llama16"], text, tmp_path / "mapped", "--device-map", str(tmp_path / "map.json"),
                 *flags)
    capsys.readouterr()
    assert mapped["config"]["device"] == "cuda:0"
    assert computed(mapped) == computed(plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_cuda0_with_the_current_device_elsewhere(saved, tmp_path, capsys):
    """--device cuda:0 while the current CUDA device is another one (the last card when there are several; with
    one card this only checks that nqpq does not depend on the current device being set by itself)."""
    _, dirs, text = saved
    flags = ["--layers", "2", "--d-r", "4", "--backend", "triton", "--device", "cuda:0"]
    reference = run("sweep", dirs["llama16"], text, tmp_path / "ref", *flags)
    previous = torch.cuda.current_device()
    torch.cuda.set_device(torch.cuda.device_count() - 1)
    try:
        moved = run("sweep", dirs["llama16"], text, tmp_path / "moved", *flags)
    finally:
        torch.cuda.set_device(previous)
    capsys.readouterr()
    assert computed(moved) == computed(reference)


def test_device_map_with_a_gguf_file_refused(saved, tmp_path, capsys):
    """transformers dequantizes a GGUF file whole before any placement: refused up front, pointing to a saved copy."""
    from nqpq.sources.checkpoints import load_model

    root, dirs, text = saved
    out = tmp_path / "out"
    code = main(["sweep", "--model", str(tmp_path / "model.gguf"), "--text-file", str(text), "--device-map", "auto",
                 "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--device-map with a .gguf file" in err and err.count("\n") == 1
    assert not out.exists()
    with pytest.raises(NqpqError, match="save it with save_pretrained first"):
        load_model(str(tmp_path / "model.gguf"), "cpu", torch.float32, device_map="auto")

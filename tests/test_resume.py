"""An interrupted sweep or scan keeps its finished configurations; ``--resume`` finishes it with the results of an
uninterrupted run (``nqpq.experiments.resume``)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, build_model, drop_measured_cost, wikitext_text

import nqpq.experiments.resume
import nqpq.model.replay
from nqpq.cli import main
from nqpq.errors import NqpqError
from nqpq.experiments.checkpoint_files import CHECKPOINT_DIR, STATE_FILE
from nqpq.experiments.config import SweepConfig
from nqpq.experiments.resume import Checkpoint
from nqpq.experiments.sweep import run_sweep

# Two sink settings and two calibration draws: every kind of configuration key (sink tag, draw suffix) is kept.
SWEEP_FLAGS = ["--layers", "2", "3", "--d-r", "1", "16", "--n-blocks", "6", "--seq-len", "32", "--calib-blocks", "2",
               "--calib-draws", "2", "--sink-tokens", "0", "2", "--device", "cpu", "--batch-size", "4",
               "--no-progress"]
SWEEP_UNITS = 2 + 2 * (1 + 2 * 2)  # baseline + calibration, full, then per sink setting: top-1 and 2 d_r x 2 draws
SCAN_FLAGS = ["--layers", "1", "3", "--d-r", "1", "4", "--n-blocks", "6", "--seq-len", "32", "--calib-blocks", "2",
              "--calib-from", "eval", "--device", "cpu", "--batch-size", "4", "--no-progress"]
SCAN_UNITS = 1 + 2 * (1 + 2)  # baseline + calibration, then per layer: top-1 and 2 d_r


def command(kind: str, saved_model, out: Path, *extra: str) -> list[str]:
    model_dir, text_file = saved_model
    flags = SWEEP_FLAGS if kind == "sweep" else SCAN_FLAGS
    return [kind, "--model", str(model_dir), "--text-file", str(text_file), *flags, "--out", str(out), *extra]


def run(args: list[str]) -> tuple[int, str, str]:
    """``nqpq ARGS`` in this process: (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(args)
    return code, stdout.getvalue(), stderr.getvalue()


def comparable(out: Path) -> dict:
    """results.json without what may differ between two runs of the same settings: timings, and --out's name."""
    results = json.loads((out / "results.json").read_text())
    results.pop("timings")
    results["config"].pop("out")
    drop_measured_cost(results)
    return results


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def uninterrupted(saved_model, tmp_path_factory) -> dict[str, Path]:
    """The --out directory of one uninterrupted sweep and one uninterrupted scan."""
    outs = {}
    for kind in ("sweep", "scan"):
        out = tmp_path_factory.mktemp(kind) / "out"
        code, _, err = run(command(kind, saved_model, out))
        assert code == 0, err
        assert not (out / CHECKPOINT_DIR).exists()  # an uninterrupted run leaves no checkpoint
        outs[kind] = out
    return outs


def interrupt_after_save(monkeypatch, k: int) -> None:
    """Ctrl-C right after the k-th configuration is kept (its state.json written)."""
    saves = [0]
    write = Checkpoint._write_state

    def write_then_interrupt(self):
        write(self)
        saves[0] += 1
        if saves[0] == k:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoint, "_write_state", write_then_interrupt)


def count_evaluations(monkeypatch) -> list[int]:
    """Counts the configurations evaluated (one PrefixRunner.losses call each); with ``interrupt_at`` set, Ctrl-C
    arrives inside that evaluation (1-based), before its losses are kept."""
    calls = [0]
    losses = nqpq.model.replay.PrefixRunner.losses

    def counted(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == getattr(counted, "interrupt_at", None):
            raise KeyboardInterrupt
        return losses(self, *args, **kwargs)

    monkeypatch.setattr(nqpq.model.replay.PrefixRunner, "losses", counted)
    calls.append(counted)
    return calls


def assert_kept(code: int, err: str, out: Path, done: int, total: int, what: str = "interrupted",
                exit_code: int = 130) -> None:
    assert code == exit_code, err
    path = out / CHECKPOINT_DIR
    assert lines(err) == [f"nqpq: {what}; kept {done} of {total} configurations in {path}: rerun the same command "
                          "with --resume to finish it"], err
    assert not (out / "results.json").exists()  # results.json is written whole at the end, or not at all
    assert (path / STATE_FILE).is_file() and (path / "baseline.pt").is_file()


def assert_resumed(kind: str, saved_model, out: Path, uninterrupted: dict, done: int, total: int) -> None:
    code, stdout, err = run(command(kind, saved_model, out, "--resume"))
    assert code == 0, err
    assert f"resuming: {done} of {total} configurations done" in stdout
    assert comparable(out) == comparable(uninterrupted[kind])
    assert not (out / CHECKPOINT_DIR).exists()  # gone once results.json is written
    if kind == "sweep":  # the basis is the stored one, bit for bit
        got, want = (torch.load(d / "basis.pt", weights_only=True) for d in (out, uninterrupted[kind]))
        for key in want:
            for layer in want[key]:
                assert torch.equal(got[key][layer], want[key][layer]), (key, layer)


@pytest.mark.parametrize("k", [1, 5, SWEEP_UNITS - 1])
def test_sweep_interrupted_after_k_configurations_resumes_to_the_same_results(k, saved_model, uninterrupted,
                                                                              tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupt_after_save(monkeypatch, k)
    code, _, err = run(command("sweep", saved_model, out))
    assert_kept(code, err, out, k, SWEEP_UNITS)
    monkeypatch.undo()
    evaluations = count_evaluations(monkeypatch)
    assert_resumed("sweep", saved_model, out, uninterrupted, k, SWEEP_UNITS)
    # Only what the checkpoint lacked ran: every configuration after the first k units (the baseline is one).
    assert evaluations[0] == SWEEP_UNITS - k


@pytest.mark.parametrize("k", [2, SCAN_UNITS - 1])
def test_scan_interrupted_inside_a_configuration_resumes_to_the_same_results(k, saved_model, uninterrupted,
                                                                             tmp_path, monkeypatch):
    """Ctrl-C inside the k-th layer configuration: that one is lost, the baseline and the k − 1 before it kept."""
    out = tmp_path / "out"
    evaluations = count_evaluations(monkeypatch)
    evaluations[1].interrupt_at = k
    code, _, err = run(command("scan", saved_model, out))
    assert_kept(code, err, out, k, SCAN_UNITS)
    monkeypatch.undo()
    evaluations = count_evaluations(monkeypatch)
    assert_resumed("scan", saved_model, out, uninterrupted, k, SCAN_UNITS)
    assert evaluations[0] == SCAN_UNITS - k


def test_interrupt_before_any_configuration_keeps_nothing(saved_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nqpq.model.replay.PrefixRunner, "capture_baseline", ctrl_c)
    code, _, err = run(command("scan", saved_model, out))
    assert code == 130
    assert lines(err) == ["nqpq: interrupted; nothing written"]
    assert not out.exists()  # the run created it; nothing is kept in it


@pytest.fixture
def interrupted_sweep(saved_model, tmp_path, monkeypatch) -> Path:
    """The --out of a sweep interrupted after 3 configurations."""
    out = tmp_path / "out"
    interrupt_after_save(monkeypatch, 3)
    code, _, err = run(command("sweep", saved_model, out))
    assert_kept(code, err, out, 3, SWEEP_UNITS)
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("change, difference", [
    (["--n-blocks", "5"], "--n-blocks is 5 here but 6"),
    (["--seed", "7"], "--seed is 7 here but 42"),
    (["--d-r", "1", "8"], "--d-r is [1, 8] here but [1, 16]"),
    (["--sink-tokens", "0"], "--sink-tokens is [0] here but [0, 2]"),
    (["--heads", "2:0,1"], "--heads is '2:0,1' here but None"),  # a choice of heads is a flag that must match
    (["--n-blocks", "5", "--seed", "7"], "--n-blocks is 5 here but 6"),  # the first, in the flags' order
])
def test_resume_with_other_flags_exits_2_naming_the_first_difference(change, difference, interrupted_sweep,
                                                                     saved_model):
    before = (interrupted_sweep / CHECKPOINT_DIR / STATE_FILE).read_bytes()
    code, _, err = run(command("sweep", saved_model, interrupted_sweep, "--resume", *change))
    assert code == 2
    assert lines(err) == [f"nqpq: error: --resume: {difference} in the checkpoint {interrupted_sweep / CHECKPOINT_DIR} "
                          "(rerun with the checkpoint's settings, or remove that directory to start afresh)"], err
    assert (interrupted_sweep / CHECKPOINT_DIR / STATE_FILE).read_bytes() == before  # the checkpoint is untouched


def test_resume_as_the_other_command_is_refused(interrupted_sweep, saved_model):
    code, _, err = run(command("scan", saved_model, interrupted_sweep, "--resume"))
    assert code == 2 and len(lines(err)) == 1
    assert "the command is 'scan' here but 'sweep' in the checkpoint" in err


def test_fresh_run_into_an_out_holding_a_checkpoint_is_refused(interrupted_sweep, saved_model):
    code, _, err = run(command("sweep", saved_model, interrupted_sweep))
    assert code == 2 and len(lines(err)) == 1
    assert f"3 of {SWEEP_UNITS} configurations done" in err and "add --resume" in err, err
    assert (interrupted_sweep / CHECKPOINT_DIR / STATE_FILE).is_file()


def test_resume_without_a_checkpoint_exits_2(saved_model, tmp_path):
    out = tmp_path / "out"
    code, _, err = run(command("sweep", saved_model, out, "--resume"))
    assert code == 2 and len(lines(err)) == 1
    assert f"no checkpoint in {out / CHECKPOINT_DIR}" in err
    assert not out.exists()
    args = command("sweep", saved_model, out, "--resume")
    code, _, err = run(args[:args.index("--out")] + ["--resume"])  # no --out at all
    assert code == 2 and len(lines(err)) == 1 and "--resume needs the --out" in err


def test_the_checkpoint_belongs_to_its_model_and_text(saved_model, token_ids, tokenizer, tmp_path, monkeypatch):
    """Through the Python API: changed weights, or other token ids, are refused by their fingerprints."""
    cfg = SweepConfig(model="tiny", layers=(2, 3), d_r=(1,), n_blocks=4, seq_len=32, calib_blocks=2, calib_from="eval",
                      device="cpu", backend="torch", batch_size=4, progress=False)
    out = str(tmp_path / "out")
    quiet = lambda *_: None  # noqa: E731
    interrupt_after_save(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, model=build_model(vocab_size=len(tokenizer)), ids=token_ids, log=quiet,
                  checkpoint=Checkpoint(out, "sweep", cfg))
    monkeypatch.undo()
    changed = build_model(vocab_size=len(tokenizer))
    with torch.no_grad():
        changed.transformer.h[0].mlp.c_fc.weight[0, 0] += 1e-3
    with pytest.raises(NqpqError, match=r"the model's weights \(fingerprint\)"):
        run_sweep(cfg, model=changed, ids=token_ids, log=quiet, checkpoint=Checkpoint(out, "sweep", cfg, resume=True))
    other_ids = token_ids.roll(1)
    with pytest.raises(NqpqError, match=r"the token ids of the text \(fingerprint\)"):
        run_sweep(cfg, model=build_model(vocab_size=len(tokenizer)), ids=other_ids, log=quiet,
                  checkpoint=Checkpoint(out, "sweep", cfg, resume=True))
    # The right model and text resume it, to the uninterrupted run's results.
    said = []
    resumed = run_sweep(cfg, model=build_model(vocab_size=len(tokenizer)), ids=token_ids, log=said.append,
                        checkpoint=Checkpoint(out, "sweep", cfg, resume=True))
    assert "resuming: 2 of 4 configurations done" in " ".join(said)
    whole = run_sweep(cfg, model=build_model(vocab_size=len(tokenizer)), ids=token_ids, log=quiet)
    for results in (resumed, whole):
        results.pop("timings")
        results.pop("basis")
        drop_measured_cost(results)
    assert resumed == whole


def test_an_interrupted_write_leaves_the_previous_file(tmp_path):
    (tmp_path / "state.json").write_text("old")

    def torn(temp):
        Path(temp).write_text("ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        nqpq.experiments.checkpoint_files.atomic_write(str(tmp_path), "state.json", torn)
    assert (tmp_path / "state.json").read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]  # no temporary file left


@contextlib.contextmanager
def one_thread():
    """The process's arithmetic as a subprocess with OMP_NUM_THREADS=1 does it (a BLAS may round otherwise on more
    threads), so results of both can be compared bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # a real process: start-up, then a scan twice in this one
def test_a_real_sigterm_to_a_scan_keeps_what_finished(saved_model, tmp_path):
    """``python -m nqpq scan`` sent a real SIGTERM (a scheduler's kill) once a configuration is kept: exit 143, the
    checkpoint kept as for Ctrl-C (whose real-process test is test_cli's); ``--resume`` then gives the uninterrupted
    scan's results."""
    signum, what = signal.SIGTERM, "terminated (SIGTERM)"
    model_dir, _ = saved_model
    text = tmp_path / "long.raw"
    text.write_text(wikitext_text(n_articles=60, seed=4), encoding="utf-8")
    # Enough configurations that the scan is still running when the first is kept (~2 s in all, on one thread).
    flags = ["--layers", "0", "1", "2", "3", "--d-r", "1", "2", "4", "8", "16", "--n-blocks", "8", "--seq-len", "64",
             "--calib-blocks", "2", "--device", "cpu", "--batch-size", "4", "--no-progress"]
    args = ["scan", "--model", str(model_dir), "--text-file", str(text), *flags]
    out, whole = tmp_path / "out", tmp_path / "whole"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "nqpq", *args, "--out", str(out)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        state = out / CHECKPOINT_DIR / STATE_FILE
        deadline = time.monotonic() + 120
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the scan ended before it could be interrupted"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err[-2000:]
    kept = json.loads(state.read_text())
    total = 1 + 4 * 6
    done = int(kept["baseline"]) + len(kept["losses"])
    assert 1 <= done <= total  # (all of them where the signal came while the results were written)
    assert_kept(proc.returncode, err, out, done, total, what, 128 + signum)
    with one_thread():
        code, stdout, err = run([*args, "--out", str(out), "--resume"])
        assert code == 0, err
        assert f"resuming: {done} of {total} configurations done" in stdout
        code, _, err = run([*args, "--out", str(whole)])
        assert code == 0, err
    assert comparable(out) == comparable(whole)
    assert not (out / CHECKPOINT_DIR).exists()


INTERRUPT_SCRIPT = '''
import sys
import nqpq.experiments.resume
from nqpq.cli import main

keep = nqpq.experiments.resume.Checkpoint.losses
done = [0]


def losses(self, key, compute):  # Ctrl-C on every rank once k configurations have finished
    value = keep(self, key, compute)
    done[0] += 1
    if done[0] == int(sys.argv[1]):
        raise KeyboardInterrupt
    return value


nqpq.experiments.resume.Checkpoint.losses = losses
sys.exit(main(sys.argv[2:]))
'''


@pytest.mark.slow  # three torchrun launches of two ranks each
def test_torchrun_interrupted_then_resumed_equals_uninterrupted(saved_model, tmp_path):
    """Two gloo ranks: rank 0 keeps the checkpoint, every rank learns it (and the automatic batch size the
    interrupted run chose) from rank 0 on resume; the results equal an uninterrupted torchrun run's."""
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT_SCRIPT, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    out, whole = tmp_path / "out", tmp_path / "whole"
    # No --batch-size: the resumed run must take the interrupted one's.
    args = [a for a in command("sweep", saved_model, out) if a not in ("--batch-size", "4")]

    def launch(*extra):
        return subprocess.run([*torchrun, *extra], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    interrupted = launch(str(script), "3", *args)
    assert interrupted.returncode != 0
    kept = [line for line in interrupted.stderr.splitlines() if line.startswith("nqpq: ")]
    assert kept == [f"nqpq: interrupted; kept 4 of {SWEEP_UNITS} configurations in {out / CHECKPOINT_DIR}: rerun "
                    "the same command with --resume to finish it"], interrupted.stderr[-3000:]
    resumed = launch("-m", "nqpq", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count(f"resuming: 4 of {SWEEP_UNITS} configurations done") == 1  # rank 0 says it
    uninterrupted = launch("-m", "nqpq", *[str(whole) if a == str(out) else a for a in args])
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert comparable(out)["config"]["world_size"] == 2
    assert comparable(out) == comparable(whole)
    assert not (out / CHECKPOINT_DIR).exists()

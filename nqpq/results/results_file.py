"""A run's files on disk, ``results.json``, the plots and ``basis.pt``, written whole or not at all (``write_results``);
the ``--out`` directory checked before the run (``check_out_dir``); and ``results.json`` read back, checked for kind,
format version and keys, an older format re-derived (``load_results``)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from .upgrade import UPGRADABLE, upgrade

# results.json layouts (sweep, scan); `nqpq report` refuses others. 2: calibration source and draws, bootstrap
# intervals, block losses. 3: verdict["outcome"] (INCONCLUSIVE where top-1's loss is not measurable, no intervals
# below MIN_BLOCKS blocks, unbounded recovered-% bounds null) and, in a scan, each layer's verdict.
SWEEP_FORMAT_VERSION = 3
SCAN_FORMAT_VERSION = 3

# What each kind of results.json must hold at the top level; a file without them is refused.
REQUIRED_KEYS = {
    "sweep": ("ppl_baseline", "ppl_top1", "ppl_full", "curve", "spectrum", "mean_eff_dim", "verdict", "crystallinity",
              "config"),
    "scan": ("ppl_baseline", "layers", "crystallinity", "config"),
}


def check_out_dir(path: str) -> None:
    """Fail before the sweep runs, not after, if ``path`` cannot hold the results."""
    from ..errors import NqpqError

    if os.path.exists(path) and not os.path.isdir(path):
        raise NqpqError(f"--out {path!r} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".nqpq-probe-")
        probe.close()
    except OSError as err:
        raise NqpqError(f"--out {path!r} is not writable: {err}") from err


def json_ready(results: dict) -> dict:
    """The results without the in-memory basis (which is saved separately as basis.pt)."""
    return {k: v for k, v in results.items() if k != "basis"}


def plots_for(results: dict) -> tuple:
    """``(file name, draw(results, path))`` for each plot of this kind of results."""
    from .plots import SCAN_PLOTS, SWEEP_PLOTS

    if results.get("kind") == "scan":
        return SCAN_PLOTS
    # A sweep from before costs were recorded (an upgraded format-2 file) has no cost to plot.
    return SWEEP_PLOTS if "cost" in results else tuple(p for p in SWEEP_PLOTS if p[0] != "delta_ppl_vs_cost.png")


def write_results(out_dir: str, results: dict, *, include_json: bool = True) -> list[str]:
    """Write results.json, the plots and basis.pt into ``out_dir``; all of them or none.

    ``include_json=False`` (``nqpq report``) redraws the plots only.
    """

    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(dir=out_dir, prefix=".nqpq-")
    try:
        names = []
        if include_json:
            with open(os.path.join(staging, "results.json"), "w") as f:
                json.dump(json_ready(results), f, indent=2)
            names.append("results.json")
        for name, draw in plots_for(results):
            draw(results, os.path.join(staging, name))
            names.append(name)
        if "basis" in results:
            results["basis"].save(os.path.join(staging, "basis.pt"))
            names.append("basis.pt")
        written = []
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
            written.append(os.path.join(out_dir, name))
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_results(out_dir: str) -> dict:
    """``out_dir/results.json`` of a sweep or a scan, checked for kind, version and top-level keys; a file of an
    older format this version can re-derive (``nqpq.results.upgrade``) is returned as today's format, marked
    ``upgraded_from``."""
    from ..errors import NqpqError

    path = os.path.join(out_dir, "results.json")
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except FileNotFoundError as err:
        raise NqpqError(f"{path}: no such file (give the --out directory of a sweep or a scan)") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NqpqError(f"{path} cannot be read as JSON: {err}") from err
    if not isinstance(results, dict):
        raise NqpqError(f"{path}: expected a JSON object, got {type(results).__name__}")
    versions = {"sweep": SWEEP_FORMAT_VERSION, "scan": SCAN_FORMAT_VERSION}
    kind, version = results.get("kind"), results.get("format_version")
    if kind not in versions:
        raise NqpqError(f"{path}: 'kind' is {kind!r}, not 'sweep' or 'scan' (written by another nqpq version?)")
    if version in UPGRADABLE and version != versions[kind]:
        try:
            results = upgrade(results, version)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, StopIteration) as err:
            raise NqpqError(f"{path}: a {kind} results.json of format version {version} that cannot be re-derived "
                            f"under version {versions[kind]}'s rule ({type(err).__name__}: {err})") from err
    elif version != versions[kind]:
        raise NqpqError(f"{path}: a {kind} results.json of format version {version!r}; this nqpq reads version "
                        f"{versions[kind]} (re-run the {kind} with this version)")
    missing = [k for k in REQUIRED_KEYS[kind] if k not in results]
    if missing:
        raise NqpqError(f"{path}: a {kind} results.json without {missing}: the file is broken")
    return results

"""The README's real-model tables, from the results.json files that ``benchmarks/smollm2.sh`` wrote.

    python -m benchmarks.smollm2_table benchmarks/results/smollm2

Reads only what nqpq wrote (no model; a format-2 file's verdicts re-derived from its stored block losses) and
prints, and writes to DIR/tables.md, Markdown tables:
the calibration comparison (held out / the spec's / another text, at 8 and 30 blocks), the sink comparison, the
per-layer scan, and the wall times.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nqpq.results.report_lines import verdict_summary
from nqpq.results.results_file import load_results


def _load(root: Path, name: str) -> dict | None:
    path = root / name / "results.json"
    # An older format is read under today's rule (nqpq.results.upgrade), as `nqpq report` reads it.
    return load_results(str(root / name)) if path.is_file() else None


def _ci(ci, fmt: str) -> str:
    """An interval's "lo … hi"; a side results.json leaves null is unbounded (docs/verdict.md)."""
    if ci is None:
        return "n/a"
    lo = "−∞" if ci[0] is None else format(ci[0], fmt)
    hi = "∞" if ci[1] is None else format(ci[1], fmt)
    return f"{lo} … {hi}"


def _rec(entry: dict) -> str:
    if entry["recovered_pct"] is None:
        return "n/a"
    return f"{entry['recovered_pct']:.1f} % ({_ci(entry['recovered_pct_ci95'], '.1f')})"


def _at(curve: list[dict], d_r: int) -> dict | None:
    return next((c for c in curve if c["d_r"] == d_r), None)


def calibration_table(root: Path) -> list[str]:
    rows = ["| scored blocks | basis fitted on | baseline PPL | top-1 ΔPPL (95 % CI) | d_r=8 recovers (95 % CI) | "
            "d_r=32 recovers (95 % CI) | verdict |", "|---|---|---|---|---|---|---|"]
    labels = {"eval": "the first 4 scored blocks (the spec)", "heldout": "the 4 blocks after the scored ones",
              "text": "4 blocks of WikiText test"}
    for n in (8, 30):
        for source in ("eval", "heldout", "text"):
            r = _load(root, f"sweep-{n}-{source}")
            if r is None:
                continue
            draws = r["config"]["calibration"]["draws"]
            label = labels[source] + (f" ({draws} draws, draw 0 shown)" if draws > 1 else "")
            top1 = r["ppl_top1"] - r["ppl_baseline"]
            cells = [_rec(c) if (c := _at(r["curve"], d)) else "–" for d in (8, 32)]
            rows.append(f"| {n} | {label} | {r['ppl_baseline']:.2f} | {top1:+.2f} "
                        f"({_ci(r['top1_delta_ppl_ci95'], '+.2f')}) | {cells[0]} | {cells[1]} | "
                        f"{verdict_summary(r['verdict'])} |")
    return rows


def sink_table(root: Path, name: str) -> list[str]:
    r = _load(root, name)
    if r is None:
        return []
    rows = ["| sink tokens n | top-1 ΔPPL (95 % CI) | mean r90 of ε | d_r=8 recovers (95 % CI) | "
            "d_r=32 recovers (95 % CI) | sink mass | winner share | verdict |", "|---|---|---|---|---|---|---|---|"]
    for e in r["sinks"]:
        cells = [_rec(c) if (c := _at(e["curve"], d)) else "–" for d in (8, 32)]
        cryst = e["crystallinity"]
        mass = sum(c["sink_mass_mean"] for c in cryst) / len(cryst)
        share = sum(c["winner_share_mean"] for c in cryst) / len(cryst)
        rows.append(f"| {e['sink_tokens']} | {e['ppl_top1'] - r['ppl_baseline']:+.2f} "
                    f"({_ci(e['top1_delta_ppl_ci95'], '+.2f')}) | {e['mean_eff_dim']:.1f} / {r['config']['d_head']} "
                    f"| {cells[0]} | {cells[1]} | {mass:.3f} | {share:.3f} | {verdict_summary(e['verdict'])} |")
    return rows


def scan_table(root: Path, name: str = "scan-8") -> list[str]:
    r = _load(root, name)
    if r is None:
        return []
    d_rs = r["config"]["d_r"]
    by_layer: dict[int, list[dict]] = {}
    for c in r["crystallinity"]:
        by_layer.setdefault(c["layer"], []).append(c)
    rows = ["| layer | top-1 ΔPPL (95 % CI) | " + " | ".join(f"d_r={d} recovers (95 % CI)" for d in d_rs)
            + " | r90 | top-1 p | sink frac |", "|---" * (4 + len(d_rs)) + "|---|"]
    for e in r["layers"]:
        heads = by_layer[e["layer"]]
        sink = sum(h["sink_frac"] for h in heads) / len(heads)
        cells = " | ".join(_rec(c) for c in e["curve"])
        rows.append(f"| {e['layer']} | {e['ppl_top1'] - r['ppl_baseline']:+.2f} "
                    f"({_ci(e['top1_delta_ppl_ci95'], '+.2f')}) | {cells} | {e['r90_mean']:.1f} | "
                    f"{e['top1_prob_mean']:.3f} | {sink:.2f} |")
    return rows


def times_table(root: Path) -> list[str]:
    path = root / "times.tsv"
    if not path.is_file():
        return []
    rows = ["| run | wall time (2 CPU cores) | command |", "|---|---|---|"]
    for line in path.read_text().splitlines():
        name, seconds, command = line.split("\t")
        rows.append(f"| {name} | {int(seconds) // 60} min {int(seconds) % 60:02d} s | `{command}` |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="the OUT folder of benchmarks/smollm2.sh")
    root = Path(parser.parse_args(argv).dir)
    sections = [("Calibration apart from evaluation (layers 23–29, WikiText validation)", calibration_table(root)),
                ("The sink kept apart, 8 blocks, the spec's calibration", sink_table(root, "sinks-8-eval")),
                ("The sink kept apart, 30 blocks, held-out calibration", sink_table(root, "sinks-30-heldout")),
                ("Each layer alone (nqpq scan, 8 blocks, held-out calibration)", scan_table(root)),
                ("Wall times", times_table(root))]
    text = "\n".join(f"### {title}\n\n" + "\n".join(rows) + "\n" for title, rows in sections if rows)
    (root / "tables.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

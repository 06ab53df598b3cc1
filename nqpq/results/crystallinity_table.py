"""The crystallinity statistics of a results dict, per layer and as the report's table (pure: numbers in, lines out).

The statistics themselves are gathered by ``nqpq.experiments.crystallinity.CrystallinityAccumulator``; what each
key means is in that module's docstring.
"""

from __future__ import annotations

STAT_KEYS = ("top1_prob_mean", "sink_frac", "self_frac", "prev_frac", "sink_mass_mean", "winner_share_mean")


def layer_means(crystallinity: list[dict]) -> dict[int, dict[str, float]]:
    """Per layer, each statistic averaged over that layer's heads (for the report's short table)."""
    by_layer: dict[int, list[dict]] = {}
    for entry in crystallinity:
        by_layer.setdefault(entry["layer"], []).append(entry)
    # Results written before the sink statistics existed lack their keys: average what every entry holds.
    return {
        layer: {key: sum(e[key] for e in entries) / len(entries) for key in STAT_KEYS
                if all(key in e for e in entries)}
        for layer, entries in sorted(by_layer.items())
    }


def format_table(crystallinity: list[dict], sink_tokens: int = 0) -> list[str]:
    """The report's crystallinity table: mean top-1 probability and sink/self/prev fractions per layer; with
    ``sink_tokens > 0``, where i* is the winner beyond the sink, or with a learned sink (a layer whose sink mass
    is not 0 with no sink tokens), also the sink mass and the winner's share."""
    learned = any(e.get("sink_mass_mean", 0.0) != 0.0 for e in crystallinity)  # NaN counts: it is not 0
    sink = sink_tokens > 0 or learned
    title = " Crystallinity (baseline model, all evaluation rows; mean over heads"
    if sink_tokens > 0:
        title += f"; first {sink_tokens} key(s) kept apart as the sink"
    if learned:
        title += "; sink mass includes the learned sink's"
    title += "):"
    lines = [title, f" {'layer':>5} | top-1 p   sink   self   prev" + ("  sink mass  share" if sink else "")]
    for layer, m in layer_means(crystallinity).items():
        line = (f" {layer:5d} | {m['top1_prob_mean']:7.4f} {m['sink_frac']:6.3f} {m['self_frac']:6.3f} "
                f"{m['prev_frac']:6.3f}")
        if sink:
            line += f"  {m['sink_mass_mean']:9.4f} {m['winner_share_mean']:6.4f}"
        lines.append(line)
    return lines

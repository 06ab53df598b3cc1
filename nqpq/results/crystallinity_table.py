"""The crystallinity statistics of a results dict, per layer and as the report's tables (pure: numbers in, lines out).

The statistics themselves are gathered by ``nqpq.experiments.crystallinity.CrystallinityAccumulator``; what each
key means is in that module's docstring. ``sink_metrics`` derives Gu et al.'s attention-sink metric from them.
"""

from __future__ import annotations

import math

STAT_KEYS = ("top1_prob_mean", "sink_frac", "self_frac", "prev_frac", "sink_mass_mean", "winner_share_mean",
             "first_key_mass_mean")
SINK_EPS = 0.3  # Gu et al. (ICLR 2025)'s threshold ε on α₁


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


def sink_metrics(crystallinity: list[dict], eps: float = SINK_EPS) -> dict | None:
    """Gu et al. (ICLR 2025)'s attention-sink metric from per-head α₁ (``first_key_mass_mean``); None where the
    statistics hold no α₁ (results written before it existed).

    Per layer l: Sink₁^ε(l) = the share of its heads with α₁ > ε, beside the layer's mean α₁ and its first-token argmax
    share (the mean over heads of ``sink_frac``: the rows whose argmax is the first key). Over the model, Gu's
    Sink₁^ε = (1/L) Σ_l Sink₁^ε(l), the mean of the layers' shares (the share of all (layer, head)s where every layer
    has the same number of heads), and the argmax share likewise. A head whose α₁ is NaN (a non-finite row) makes its
    layer's share and the model's NaN: never counted as "not a sink"."""
    if not crystallinity or not all("first_key_mass_mean" in e for e in crystallinity):
        return None
    by_layer: dict[int, list[dict]] = {}
    for entry in crystallinity:
        by_layer.setdefault(entry["layer"], []).append(entry)
    layers = []
    for layer, entries in sorted(by_layer.items()):
        alphas = [e["first_key_mass_mean"] for e in entries]
        share = math.nan if any(math.isnan(a) for a in alphas) else sum(a > eps for a in alphas) / len(alphas)
        layers.append({"layer": layer, "sink_rate": share, "first_key_mass_mean": sum(alphas) / len(alphas),
                       "first_token_argmax_share": sum(e["sink_frac"] for e in entries) / len(entries)})
    return {
        "eps": eps,
        "sink_rate": sum(e["sink_rate"] for e in layers) / len(layers),
        "first_token_argmax_share": sum(e["first_token_argmax_share"] for e in layers) / len(layers),
        "layers": layers,
    }


def format_sink_metrics(metrics: dict | None) -> list[str]:
    """The report's attention-sink table (``sink_metrics``' dict); no lines for None."""
    if metrics is None:
        return []
    eps = metrics["eps"]
    lines = [f" Attention sink (Gu et al., ICLR 2025): Sink1 = share of heads whose mean attention on the first token "
             f"(a1) exceeds eps = {eps:g}; argmax = share of rows whose argmax is the first token:",
             f" {'layer':>5} | {'mean a1':>7} {'Sink1':>6} {'argmax':>6}"]
    for e in metrics["layers"]:
        lines.append(f" {e['layer']:5d} | {e['first_key_mass_mean']:7.4f} {100 * e['sink_rate']:5.1f}% "
                     f"{100 * e['first_token_argmax_share']:5.1f}%")
    lines.append(f" model: Sink1^{eps:g} = {100 * metrics['sink_rate']:.2f} % (mean over layers); first-token argmax "
                 f"share = {100 * metrics['first_token_argmax_share']:.2f} %")
    return lines

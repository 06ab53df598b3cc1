"""The plots a reader sees (nqpq.results.plots): every text inside the canvas, each plot saying what it averages and
matching the printed table, the recovered-% colour scale robust to an outlier, INCONCLUSIVE drawn as such."""

from __future__ import annotations

import math

import matplotlib
import pytest

matplotlib.use("Agg")

from matplotlib.text import Text  # noqa: E402

from nqpq.results.plots import SCAN_FIGURES, SWEEP_FIGURES, recovered_figure, spectrum_figure  # noqa: E402
from nqpq.results.report import print_report  # noqa: E402
from nqpq.results.results_file import write_results  # noqa: E402

# A name as long as a converted checkpoint's label: it must wrap, not run off both ends of the canvas.
LONG_MODEL = ("/home/someone/.cache/nqpq/smollm2-135m/HuggingFaceTB--SmolLM2-135M (registry smollm2-135m, sha256 "
              "b179c9523d0e5a6f0f2b8c1d1e4a9b7c, converted from GGUF)")


def spectrum(layers=(26, 27), heads=3, width=16) -> list[dict]:
    """Per (layer, head) cumulative variances that differ by head (so mean and head 0 differ)."""
    out = []
    for layer in layers:
        for head in range(heads):
            weights = [(head + 1.5) ** -r for r in range(width)]  # the higher the head, the faster its curve rises
            total = sum(weights)
            cv = [sum(weights[: r + 1]) / total for r in range(width)]
            out.append({"layer": layer, "head": head, "cumulative_variance": cv,
                        "r90": 1 + sum(v < 0.9 for v in cv)})
    return out


def config(**kw) -> dict:
    cfg = {"model": LONG_MODEL, "family": "llama", "n_heads": 9, "n_kv_heads": 3, "head_dim": 64, "d_head": 64,
           "n_blocks": 30,
           "seq_len": 256, "layers": [26, 27], "d_r": [1, 8, 32], "random_weights": True, "qk_dim": 64,
           "v_dim": 64, "sliding_window": {"26": None, "27": None}, "attn_softcap": None,
           "final_logit_softcap": None, "dtype": "float32", "n_layers": 30, "calib_blocks": 4, "bos": False,
           "calibration": {"source": "heldout", "blocks_per_draw": 4, "draws": 1, "first_blocks": [30]}}
    return {**cfg, **kw}


def verdict_of(outcome: str, **kw) -> dict:
    base = {"outcome": outcome, "compressible": {"YES": True, "PARTIAL": False}.get(outcome), "d_r_min": None,
            "best_d_r": None, "best_recovered_pct": None, "recovered_pct": None, "ci95": None, "settled": False,
            "draws_agree": None, "n_blocks": 30, "draws_d_r_min": [None], "top1_delta_ppl_ci95": [0.5, 1.5],
            "reason": None, "explanation": None}
    return {**base, **kw}


def curve_point(d_r, ppl, recovered, ci) -> dict:
    return {"d_r": d_r, "ppl": ppl, "delta_ppl": ppl - 20.0, "recovered_pct": recovered,
            "delta_ppl_ci95": [ppl - 20.4, ppl - 19.6], "recovered_pct_ci95": ci, "block_losses": [],
            "recovered_pct_draws": [recovered], "recovered_pct_spread": None}


def sweep_results(inconclusive: bool) -> dict:
    if inconclusive:
        curve = [curve_point(d, 20.0 + 0.1 / d, None, None) for d in (1, 8, 32)]
        verdict = verdict_of("INCONCLUSIVE", reason="no_measurable_loss", top1_delta_ppl_ci95=[-0.286, 0.336],
                             explanation="top-1 loses nothing measurable at this setting: ΔPPL CI [-0.286, +0.336]")
        top1_ci = [-0.286, 0.336]
    else:
        curve = [curve_point(1, 20.6, 40.0, [20.0, 60.0]), curve_point(8, 20.05, 95.0, [91.0, None]),
                 curve_point(32, 19.9, 110.0, [None, 150.0])]
        verdict = verdict_of("YES", d_r_min=8, best_d_r=32, best_recovered_pct=110.0, recovered_pct=95.0,
                             ci95=[91.0, None])
        top1_ci = [0.5, 1.5]
    cost = {"seq_len": 256, "decode_context_len": 256, "device": "cpu", "dtype": "float32", "repeats": 3,
            "configurations": [{"key": key, "relative_prefill_flops": flops, "relative_decode_flops": flops,
                                "relative_decode_bytes": flops + 0.05, "op_time_ms": 3.0 * flops,
                                "relative_op_time": flops * 1.2}
                               for key, flops in (("full", 1.0), ("top1", 0.5), ("lowrank_d1", 0.52),
                                                  ("lowrank_d8", 0.6), ("lowrank_d32", 0.8))]}
    return {"kind": "sweep", "ppl_baseline": 20.0, "ppl_top1": 21.0, "ppl_full": 20.0, "curve": curve, "cost": cost,
            "full_delta_ppl_ci95": [-0.01, 0.01],
            "top1_delta_ppl_ci95": top1_ci, "spectrum": spectrum(), "mean_eff_dim": 5.0, "verdict": verdict,
            "crystallinity": [], "sink_tokens": 0, "sinks": [], "config": config(),
            "bootstrap": {"method": "paired percentile bootstrap over the scored blocks", "resamples": 2000,
                          "level": 0.95, "seed": 42, "n_blocks": 30, "min_blocks": 8, "distinct_resamples": 1}}


def scan_layer(layer: int, recovered: list[float | None], outcome: str, reason: str | None = None) -> dict:
    curve = [curve_point(d, 20.5, r, None if r is None else [r - 5, r + 5]) for d, r in zip((1, 8, 32), recovered)]
    return {"layer": layer, "ppl_top1": 21.0 if outcome != "INCONCLUSIVE" else 20.05,
            "top1_delta_ppl_ci95": [0.5, 1.5] if outcome != "INCONCLUSIVE" else [-0.3, 0.4], "curve": curve,
            "verdict": verdict_of(outcome, reason=reason), "r90_mean": 5.0, "top1_prob_mean": 0.4}


def scan_results() -> dict:
    layers = [scan_layer(0, [20.0, 60.0, 88.0], "PARTIAL"),
              scan_layer(1, [None, None, None], "INCONCLUSIVE", "no_measurable_loss"),
              scan_layer(2, [-40.0, 95.0, 569.9], "YES")]  # one 570 % outlier: it must not set the colour scale
    crystallinity = [{"layer": li, "head": h, "top1_prob_mean": 0.1 * (h + 1), "sink_frac": 0.1, "self_frac": 0.1,
                      "prev_frac": 0.1, "sink_mass_mean": 0.0, "winner_share_mean": 0.1}
                     for li in range(3) for h in range(9)]
    return {"kind": "scan", "ppl_baseline": 20.0, "layers": layers, "crystallinity": crystallinity,
            "sink_tokens": 0, "sinks": [], "config": config(layers=[0, 1, 2]),
            "bootstrap": {"method": "paired percentile bootstrap over the scored blocks", "resamples": 2000,
                          "level": 0.95, "seed": 42, "n_blocks": 30, "min_blocks": 8, "distinct_resamples": 1}}


def assert_text_inside_canvas(fig, name: str) -> None:
    """Every drawn text (titles, labels, tick labels, legends, annotations) inside the figure: the tight bbox of
    everything drawn within the canvas, and each titled/labelled text artist's window extent too."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    w, h = fig.get_size_inches()
    tight = fig.get_tightbbox(renderer)
    slack = 1.0 / fig.dpi  # one pixel
    assert tight.x0 >= -slack and tight.y0 >= -slack and tight.x1 <= w + slack and tight.y1 <= h + slack, (name, tight)
    canvas = fig.bbox
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    # Tick labels matplotlib did not draw (outside the view) keep stale positions: only drawn ones count.
    drawn_ticks = {id(t) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
                   for tick in axis._update_ticks() for t in (tick.label1, tick.label2)}
    checked = 0
    for t in texts:
        if t in {tick_label for ax in fig.axes for tick_label in ax.get_xticklabels() + ax.get_yticklabels()} \
                and id(t) not in drawn_ticks:
            continue
        box = t.get_window_extent(renderer)
        assert box.x0 >= canvas.x0 - 1 and box.x1 <= canvas.x1 + 1, (name, t.get_text(), box, canvas)
        assert box.y0 >= canvas.y0 - 1 and box.y1 <= canvas.y1 + 1, (name, t.get_text(), box, canvas)
        checked += 1
    assert checked >= 5, name
    assert fig._suptitle is not None and LONG_MODEL.split()[0][:20] in fig._suptitle.get_text().replace("\n", ""), name


CASES = [("sweep YES", sweep_results(False), SWEEP_FIGURES), ("sweep INCONCLUSIVE", sweep_results(True), SWEEP_FIGURES),
         ("scan", scan_results(), SCAN_FIGURES)]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_every_text_is_inside_the_canvas(case):
    import matplotlib.pyplot as plt

    label, results, figures = CASES[case]
    for name, figure in figures:
        fig = figure(results)
        try:
            assert_text_inside_canvas(fig, f"{label}: {name}")
        finally:
            plt.close(fig)


def test_written_pngs_are_the_whole_canvas(tmp_path):
    """write_results writes each plot at the figure's own size (no bbox cropping that could hide overflow)."""
    from matplotlib.image import imread

    for results in (sweep_results(False), scan_results()):
        written = write_results(str(tmp_path / results["kind"]), results, include_json=False)
        for path in written:
            if path.endswith(".png"):
                figure = dict(SWEEP_FIGURES + SCAN_FIGURES)[path.rsplit("/", 1)[1]]
                fig = figure(results)
                w, h = fig.get_size_inches()
                matplotlib.pyplot.close(fig)
                img = imread(path)
                assert img.shape[:2] == (round(h * 120), round(w * 120)), path


def test_spectrum_plot_is_the_mean_over_heads_and_the_table_says_so():
    import matplotlib.pyplot as plt

    results = sweep_results(False)
    fig = spectrum_figure(results)
    try:
        lines = {ln.get_label(): ln.get_ydata() for ln in fig.axes[0].get_lines()}
        for layer in (26, 27):
            heads = [s["cumulative_variance"] for s in results["spectrum"] if s["layer"] == layer]
            want = [math.fsum(col) / len(col) for col in zip(*heads)]  # float64 mean over the heads, by hand
            got = lines[f"layer {layer}: mean of 3 heads"]
            assert list(got) == pytest.approx(want, rel=1e-12)
            assert abs(want[1] - heads[0][1]) > 0.01  # mean and head 0 differ (r=2), so the labels matter
        assert "mean over each layer's heads" in fig.axes[0].get_title().replace("\n", " ")
    finally:
        plt.close(fig)
    printed: list[str] = []
    print_report(results, printed.append)
    text = "\n".join(printed)
    assert "'mean': over the layer's heads, as plotted in cumulative_variance.png; 'H 0': head 0 alone" in text
    for layer in (26, 27):
        heads = [s["cumulative_variance"] for s in results["spectrum"] if s["layer"] == layer]
        mean_row = next(ln for ln in printed if f"L{layer} mean of 3 |" in ln)
        head0_row = next(ln for ln in printed if f"L{layer} H 0 |" in ln)
        at = (0, 1, 3, 7, 15)  # r = 1, 2, 4, 8, 16
        assert mean_row.split("|")[1].split() == [f"{math.fsum(c[r] for c in heads) / 3:.2f}" for r in at]
        assert head0_row.split("|")[1].split() == [f"{heads[0][r]:.2f}" for r in at]


def test_recovered_heatmap_clips_the_outlier_and_marks_inconclusive_cells():
    import matplotlib.pyplot as plt
    import numpy as np

    results = scan_results()
    fig = recovered_figure(results)
    try:
        ax = fig.axes[0]
        image = ax.get_images()[0]
        assert image.get_clim() == (0.0, 100.0)  # the 570 % cell does not set the scale
        data = np.ma.filled(image.get_array(), np.nan)
        assert np.isnan(data[1]).all()  # the INCONCLUSIVE layer has no colour from a number
        assert data[2, 2] == pytest.approx(569.9) and data[2, 0] == -40.0
        texts = [[None] * 3 for _ in range(3)]
        for t in ax.texts:
            x, y = t.get_position()
            texts[round(y)][round(x)] = t.get_text()
        assert texts[1] == ["INC", "INC", "INC"]
        assert texts[2] == ["-40▼", "95", "570▲"]  # clipped cells marked, the value kept
        assert texts[0] == ["20", "60", "88*"]  # 88 ± 5 crosses 90: framed, starred
        hatched = [p for p in ax.patches if p.get_hatch() == "///"]
        assert len(hatched) == 1 and hatched[0].get_y() == pytest.approx(0.5)  # row 1, the INCONCLUSIVE layer
        legend = ax.get_xlabel().replace("\n", " ")
        assert "INC, hatched: INCONCLUSIVE" in legend and "beyond the colour scale 0–100 %" in legend
        assert fig.axes[1].get_ylabel().startswith("recovered % (colours clipped to 0–100)")
    finally:
        plt.close(fig)


def test_inconclusive_sweep_draws_no_recovered_number():
    import matplotlib.pyplot as plt

    results = sweep_results(True)
    fig = SWEEP_FIGURES[0][1](results)
    try:
        ax2 = fig.axes[1]
        assert not ax2.get_lines()  # no recovered-% curve
        message = " ".join(t.get_text().replace("\n", " ") for t in ax2.texts)
        assert "INCONCLUSIVE: top-1 loses nothing measurable at this setting: ΔPPL CI [-0.286, +0.336]" in message
    finally:
        plt.close(fig)

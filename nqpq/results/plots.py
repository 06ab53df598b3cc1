"""The plots of a sweep and of a scan by file name, drawn from the results dict alone (``nqpq report`` redraws them):
the figures are in ``nqpq.results.scan_plots`` and ``nqpq.results.sweep_plots``, what they share in
``nqpq.results.plot_common``.

Every figure keeps its text inside the canvas: constrained layout, and titles wrapped to the figure's width as
measured by the renderer (a model name or path of any length). Each plot says what it averages.
"""

from __future__ import annotations

from collections.abc import Callable

from .plot_common import save_figure
from .scan_plots import delta_ppl_figure, recovered_figure, top1_prob_figure
from .sweep_plots import cost_figure, curve_figure, spectrum_figure


def _saver(figure: Callable) -> Callable[[dict, str], None]:
    def draw(results: dict, path: str) -> None:
        save_figure(figure(results), path)

    draw.__doc__ = figure.__doc__
    return draw


plot_recovered, plot_top1_prob, plot_delta_ppl = (_saver(f) for f in (recovered_figure, top1_prob_figure,
                                                                       delta_ppl_figure))
plot_curve, plot_spectrum = _saver(curve_figure), _saver(spectrum_figure)
plot_cost = _saver(cost_figure)

# (file name, figure(results)); results_file.write_results draws each through SCAN_PLOTS / SWEEP_PLOTS.
SCAN_FIGURES = (("recovered_heatmap.png", recovered_figure), ("top1_prob_heatmap.png", top1_prob_figure),
                ("delta_ppl_top1.png", delta_ppl_figure))
SWEEP_FIGURES = (("delta_ppl_vs_dr.png", curve_figure), ("cumulative_variance.png", spectrum_figure),
                 ("delta_ppl_vs_cost.png", cost_figure))
SCAN_PLOTS = tuple((name, _saver(figure)) for name, figure in SCAN_FIGURES)
SWEEP_PLOTS = tuple((name, _saver(figure)) for name, figure in SWEEP_FIGURES)

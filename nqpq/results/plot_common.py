"""What every plot of nqpq shares (matplotlib without a display, titles wrapped to the canvas as the renderer measures
them so that a model name or path of any length stays inside, saving, error bars from 95 % intervals, and the titles
of a sweep's and a scan's figures)."""

from __future__ import annotations

import math

CALIBRATION_NAMES = {"heldout": "held-out blocks", "eval": "scored blocks (spec)", "text": "another text"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def wrap_to_width(fig, text: str, fontsize: float, width_px: float) -> str:
    """``text`` with line breaks so that every line, measured by the figure's renderer at ``fontsize``, is at most
    ``width_px`` wide; a single word wider than that (a long path) is cut where it must be."""
    from matplotlib.font_manager import FontProperties

    renderer = fig.canvas.get_renderer()
    prop = FontProperties(size=fontsize)

    def width(s: str) -> float:
        return renderer.get_text_width_height_descent(s, prop, ismath=False)[0]

    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if width(candidate) <= width_px:
                line = candidate
                continue
            if line:
                lines.append(line)
            while width(word) > width_px and len(word) > 1:
                cut = max(1, max((k for k in range(1, len(word)) if width(word[:k]) <= width_px), default=1))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return "\n".join(lines)


def suptitle(fig, text: str, fontsize: float = 9) -> None:
    """The figure's title, wrapped to 96 % of its width (constrained layout keeps it inside vertically)."""
    fig.suptitle(wrap_to_width(fig, text, fontsize, 0.96 * fig.bbox.width), fontsize=fontsize)


def save_figure(fig, path: str) -> None:
    """Write ``fig`` to ``path`` (PNG, 120 dpi) and close it."""
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def error_bars(values: list[float | None], cis: list[list[float | None] | None],
               unbounded: float = 0.0) -> list[list[float]] | None:
    """matplotlib's ``yerr`` ([below], [above]) for point estimates and their 95 % intervals; None without any
    interval. An interval that misses its estimate (a skewed bootstrap can) draws no bar on that side; an unbounded
    side (None) draws a bar of length ``unbounded`` (the caller makes it reach past the axes, which clip it)."""
    if all(ci is None for ci in cis):
        return None

    def side(v: float, bound: float | None, sign: int) -> float:
        if bound is None:
            return unbounded
        return max(sign * (bound - v), 0.0) if math.isfinite(bound) else 0.0

    below, above = [], []
    for v, ci in zip(values, cis):
        if v is None or ci is None or not math.isfinite(v):
            below.append(0.0)
            above.append(0.0)
        else:
            below.append(side(v, ci[0], -1))
            above.append(side(v, ci[1], 1))
    return [below, above]


def blocks_text(cfg: dict) -> str:
    """How many blocks of how many tokens the numbers are over, for a title."""
    return f"{cfg['n_blocks']} blocks × {cfg['seq_len']} tokens"


def scan_title(results: dict) -> str:
    """The title of every scan figure: the model, its heads, the blocks; a demo run says its weights are random."""
    cfg = results["config"]
    tag = "\nRANDOM WEIGHTS (demo): the numbers say nothing about the model" if cfg.get("random_weights") else ""
    return (f"nqpq scan: {cfg['model']}\n{cfg['family']}, Hq={cfg['n_heads']}, Hkv={cfg['n_kv_heads']}, "
            f"D={cfg['head_dim']}; each layer crystallized alone; {blocks_text(cfg)}{tag}")


def sweep_title(results: dict) -> str:
    """The title of every sweep figure: the model, the layers, the blocks, where the basis was fitted; a demo run
    says its weights are random."""
    cfg = results["config"]
    tag = "\nRANDOM WEIGHTS (demo): the numbers say nothing about GPT-2" if cfg.get("random_weights") else ""
    shape = (f"; {cfg['family']} Hq={cfg['n_heads']} Hkv={cfg['n_kv_heads']} D={cfg['head_dim']}"
             if "family" in cfg else "")
    cal = cfg["calibration"]["source"]
    return (f"EXP-Q03 sweep: {cfg['model']}\nlayers {cfg['layers']} crystallized together; {blocks_text(cfg)}{shape}; "
            f"basis from {CALIBRATION_NAMES[cal]}{tag}")

"""Drawing an Explorer state: the figure (image + overlay, Δacc bars), its PNG, the table as HTML.

The widget shows two PNGs, drawn by two paths of different cost: the image with its overlay and boxes,
composited in numpy and encoded by PIL (a few ms, redrawn on every change), and the Δacc bars, drawn by
matplotlib (tens of ms, redrawn only when the bars change). :func:`render_state` draws both in one
matplotlib figure, for saving.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from epviz.explorer.model import ExplorerState
from epviz.viz.maps import group_colours

__all__ = ["render_state", "state_png", "image_png", "BarsFigure", "save_state", "table_html"]


def render_state(state: ExplorerState, width: float = 7.0):
    """The figure of a state: the image with its overlay and GT boxes, and the Δacc bars."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, width * 0.45), dpi=100)
    ax_img, ax_bar = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.35]})
    _draw_image(ax_img, state)
    _draw_bars(ax_bar, state)
    fig.subplots_adjust(left=0.01, right=0.98, bottom=0.15, top=0.86, wspace=0.22)  # fixed: tight_layout costs ~80 ms
    return fig


def _draw_image(ax, state: ExplorerState) -> None:
    from epviz.viz import draw_boxes

    ax.set_xticks([])
    ax.set_yticks([])
    if state.image is None:
        ax.text(0.5, 0.5, "nothing to show", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        return
    ax.imshow(state.image, interpolation="nearest")
    if state.overlay is not None:
        ax.imshow(state.overlay, interpolation="nearest")
    if state.boxes is not None:
        draw_boxes(ax, state.boxes, lw=1.2)
    colour = {True: "tab:green", False: "tab:red", None: "0.2"}[state.correct]
    shown = (
        f"your image {state.selection.image}" if state.selection.image else f"image {state.image_index}: true {state.true_label}"
    )
    title = f"{shown}\npredicted {state.predicted_label} ({state.confidence:.0%})"
    if state.evidence is not None:
        title += f"\nevidence for {state.selection.evidence}: logit {state.evidence:+.2f}\n(red for, blue against)"
    ax.set_title(title, fontsize=8, color=colour)


def _draw_bars(ax, state: ExplorerState) -> None:
    ax.tick_params(labelsize=7)
    if state.table is None:
        ax.axis("off")
        return
    t = state.table
    ax.bar(t["predictor"], t["delta_acc"], color=_bar_colours(t))
    ax.axhline(0, color="k", lw=0.6)
    if len(t) <= 32:
        ax.set_xticks(t["predictor"])
    ax.set_xlabel("predictor", fontsize=7)
    ax.set_ylabel("Δacc when made uniform", fontsize=7)
    ax.set_title(f"{state.selection.probe}: test top-1 {state.accuracy:.1%}", fontsize=8)


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _bar_colours(t) -> list:
    """One colour per predictor: highlighted bars stand out (in their group's colour where there are groups)."""
    if "group" in t:
        palette = group_colours(int(t["group"].max()) + 1)
        return [palette[g] if h else (*palette[g], 0.35) for g, h in zip(t["group"], t["highlighted"])]
    return ["tab:orange" if h else "0.65" for h in t["highlighted"]]


def state_png(state: ExplorerState, width: float = 7.0) -> bytes:
    """The figure of a state (:func:`render_state`) as PNG bytes."""
    return _png(render_state(state, width))


def image_png(state: ExplorerState, side: int = 288) -> bytes:
    """The image of a state with its overlay and GT boxes (lime), `side` pixels wide, as PNG bytes (no matplotlib)."""
    from PIL import Image, ImageDraw

    if state.image is None:
        return _png_bytes(Image.new("RGB", (side, side), (255, 255, 255)))
    rgb = state.image.astype(np.float32) / 255.0
    if state.overlay is not None:
        alpha = state.overlay[..., 3:4]
        rgb = rgb * (1 - alpha) + state.overlay[..., :3] * alpha
    h, w = rgb.shape[:2]
    scale = max(1, round(side / w))
    picture = Image.fromarray((rgb * 255).round().clip(0, 255).astype(np.uint8)).resize(
        (w * scale, h * scale), Image.Resampling.NEAREST
    )
    if state.boxes is not None:
        draw = ImageDraw.Draw(picture)
        for x0, y0, x1, y1 in np.asarray(state.boxes, dtype=float).reshape(-1, 4) * scale:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(0, 255, 0), width=2)
    return _png_bytes(picture)


def _png_bytes(picture) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class BarsFigure:
    """The Δacc bars of the shown state as PNG bytes, redrawn only as far as a change needs.

    A new probe or table draws a new figure, keeping its background (axes, ticks, labels) without the bars;
    a change of the highlighted predictors (a query change) recolours the bars and draws only them over that
    background (matplotlib's blitting); an unchanged table returns the PNG already made.
    """

    def __init__(self, width: float = 4.0) -> None:
        self.width = width
        self._fig: Any = None  # the matplotlib Figure drawn last
        self._background: Any = None  # its pixels without the bars and the zero line
        self._key: tuple | None = None
        self._colours: list | None = None
        self._png = b""

    def png(self, state: ExplorerState) -> bytes:
        """The bars of `state` (empty bytes when it has no predictor table)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from PIL import Image

        t = state.table
        if t is None:
            self._key, self._png = None, b""
            return self._png
        cols = [c for c in ("predictor", "delta_acc", "group") if c in t]
        key = (state.selection.probe, state.accuracy, tuple(cols), tuple(t[cols].itertuples(index=False, name=None)))
        colours = _bar_colours(t)
        if key == self._key and colours == self._colours:
            return self._png
        if key != self._key:
            self._fig = Figure(figsize=(self.width, self.width * 0.78), dpi=100)
            ax = self._fig.subplots()
            _draw_bars(ax, state)
            self._fig.subplots_adjust(left=0.16, right=0.98, bottom=0.15, top=0.9)
            for artist in [*ax.patches, *ax.lines]:
                artist.set_animated(True)  # left out of the background, drawn over it
            FigureCanvasAgg(self._fig).draw()
            self._background = self._fig.canvas.copy_from_bbox(self._fig.bbox)
        ax, canvas = self._fig.axes[0], self._fig.canvas
        for bar, colour in zip(ax.patches, colours):
            bar.set_facecolor(colour)
        canvas.restore_region(self._background)
        for artist in [*ax.patches, *ax.lines]:
            ax.draw_artist(artist)
        self._key, self._colours = key, colours
        self._png = _png_bytes(Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()))
        return self._png


def save_state(state: ExplorerState, out, name: str = "explorer", width: float = 7.0) -> dict:
    """Save the figure of a state as ``<out>/<name>.png`` and its predictor table as ``.csv`` (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from epviz.viz import save_figure

    fig = render_state(state, width)
    FigureCanvasAgg(fig)
    return save_figure(fig, state.table, name, out)


def table_html(state: ExplorerState) -> str:
    """The predictor table of a state as HTML, the highlighted rows in bold."""
    if state.table is None:
        return ""
    t = state.table.copy()
    shown = t.pop("highlighted")
    t = t.rename(
        columns={
            "delta_acc": "Δacc",
            "delta_acc_mean": "Δacc mean map",
            "delta_acc_shuffled": "Δacc shuffled",
            "delta_acc_zero": "Δacc slice zeroed",
            "entropy_norm": "entropy/log N",
            "box_lift": "lift (box)",
            "maxboxacc_v2": "MaxBoxAccV2",
            "inbox_mass": "mass in box",
            "pointing": "pointing",
        }
    )
    styled = (
        t.style.format(precision=3)
        .hide(axis="index")
        .apply(lambda row: ["font-weight: bold; background: #fde7c8" if shown.iloc[row.name] else "" for _ in row], axis=1)
    )
    return styled.to_html()


# --- the widget view ---------------------------------------------------------------------

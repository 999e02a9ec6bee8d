"""Drawing an Explorer state: the figure (image + overlay, Δacc bars), its PNG, the table as HTML."""

from __future__ import annotations

import io

from epviz.explorer.model import ExplorerState
from epviz.viz.maps import group_colours

__all__ = ["render_state", "state_png", "save_state", "table_html"]


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
        title += f"\nevidence for {state.selection.evidence} (red for, blue against): logit {state.evidence:+.2f}"
    ax.set_title(title, fontsize=8, color=colour)


def _draw_bars(ax, state: ExplorerState) -> None:
    ax.tick_params(labelsize=7)
    if state.table is None:
        ax.axis("off")
        return
    t = state.table
    colours: list[str | tuple[float, ...]] = ["tab:orange" if h else "0.65" for h in t["highlighted"]]
    if "group" in t:
        palette = group_colours(int(t["group"].max()) + 1)
        colours = [palette[g] if h else (*palette[g], 0.35) for g, h in zip(t["group"], t["highlighted"])]
    ax.bar(t["predictor"], t["delta_acc"], color=colours)
    ax.axhline(0, color="k", lw=0.6)
    if len(t) <= 32:
        ax.set_xticks(t["predictor"])
    ax.set_xlabel("predictor", fontsize=7)
    ax.set_ylabel("Δacc when made uniform", fontsize=7)
    ax.set_title(f"{state.selection.probe}: test top-1 {state.accuracy:.1%}", fontsize=8)


def state_png(state: ExplorerState, width: float = 7.0) -> bytes:
    """The rendered figure of a state as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = render_state(state, width)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


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

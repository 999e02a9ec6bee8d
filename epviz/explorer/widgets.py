"""The ipywidgets view of the Explorer: one widget per choice, the figure, the table, an error line.

The kernel may start a widget callback before the previous one has returned (seen with ipykernel 7
under load: a second quick choice began computing while the first was still drawing), so two choices
can compute at once and the older one could draw last. Redraws are therefore serialised and the last
choice wins: each refresh takes a ticket, computes under a lock, and is dropped unless its ticket is
still the newest when it is done. The page reports what it shows in the status line's ``data-``
attributes (a redraw counter, the selection and the error), which tests wait on instead of on time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import itertools
import json
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

import pandas as pd

from epviz.analysis.intervals import LEVEL, N_BOOT
from epviz.backbones import Backbone
from epviz.data import DEFAULT_DATASET
from epviz.explorer.model import (
    ALL_CLASSES,
    EVIDENCE_FOR,
    ORDERS,
    QUERY_CHOICES,
    VIEWS,
    ExplorerModel,
    ExplorerState,
    Selection,
)
from epviz.explorer.render import BarsFigure, image_png, table_html
from epviz.setting import Setting

__all__ = ["Explorer"]


class Explorer:
    """The ipywidgets Explorer (display it in JupyterLab; drive it from code with :meth:`set`).

    Args:
        backbones, probes, setting, dataset, sets, fit_options, extract, seed, localization_images: See
            :class:`ExplorerModel`.
        selection: Initial settings (fields of :class:`Selection`).
        width: Width of the figure in inches.
    """

    def __init__(
        self,
        backbones: Iterable[str | Backbone] | None = None,
        probes: str | Sequence[str] | Mapping[str, Mapping | None] | None = None,
        *,
        setting: Setting | None = None,
        dataset: str = DEFAULT_DATASET,
        sets: Mapping | None = None,
        fit_options: Mapping | None = None,
        extract: Mapping | None = None,
        seed: int = 0,
        localization_images: int = 200,
        selection: Mapping | None = None,
        width: float = 7.0,
    ) -> None:
        self.model = ExplorerModel(
            backbones,
            probes,
            setting=setting,
            dataset=dataset,
            sets=sets,
            fit_options=fit_options,
            extract=extract,
            seed=seed,
            localization_images=localization_images,
        )
        self.width = width
        self.state: ExplorerState | None = None
        self._bars = BarsFigure(width * 0.55)
        self.redraws = 0
        self._local = threading.local()  # per thread: whether its own widget updates are being made
        self._redraw = threading.RLock()
        self._redraw_ticket_lock = threading.Lock()
        self._tickets = itertools.count(1)
        self._newest = 0
        probe = "ep" if "ep" in self.model.specs else next(iter(self.model.specs))
        start = Selection(backbone=self.model.backbone_names[0], probe=probe)
        start = start.replace(**dict(selection or {}))
        self.widgets = self._build(start)
        self.box = self._layout()
        self.model.progress = self._progress
        self.refresh()

    # building

    def _build(self, sel: Selection) -> dict:
        import ipywidgets as w

        style = {"description_width": "64px"}
        classes = [ALL_CLASSES] + self.model.class_names
        ws = {
            "backbone": w.Dropdown(options=self.model.backbone_names, value=sel.backbone, description="backbone"),
            "layer": w.Dropdown(options=[("last block", -1)], value=-1, description="layer"),
            "probe": w.Dropdown(options=list(self.model.specs), value=sel.probe, description="probe"),
            "queries": w.Dropdown(options=list(QUERY_CHOICES), value=sel.queries, description="queries"),
            "view": w.Dropdown(options=list(VIEWS), value=sel.view, description="view"),
            "query": w.IntSlider(value=sel.query, min=0, max=max(sel.query, 0), description="query"),
            "groups": w.IntSlider(value=sel.groups, min=1, max=max(sel.groups, 1), description="groups"),
            "order": w.Dropdown(options=list(ORDERS), value=sel.order, description="images"),
            "label": w.Dropdown(options=classes, value=sel.label, description="class"),
            "position": w.IntSlider(value=sel.position, min=0, max=max(sel.position, 0), description="image"),
            "opacity": w.FloatSlider(value=sel.opacity, min=0.0, max=1.0, step=0.05, description="opacity"),
            "evidence": w.Dropdown(options=list(EVIDENCE_FOR), value=sel.evidence, description="evidence"),
            "image": w.Dropdown(options=[("test split", "")], value="", description="shown"),
        }
        if sel.layer != -1:
            ws["layer"].options = [("last block", -1), (f"block {sel.layer}", sel.layer)]
            ws["layer"].value = sel.layer
        for name, widget in ws.items():
            widget.style = style
            widget.layout = w.Layout(width="260px")
            if hasattr(widget, "continuous_update"):
                widget.continuous_update = False  # sliders update on release, not on every step
            widget.add_class(f"epviz-explorer-{name}")
            widget.observe(self._changed, names="value")
        ws["upload"] = w.FileUpload(accept="image/*", multiple=False, description="your image")
        ws["upload"].add_class("epviz-explorer-upload")
        ws["upload"].observe(self._uploaded, names="value")
        ws["progress"] = w.FloatProgress(value=0.0, min=0.0, max=1.0, description="", layout=w.Layout(width="220px"))
        ws["status"] = w.HTML(value="")
        ws["error"] = w.HTML(value="")
        ws["labels"] = w.HTML(value="")
        ws["figure"] = w.Image(format="png", layout=w.Layout(width="288px"))
        ws["bars"] = w.Image(format="png", layout=w.Layout(max_width="400px"))
        ws["table"] = w.HTML(value="")
        ws["log"] = w.Output()
        for name in ("progress", "status", "error", "labels", "figure", "bars", "table", "log"):
            ws[name].add_class(f"epviz-explorer-{name}")
        return ws

    def _layout(self):
        import ipywidgets as w

        ws = self.widgets
        controls = w.HBox(
            [
                w.VBox([ws[n] for n in ("backbone", "layer", "probe", "queries")]),
                w.VBox([ws[n] for n in ("view", "query", "groups", "evidence", "opacity")]),
                w.VBox([ws[n] for n in ("order", "label", "position", "image", "upload")]),
            ]
        )
        box = w.VBox(
            [
                controls,
                w.HBox([ws["progress"], ws["status"]]),
                ws["error"],
                ws["labels"],
                w.HBox([ws["figure"], ws["bars"]]),
                ws["table"],
                ws["log"],
            ]
        )
        box.add_class("epviz-explorer")
        return box

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.box)

    # driving

    @property
    def selection(self) -> Selection:
        """The selection the widgets hold now."""
        values = {name: self.widgets[name].value for name in (f.name for f in dataclasses.fields(Selection))}
        return Selection(**values)

    def set(self, **values) -> ExplorerState:
        """Set widget values from code (names of :class:`Selection` fields), then update once.

        A value that is not among a widget's choices leaves the widgets as they were and shows why.
        """
        from traitlets import TraitError

        try:
            self.selection.replace(**values)
        except ValueError as err:
            return self._fail(str(err))
        if ("order" in values or "label" in values) and "position" not in values:
            values["position"] = 0  # a new ordering starts at its first image, as in the widgets
        with self._quiet():
            for name, value in values.items():
                widget = self.widgets[name]
                try:
                    widget.value = value
                except TraitError:
                    choices = getattr(widget, "options", None)
                    hint = f"; choose one of: {', '.join(str(_option_value(o)) for o in choices)}" if choices else ""
                    return self._fail(f"{value!r} is not a valid {name}{hint}")
        return self.refresh()

    def measured(self, *, n_boot: int = N_BOOT, level: float = LEVEL) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The shown probe's predictor table with bootstrap intervals, and the trivial maps' scores beside it.

        See :meth:`ExplorerModel.measured`; computed once per probe, outside the interactive redraws.
        """
        sel = self.state.selection if self.state is not None else self.selection
        with self.widgets["log"]:
            return self.model.measured(sel, n_boot=n_boot, level=level)

    def refresh(self) -> ExplorerState:
        """Compute the state of the current widget values and show it, unless a newer choice came meanwhile.

        A refresh overtaken by a newer one (a quicker second choice) returns its state without showing it:
        the newer refresh, which reads the widgets after this one is done, draws.
        """
        ticket = self._new_ticket()
        with self._redraw:
            start, counts = time.perf_counter(), dict(self.model.counts)
            with self.widgets["log"]:
                state = self.model.state(self.selection)
                for _ in range(3):  # choices adapted to the new state (e.g. fewer predictors) may move a value
                    self._sync(state)
                    if self.selection == state.selection:
                        break
                    state = self.model.state(self.selection)
            if ticket != self._newest:
                return state  # stale: a newer choice is waiting for the lock and will draw
            if _in_kernel():
                self.widgets["log"].clear_output()  # the finished extraction bars are closed widgets
            self._show(state, start, "computed" if self.model.counts != counts else "updated")
            return state

    def _new_ticket(self) -> int:
        with self._redraw_ticket_lock:
            self._newest = next(self._tickets)
            return self._newest

    @property
    def _syncing(self) -> bool:
        """Whether this thread is making its own widget updates (their change events are not choices)."""
        return getattr(self._local, "syncing", False)

    def add_image(self, image, name: str | None = None) -> ExplorerState:
        """Show your own image (a path, a PIL image or an image file's bytes; see :meth:`ExplorerModel.add_image`).

        A file that cannot be used leaves the widgets as they were and shows why.
        """
        try:
            with self.widgets["log"]:
                key = self.model.add_image(image, name)
        except (ValueError, OSError, TypeError) as err:
            return self._fail(str(err))
        widget = self.widgets["image"]
        with self._quiet():
            widget.options = [*[o for o in widget.options if o[1] != key], (f"yours: {key}", key)]
        return self.set(image=key)

    def _uploaded(self, change) -> None:
        for item in change["new"]:
            self.add_image(bytes(item["content"]), name=item["name"])

    def _changed(self, change) -> None:
        if self._syncing:
            return
        if change["owner"] in (self.widgets["order"], self.widgets["label"]):
            with self._quiet():
                self.widgets["position"].value = 0
        self.refresh()

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        was, self._local.syncing = self._syncing, True
        try:
            yield
        finally:
            self._local.syncing = was

    def _sync(self, state: ExplorerState) -> None:
        """Adapt the choices of the widgets to the state (block count, predictors, images)."""
        ws = self.widgets
        with self._quiet():
            if state.num_layers is not None:
                blocks = state.layers if state.layers is not None else list(range(state.num_layers))
                last = [("last block", -1)] if state.num_layers - 1 in blocks else []
                layers = last + [(f"block {i}", i) for i in blocks]
                if list(ws["layer"].options) != layers:
                    value = ws["layer"].value if ws["layer"].value in [v for _, v in layers] else layers[0][1]
                    ws["layer"].options = layers
                    ws["layer"].value = value
            ws["queries"].disabled = not state.takes_queries
            k = state.num_predictors or 0
            _set_range(ws["query"], 0, max(k - 1, 0))
            _set_range(ws["groups"], 1, max(k, 1))
            ws["query"].disabled = state.selection.view == "image only" or k == 0
            ws["groups"].disabled = state.selection.view != "query groups"
            if state.image_count:
                _set_range(ws["position"], 0, state.image_count - 1)

    def _progress(self, fraction: float, message: str) -> None:
        self.widgets["progress"].value = fraction
        self.widgets["progress"].bar_style = "info"
        self.widgets["status"].value = f"<span style='font-size:12px'>{_escape(message)}</span>"

    def _fail(self, message: str) -> ExplorerState:
        state = ExplorerState(selection=self.state.selection if self.state else self.selection, error=message)
        self.widgets["error"].value = _error_html(message)
        return state

    def _show(self, state: ExplorerState, start: float, verb: str = "updated") -> None:
        """Update the output widgets; the error line last, so that when it changes the rest has."""
        ws = self.widgets
        self.state = state
        ws["figure"].value = image_png(state)
        bars = self._bars.png(state)
        if ws["bars"].value != bars:  # the bars change with the probe and the highlighted predictors, not the image
            ws["bars"].value = bars
            ws["bars"].layout.display = "" if bars else "none"  # no table (an error, LP): no broken image
        ws["table"].value = table_html(state)
        ws["labels"].value = _labels_html(state)
        ws["progress"].value = 1.0
        ws["progress"].bar_style = "danger" if state.error else "success"
        ws["error"].value = _error_html(state.error) if state.error else ""
        self.redraws += 1
        took = f"{verb} in {(time.perf_counter() - start) * 1000:.0f} ms"
        ws["status"].value = _status_html(took, self.redraws, state)  # last: it tells the page the redraw is complete


def _in_kernel() -> bool:
    """Whether this runs in a Jupyter kernel (where output widgets capture output)."""
    from IPython import get_ipython

    return getattr(get_ipython(), "kernel", None) is not None


def _option_value(option):
    return option[1] if isinstance(option, tuple) else option


def _set_range(slider, lo: int, hi: int) -> None:
    """Set a slider's bounds in the order that never has min > max (a value outside is clamped)."""
    if (slider.min, slider.max) == (lo, hi):
        return
    if hi >= slider.min:
        slider.max, slider.min = hi, lo
    else:
        slider.min, slider.max = lo, hi


def _escape(text: object) -> str:
    return html.escape(str(text))


def _status_html(text: str, redraws: int, state: ExplorerState) -> str:
    """The status line, carrying what is shown as ``data-`` attributes for tests and scripts to wait on."""
    shown = json.dumps(dataclasses.asdict(state.selection), default=str)
    return (
        f"<span class='epviz-explorer-state' data-redraws='{redraws}' data-selection='{html.escape(shown)}' "
        f"data-error='{html.escape(state.error)}' style='font-size:12px'>{html.escape(text)}</span>"
    )


def _error_html(message: str) -> str:
    return f"<div style='color:#b00020;font-size:13px'>⚠ {_escape(message)}</div>"


def _labels_html(state: ExplorerState) -> str:
    if state.predicted_label is None:
        return ""
    colour = {True: "#1b7f1b", False: "#b00020", None: "#333333"}[state.correct]
    shown = (
        f"your image {_escape(state.selection.image)}"
        if state.selection.image
        else f"image {state.image_index} ({state.selection.position + 1} of {state.image_count}) · "
        f"true <b>{_escape(str(state.true_label))}</b>"
    )
    return (
        f"<div style='font-size:13px'>{shown} · predicted <b style='color:{colour}'>{_escape(state.predicted_label)}</b> "
        f"({state.confidence:.0%}; test images this confident are right {state.bin_accuracy:.0%} of the time) · "
        f"probe test top-1 {state.accuracy:.1%}, calibration error (ECE) {state.calibration_error:.1%}"
        + "".join(f" · k-NN on {'[CLS]' if f == 'cls' else 'GAP'}: {_escape(label)}" for f, label in state.knn_labels.items())
        + (
            ""
            if state.evidence is None
            else f"<br>evidence for {_escape(state.selection.evidence)}: logit {state.evidence:+.2f}"
            " (<span style='color:#b2182b'>red</span> for, <span style='color:#2166ac'>blue</span> against)"
        )
        + "</div>"
    )

"""Running the notebooks as `make figures` does: cell-level progress, per-notebook times, and the HTML report.

:func:`run_notebooks` executes each notebook with nbclient, prints every cell as it starts and ends (with an
estimate for cells that took long on the previous run, read from ``figures/timings.json``), and keeps the
executed copies; :func:`write_report` writes ``figures/report.html`` with each notebook's time, status and
figures, each linked to its provenance sidecar. ``epviz reproduce`` (:mod:`epviz.cli`) drives both.
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import hashlib
import html
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from epviz.atomic import atomic_write, atomic_write_text
from epviz.safe_load import strip_ansi

__all__ = [
    "CELL_TIMEOUT_FAST",
    "CELL_TIMEOUT_FULL",
    "CellProgress",
    "format_duration",
    "repo_root",
    "parameters_cell",
    "run_notebooks",
    "set_parameters",
    "write_report",
]

LONG_CELL = 10.0  # seconds: a cell whose previous run took longer gets an estimate when it starts


def repo_root() -> Path:
    """The checkout whose notebooks are run: the working folder or a parent holding notebooks/ and pyproject.toml."""
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / "notebooks").is_dir() and (folder / "pyproject.toml").is_file():
            return folder
    return Path(__file__).resolve().parents[1]


def format_duration(seconds: float) -> str:
    """A duration for people: "4.2 s", "3 min 05 s", "1 h 02 min"."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _source_digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:12]


def _cell_label(source: str, width: int = 70) -> str:
    """The first line of a cell that is not a comment, shortened."""
    for line in source.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line if len(line) <= width else line[: width - 3] + "..."
    return "(comments only)"


class CellProgress:
    """nbclient hooks that print which cell of a notebook runs, for how long, and how long it took last time.

    Pass :meth:`on_cell_execute` and :meth:`on_cell_executed` to ``NotebookClient``: a line when a
    code cell starts (with the previous run's time of the same cell, when it was long, else "first
    run") and one when it ends. :attr:`cells` holds the seconds of every executed code cell, keyed by
    its index in the notebook.

    Args:
        name: The notebook's name, printed on every line.
        nb: The notebook.
        previous: Its entry of the previous run's ``timings.json`` (``cells``: index -> seconds, source digest).
        out: Where to print (default stdout).
        clock: The time source (``time.monotonic``).
    """

    def __init__(
        self,
        name: str,
        nb: Any,
        previous: dict[str, Any] | None = None,
        out: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.code = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and cell.source.strip()]
        self.previous = dict((previous or {}).get("cells", {}))
        self.out = out
        self.clock = clock
        self.start = clock()
        self.cells: dict[str, dict[str, Any]] = {}
        self._running: tuple[int, float] | None = None

    def _print(self, text: str) -> None:
        print(text, file=self.out or sys.stdout, flush=True)

    def _position(self, index: int) -> str:
        number = self.code.index(index) + 1 if index in self.code else index + 1
        return f"{self.name} cell {number}/{len(self.code)}"

    def _before(self, index: int) -> float | None:
        entry = self.previous.get(str(index))
        if not isinstance(entry, dict) or entry.get("seconds") is None:
            return None
        return float(entry["seconds"])

    def _estimate(self, index: int, source: str) -> str:
        before = self._before(index)
        if before is None:
            return "first run: no estimate"
        edited = "" if self.previous[str(index)].get("source") == _source_digest(source) else ", the cell has changed since"
        return f"previous run {format_duration(before)}{edited}"

    def on_cell_execute(self, cell: Any, cell_index: int, **_: Any) -> None:
        """nbclient hook: a code cell starts."""
        now = self.clock()
        self._running = (cell_index, now)
        before = self._before(cell_index)
        hint = ""
        if before is None:
            hint = " (first run)"
        elif before >= LONG_CELL:
            hint = f" ({self._estimate(cell_index, cell.source)})"
        self._print(f"[{self._position(cell_index)}] {_cell_label(cell.source)} - at {format_duration(now - self.start)}{hint}")

    def on_cell_executed(self, cell: Any, cell_index: int, execute_reply: Any = None, **_: Any) -> None:
        """nbclient hook: a code cell finished (with or without an error)."""
        running, self._running = self._running, None
        seconds = self.clock() - (running[1] if running and running[0] == cell_index else self.start)
        status = (execute_reply or {}).get("content", {}).get("status", "ok")
        self.cells[str(cell_index)] = {"seconds": round(seconds, 2), "source": _source_digest(cell.source)}
        self._print(
            f"[{self._position(cell_index)}] {'done' if status == 'ok' else status} in {format_duration(seconds)}; "
            f"notebook at {format_duration(self.clock() - self.start)}"
        )


def _read_timings(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"notebooks": {}}
    return doc if isinstance(doc, dict) and isinstance(doc.get("notebooks"), dict) else {"notebooks": {}}


def _pngs(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")} if folder.is_dir() else {}


CELL_TIMEOUT_FULL = 4 * 3600  # the full probe zoo (18 probes x 3 backbones, tuned) is one cell of ~1 h 45 min on 2 cores
CELL_TIMEOUT_FAST = 3600


def set_parameters(source: str, **values: Any) -> str:
    """A notebook's ``parameters`` cell source with the named assignments given new values.

    Each name must be assigned at the start of a line of `source` (``FAST = False  # comment``); the first such
    line keeps its comment and gets ``repr(value)``, so every later line of the cell that reads the name sees the
    new value. This is how ``epviz reproduce --fast`` and the notebook tests set fast mode.

    Raises:
        ConfigError: A name the cell does not assign.
    """
    from epviz.errors import ConfigError

    for name, value in values.items():
        pattern = re.compile(rf"^{re.escape(name)}\s*=\s*[^#\n]*?(\s*#.*)?$", re.M)
        line = pattern.search(source)
        if line is None:
            raise ConfigError(f"the parameters cell assigns no {name!r}: add a line '{name} = ...' to it")
        source = source[: line.start()] + f"{name} = {value!r}{line.group(1) or ''}" + source[line.end() :]
    return source


def parameters_cell(nb) -> Any:
    """The cell tagged ``parameters`` of a notebook (nbformat node); a ConfigError when there is none."""
    from epviz.errors import ConfigError

    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            return cell
    raise ConfigError("the notebook has no cell tagged 'parameters': tag the cell that holds its options")


def run_notebooks(
    notebooks: list[Path],
    fast: bool,
    timeout: int | None = None,
    out: TextIO | None = None,
) -> list[dict]:
    """Execute notebooks in place of a temporary copy with nbclient; returns per-notebook timings.

    The executed copies (with outputs) go to ``figures/notebooks/``; the stored notebooks
    stay without outputs. A failing notebook does not stop the others: its entry holds
    ``error`` (the failing cell's error) and its executed copy shows the traceback. While they run,
    every code cell prints a line when it starts and when it ends (:class:`CellProgress`); the
    timings of this run are kept in ``figures/timings.json`` (``figures/fast/timings.json`` in fast
    mode) and give the next run its estimates.

    Returns:
        One entry per notebook: notebook, seconds, status ("ok" or "failed"), error (when failed),
        cells (index -> seconds, source digest) and figures (the PNGs it wrote or rewrote).
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    from epviz.errors import ConfigError

    stream = out or sys.stdout
    root = repo_root()
    figures = root / "figures" / ("fast" if fast else "")
    executed_dir = figures / "notebooks"
    executed_dir.mkdir(parents=True, exist_ok=True)
    timings_path = figures / "timings.json"
    record = _read_timings(timings_path)
    timings = []
    for number, path in enumerate(notebooks, 1):
        nb = nbformat.read(path, as_version=4)
        previous = record["notebooks"].get(path.name)
        before = f"previous run {format_duration(previous['seconds'])}" if previous and "seconds" in previous else "first run"
        print(f"[{number}/{len(notebooks)}] {path.name} ({before})", file=stream, flush=True)
        pngs = _pngs(figures)
        start = time.time()
        progress = CellProgress(path.stem, nb, previous, out=stream)
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
            on_cell_execute=progress.on_cell_execute,
            on_cell_executed=progress.on_cell_executed,
        )
        entry: dict[str, Any] = {"notebook": path.name}
        try:
            if fast:  # the notebooks default to FAST = False
                cell = parameters_cell(nb)
                cell.source = set_parameters(cell.source, FAST=True)
            client.execute()
        except (CellExecutionError, CellTimeoutError, DeadKernelError, ConfigError) as err:
            entry["error"] = _first_line(err)
        atomic_write(executed_dir / path.name, functools.partial(nbformat.write, nb))
        entry["seconds"] = round(time.time() - start, 1)
        entry["status"] = "failed" if "error" in entry else "ok"
        entry["cells"] = progress.cells
        entry["figures"] = sorted(name for name, mtime in _pngs(figures).items() if pngs.get(name) != mtime)
        timings.append(entry)
        status = f"FAILED: {entry['error']}" if "error" in entry else "ok"
        print(f"{path.name}: {format_duration(entry['seconds'])}, {status}", file=stream, flush=True)
        record["notebooks"][path.name] = {
            "seconds": entry["seconds"],
            "status": entry["status"],
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "cells": entry["cells"],
        }
        atomic_write_text(timings_path, json.dumps(record, indent=1) + "\n")
    return timings


def _first_line(err: Exception) -> str:
    """The most telling line of a notebook error (nbclient puts the exception last)."""
    text = strip_ansi(str(err))  # tracebacks arrive coloured
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]]
    return (errors or lines or [type(err).__name__])[-1][:300]


def _notebook_figures(entry: dict, pngs: list[Path]) -> list[Path]:
    """The figures of a notebook: those its run wrote, else (no record of them) those named after its number ("01_...")."""
    if entry.get("figures") is not None:
        wanted = set(entry["figures"])
        return [p for p in pngs if p.name in wanted]
    prefix = entry["notebook"].split("_", 1)[0] + "_"
    return [p for p in pngs if p.name.startswith(prefix)]


def _anchor(name: str) -> str:
    return "fig-" + re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _provenance_line(sidecar: Path) -> str:
    try:
        doc = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return ""
    commit = str(doc.get("commit", "unknown"))[:10] + (" (uncommitted changes)" if doc.get("dirty") else "")
    parts = [f"commit {commit}"]
    if doc.get("seeds") is not None:
        parts.append(f"seeds {doc['seeds']}")
    if doc.get("images") is not None:
        shown = doc["images"]
        parts.append(f"images {shown[:12]}{' ...' if len(shown) > 12 else ''}")
    return " · " + html.escape(", ".join(parts))


def write_report(figures: Path, timings: list[dict] | None = None) -> Path:
    """One self-contained HTML page showing every PNG in `figures` (images embedded).

    With `timings` (from :func:`run_notebooks`) it starts with a table of the notebooks: time,
    status, their figures (linked to the figure and to its provenance sidecar) and their executed
    copy. Every figure's caption links its data (CSV) and its provenance sidecar (JSON).
    """
    figures = Path(figures)
    pngs = sorted(figures.glob("*.png"))
    parts = [
        "<!doctype html><meta charset='utf-8'><title>epviz figures</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%;border:1px solid #ddd}"
        "figure{margin:2em 0}figcaption{color:#555}table{border-collapse:collapse}"
        "td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left}.failed{color:#b00}</style>",
        "<h1>epviz — reproduced figures</h1>",
    ]
    if timings:
        rows = []
        for t in timings:
            status = html.escape(t.get("error", "ok"))
            links = []
            for png in _notebook_figures(t, pngs):
                sidecar = png.with_suffix(".json")
                extra = f" (<a href='{html.escape(sidecar.name)}'>provenance</a>)" if sidecar.is_file() else ""
                links.append(f"<a href='#{_anchor(png.stem)}'>{html.escape(png.stem)}</a>{extra}")
            executed = figures / "notebooks" / t["notebook"]
            name = html.escape(t["notebook"])
            if executed.is_file():
                name = f"<a href='notebooks/{html.escape(t['notebook'])}'>{name}</a>"
            rows.append(
                f"<tr><td>{name}</td><td>{html.escape(format_duration(t['seconds']))}</td>"
                f"<td class='{'failed' if 'error' in t else 'ok'}'>{status}</td><td>{'<br>'.join(links) or '–'}</td></tr>"
            )
        parts.append("<table><tr><th>notebook</th><th>time</th><th>status</th><th>figures</th></tr>" + "".join(rows) + "</table>")
    for png in pngs:
        data = base64.b64encode(png.read_bytes()).decode()
        csv, sidecar = png.with_suffix(".csv"), png.with_suffix(".json")
        link = f" — data: <a href='{html.escape(csv.name)}'>{html.escape(csv.name)}</a>" if csv.is_file() else ""
        if sidecar.is_file():
            link += f" — provenance: <a href='{html.escape(sidecar.name)}'>{html.escape(sidecar.name)}</a>"
            link += _provenance_line(sidecar)
        parts.append(
            f"<figure id='{_anchor(png.stem)}'><img src='data:image/png;base64,{data}' alt='{html.escape(png.stem)}'>"
            f"<figcaption>{html.escape(png.stem)}{link}</figcaption></figure>"
        )
    return atomic_write_text(figures / "report.html", "\n".join(parts))

"""Command line: ``epviz reproduce | extract | evaluate | results | zoo``.

epviz reproduce [--fast] [--only 00_quickstart]   run the notebooks, write figures/ + report.html
epviz extract --backbone tiny-mae --split test --size 4000 --layers -1
epviz evaluate --probe PATH --backbone tiny-mae --dataset cluttered-fashion-mnist --split test [--maps] [--out FILE.csv]
epviz results [--write | --check]                  the README's results section from docs/results.csv
epviz zoo                                          the zoo's model cards and probe results
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import functools
import hashlib
import html
import importlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from epviz.atomic import atomic_write, atomic_write_text
from epviz.safe_load import strip_ansi

__all__ = ["main", "run_notebooks", "write_report", "CellProgress", "format_duration"]

LONG_CELL = 10.0  # seconds: a cell whose previous run took longer gets an estimate when it starts


def _repo_root() -> Path:
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

    Pass :meth:`on_cell_execute` and :meth:`on_cell_executed` to ``NotebookClient``; a background
    thread prints a line every `heartbeat` seconds while a cell runs (with an estimate of the time
    left from the previous run's timing of the same cell, else "first run"). :attr:`cells` holds the
    seconds of every executed code cell, keyed by its index in the notebook.

    Args:
        name: The notebook's name, printed on every line.
        nb: The notebook.
        previous: Its entry of the previous run's ``timings.json`` (``cells``: index -> seconds, source digest).
        out: Where to print (default stdout).
        heartbeat: Seconds between "still running" lines (None: none).
        clock: The time source (``time.monotonic``).
    """

    def __init__(
        self,
        name: str,
        nb: Any,
        previous: dict[str, Any] | None = None,
        out: TextIO | None = None,
        heartbeat: float | None = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.code = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and cell.source.strip()]
        self.previous = dict((previous or {}).get("cells", {}))
        self.out = out
        self.heartbeat = heartbeat
        self.clock = clock
        self.start = clock()
        self.cells: dict[str, dict[str, Any]] = {}
        self._running: tuple[int, float, str] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if heartbeat:
            self._thread = threading.Thread(target=self._beat, name=f"progress {name}", daemon=True)
            self._thread.start()

    def _print(self, text: str) -> None:
        with self._lock:
            print(text, file=self.out or sys.stdout, flush=True)

    def _position(self, index: int) -> str:
        number = self.code.index(index) + 1 if index in self.code else index + 1
        return f"{self.name} cell {number}/{len(self.code)}"

    def _before(self, index: int) -> float | None:
        entry = self.previous.get(str(index))
        if not isinstance(entry, dict) or entry.get("seconds") is None:
            return None
        return float(entry["seconds"])

    def _estimate(self, index: int, source: str, elapsed: float | None = None) -> str:
        before = self._before(index)
        if before is None:
            return "first run: no estimate"
        edited = "" if self.previous[str(index)].get("source") == _source_digest(source) else ", the cell has changed since"
        if elapsed is None:
            return f"previous run {format_duration(before)}{edited}"
        if elapsed >= before:
            return f"past the previous run's {format_duration(before)}{edited}"
        return f"about {format_duration(before - elapsed)} left (previous run {format_duration(before)}{edited})"

    def on_cell_execute(self, cell: Any, cell_index: int, **_: Any) -> None:
        """nbclient hook: a code cell starts."""
        now = self.clock()
        self._running = (cell_index, now, cell.source)
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

    def _beat(self) -> None:
        assert self.heartbeat is not None
        while not self._stop.wait(self.heartbeat):
            running = self._running
            if running is None:
                continue
            index, started, source = running
            elapsed = self.clock() - started
            if elapsed >= self.heartbeat:
                self._print(
                    f"[{self._position(index)}] still running after {format_duration(elapsed)}: "
                    f"{self._estimate(index, source, elapsed)}"
                )

    def close(self) -> None:
        """Stop the heartbeat thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


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


def run_notebooks(
    notebooks: list[Path],
    fast: bool,
    timeout: int | None = None,
    heartbeat: float | None = 60.0,
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

    stream = out or sys.stdout
    os.environ["EPVIZ_FAST"] = "1" if fast else "0"
    root = _repo_root()
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
        progress = CellProgress(path.stem, nb, previous, out=stream, heartbeat=heartbeat)
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
            client.execute()
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as err:
            entry["error"] = _first_line(err)
        finally:
            progress.close()
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


def _reproduce(args: argparse.Namespace) -> None:
    root = _repo_root()
    notebooks = sorted((root / "notebooks").glob("[0-9]*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(o) for o in args.only)]
    if not notebooks:
        sys.exit(f"no notebooks found under {root / 'notebooks'}")
    timeout = args.cell_timeout or (CELL_TIMEOUT_FAST if args.fast else CELL_TIMEOUT_FULL)
    timings = run_notebooks(notebooks, fast=args.fast, timeout=timeout, heartbeat=args.heartbeat or None)
    report = write_report(root / "figures" / ("fast" if args.fast else ""), timings)
    print(f"report: {report}")
    failed = [t["notebook"] for t in timings if "error" in t]
    if failed:
        sys.exit(
            f"{len(failed)} notebook(s) failed: {', '.join(failed)}; their executed copies under "
            f"figures/{'fast/' if args.fast else ''}notebooks/ show the error"
        )


def _extract(args: argparse.Namespace) -> None:
    from epviz import distributed
    from epviz.backbones import load_backbone
    from epviz.data import load_split
    from epviz.tokens import extract_tokens

    joined = distributed.init_from_env()  # under torchrun / srun: one rank of the process group
    try:
        size = None if args.size == "all" else int(args.size)
        dataset = load_split(args.dataset, args.split, size, seed=args.seed, on_error=args.on_error)
        backbone = load_backbone(args.backbone, weights=args.weights, device="cpu")
        layers = None if args.layers == ["all"] else [int(x) for x in args.layers]
        norm = {"auto": None, "on": True, "off": False}[args.norm]
        cache = extract_tokens(
            backbone,
            dataset,
            layers,
            norm=norm,
            precision=args.precision,
            dtype=args.dtype,
            views=args.views,
            view_seed=args.view_seed,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            shard_size=args.shard_size,
            cache_dir=args.cache_dir,
            device=args.device,
        )
        if distributed.is_main():
            summary = {"path": str(cache.path), "hit": cache.hit, "layers": cache.layers, "images": len(cache)}
            print(
                json.dumps(
                    {**summary, "views": cache.views, "dtype": cache.meta.get("dtype"), "world_size": distributed.world_size()}
                )
            )
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


def _size(text: str) -> int | str:
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size takes a number of images or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--size must be at least 1 image (or 'all'), got {value}")
    return value


# --- train ---------------------------------------------------------------------------------

SETTINGS = ("full", "fast", "single-recipe", "paper")


def _setting(name: str, sizes: list[str] | None) -> Any:
    from epviz import Setting

    setting = {"full": Setting.full, "fast": Setting.fast, "single-recipe": Setting.single_recipe, "paper": Setting.paper}[name]()
    if not sizes:
        return setting
    parsed: dict[str, int | None] = {}
    for item in sizes:
        split, _, value = item.partition("=")
        if split not in ("train", "val", "test") or not value:
            raise ValueError(f"--sizes takes split=count items such as train=all val=10000, got {item!r}")
        parsed[split] = None if value == "all" else int(value)
    return setting.replace(sizes=parsed, name=setting.name)


def _train(args: argparse.Namespace) -> None:
    import pandas as pd

    from epviz import distributed, open_study
    from epviz.atomic import atomic_write
    from epviz.evaluate import accuracy
    from epviz.probes import build, probe_specs
    from epviz.training import fit_images, probe_zoo

    joined = distributed.init_from_env()  # under torchrun / srun: every fit is data-parallel over the ranks
    try:
        setting = _setting(args.setting, args.sizes)
        layers = None if args.layers == ["all"] else [int(x) for x in args.layers]
        extract = {"layers": layers, "dtype": args.dtype, "precision": args.precision, "views": args.views}
        if args.cache_dir:
            extract["cache_dir"] = args.cache_dir
        per_step = args.protocol == "per-step"
        splits = ("val", "test") if per_step else ("train", "val", "test")
        study = open_study(args.backbone, control=args.control, dataset=args.dataset, layer=args.layer, splits=splits,
                           setting=setting, figures=".", extract=extract)  # fmt: skip
        if per_step:
            from epviz.backbones import load_backbone
            from epviz.data import load_split

            train = load_split(args.dataset, "train", setting.sizes["train"])
            options = {k: v for k, v in setting.fit_options().items() if k != "grid"}
            rows = []
            for name in study.backbones:
                backbone = load_backbone(name)
                classes = int(study.tokens[name]["test"].num_classes or 0)
                for label, spec in probe_specs(args.probes).items():
                    spec = dict(spec)
                    probe = build(spec.pop("name"), backbone.dim, classes, seed=args.seeds[0], **spec)
                    result = fit_images(probe, backbone, train, study.sets["val"], layer=args.layer, seed=args.seeds[0],
                                        accum_steps=args.accum_steps, progress=distributed.is_main(), **options)  # fmt: skip
                    test = accuracy(result.probe, study.tokens[name]["test"], topk=(1,))["top1"]
                    rows.append({"backbone": name, "probe": label, "protocol": "per-step", "val_acc": result.best_acc,
                                 "test_acc": test, "best_epoch": result.best_epoch, "seconds": result.seconds})  # fmt: skip
                    if args.save and distributed.is_main():
                        result.save(Path(args.save) / f"{name}_{label}")
            runs = pd.DataFrame(rows)
        else:
            runs, _ = probe_zoo(
                study.tokens, args.probes, budget=setting.fit_options(), seeds=args.seeds, progress=distributed.is_main()
            )
        if distributed.is_main():
            print(runs.to_string(index=False))
            if args.out:
                atomic_write(args.out, lambda tmp: runs.to_csv(tmp, index=False))
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()


# --- evaluate ------------------------------------------------------------------------------


def _reference_loader() -> Callable[..., Any] | None:
    """``load_reference_head`` of epviz.training or epviz.probes, where this install has one."""
    for module in ("epviz.training", "epviz.probes"):
        loader = getattr(importlib.import_module(module), "load_reference_head", None)
        if callable(loader):
            return loader
    return None


def _load_reference(path: Path) -> Any:
    """A reference head (``.pth``, or a released head's folder) as a Probe, through ``load_reference_head``."""
    from epviz.probes import Probe

    loader = _reference_loader()
    if loader is None:
        raise ValueError(
            f"{path} is a reference head (.pth), and this install of epviz has no load_reference_head to read it: "
            "update epviz, or pass a probe saved by epviz (<path>.json + <path>.safetensors)"
        )
    probe = loader(path, device="cpu")
    if not isinstance(probe, Probe):
        raise ValueError(f"load_reference_head({path}) returned {type(probe).__name__}, not a probe")
    return probe


def _probe_origin(path: Path) -> dict[str, Any]:
    """Backbone and layer the saved probe was trained on (from its JSON), where recorded."""
    base = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    meta = base.with_name(base.name + ".json")
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError):
        return {}
    origin = (doc.get("fit") or {}).get("train_origin") or {}
    return {k: origin.get(k) for k in ("backbone", "layer") if origin.get(k) is not None}


def _evaluate(args: argparse.Namespace) -> None:
    from epviz.backbones import load_backbone
    from epviz.data import load_split
    from epviz.evaluate import accuracy
    from epviz.provenance import note
    from epviz.tokens import extract_tokens
    from epviz.training import load_probe

    path = Path(args.probe)
    reference = path.suffix == ".pth" or path.is_dir()  # a reference checkpoint, or a released head's folder
    origin: dict[str, Any] = {}
    if not reference:
        probe = load_probe(path, device="cpu")
        origin = _probe_origin(path)
        if origin.get("backbone") not in (None, args.backbone):
            print(
                f"note: the probe was trained on tokens of {origin['backbone']}; it is evaluated on {args.backbone}",
                file=sys.stderr,
            )
    else:
        probe = _load_reference(path)
    layer = args.layer if args.layer is not None else int(origin.get("layer", -1))
    backbone = load_backbone(args.backbone, weights=args.weights)
    if backbone.dim != probe.dim:
        raise ValueError(
            f"the probe reads tokens of width {probe.dim} but {args.backbone} gives {backbone.dim}: "
            "pass the backbone the probe was trained on (--backbone)"
        )
    dataset = load_split(args.dataset, args.split, args.size, seed=args.seed)
    cache = extract_tokens(
        backbone, dataset, [layer], precision=args.precision, batch_size=args.batch_size, cache_dir=args.cache_dir
    )
    tokens = cache.tokens(layer)
    note(dataset=args.dataset, tokens=tokens)
    scores = accuracy(probe, tokens, topk=(1, 5), batch_size=args.batch_size)
    summary = {
        "probe_file": str(path),
        "probe": probe.name,
        "backbone": args.backbone,
        "layer": tokens.origin.layer,
        "dataset": args.dataset,
        "split": args.split,
        "images": len(tokens),
        "top1": scores["top1"],
        "top5": scores["top5"],
        "token_cache": cache.path.name,
    }
    import pandas as pd

    print(pd.DataFrame([summary]).to_string(index=False))
    table = pd.DataFrame([summary])
    if args.maps:
        table = _maps_table(args, probe, tokens, dataset, summary)
    if args.out:
        out = Path(args.out)
        atomic_write(out, lambda tmp: table.to_csv(tmp, index=False))
        print(f"written: {out}")


def _maps_table(args: argparse.Namespace, probe: Any, tokens: Any, dataset: Any, summary: dict[str, Any]) -> Any:
    """The predictor table of `probe` on `tokens` (Δacc, entropy, localization), printed; with the summary's columns."""
    import numpy as np

    from epviz.analysis import predictor_table

    if probe.num_predictors == 0:
        raise ValueError(f"probe '{probe.name}' has no attention predictors: --maps needs an attentive probe (ep, mhca, ...)")
    index = None if args.localization_images is None else np.arange(min(args.localization_images, len(tokens)))
    context = {"backbone": args.backbone, "layer": tokens.origin.layer, "probe": probe.name, "seed": None}
    table = predictor_table(probe, tokens, dataset, context=context, localization_index=index, n_boot=args.n_boot)
    shown = [
        c
        for c in ("predictor", "delta_acc", "delta_acc_lo", "delta_acc_hi", "entropy_norm", "maxboxacc_v2", "inbox_mass")
        if c in table
    ]
    print(table[shown].round(4).to_string(index=False))
    means = table[[c for c in ("delta_acc", "entropy_norm", "maxboxacc_v2", "inbox_mass") if c in table]].mean()
    print("mean over predictors: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    for key in ("probe_file", "dataset", "split", "images", "top1", "top5", "token_cache"):
        table[key] = summary[key]
    return table


# --- results -------------------------------------------------------------------------------


def _results(args: argparse.Namespace) -> None:
    from epviz.results import check_readme, publish, read_results, render_section, write_readme

    root = _repo_root()
    readme = Path(args.readme) if args.readme else root / "README.md"
    csv = Path(args.csv) if args.csv else root / "docs" / "results.csv"
    source = Path(args.source) if args.source else root / "figures" / "results.csv"
    try:
        name = csv.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        name = str(csv)
    if args.write:
        if source.is_file():
            publish(source, csv)
            print(f"published {source} as {csv}")
        else:
            print(f"{source} does not exist (no full run here): the section is rebuilt from {csv} as it is")
        write_readme(readme, csv, name)
        print(f"rebuilt the results section of {readme} from {csv}")
        return
    if args.check:
        problem = check_readme(readme, csv, name)
        if problem:
            sys.exit(problem)
        print(f"the results section of {readme.name} is what {name} gives")
        if source.is_file() and csv.is_file():
            from epviz.results import _same_rows

            if not _same_rows(read_results(source), read_results(csv)):
                print(f"note: {source} differs from {name}; `epviz results --write` publishes it")
        return
    print(render_section(read_results(csv) if csv.is_file() else None, name))


def _zoo(args: argparse.Namespace) -> None:
    from epviz.backbones import zoo

    for name in zoo.ZOO:
        card = zoo.zoo_card(name)
        print(f"{name}: {card['objective']}")
        if "final_metrics" in card:
            print(f"  final metrics: {card['final_metrics']}  ({card['wall_time_seconds'] / 60:.1f} min)")
    evaluation = zoo.ZOO_DIR / "evaluation.csv"
    if evaluation.is_file():
        print(evaluation.read_text())


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``epviz`` command."""
    parser = argparse.ArgumentParser(prog="epviz", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="run the notebooks and write figures/ plus figures/report.html")
    rep.add_argument("--fast", action="store_true", help="EPVIZ_FAST mode (small sizes, as in CI)")
    rep.add_argument("--only", nargs="*", default=None, help="notebook name prefixes to run")
    rep.add_argument(
        "--heartbeat", type=float, default=60.0, help="seconds between 'still running' lines of a long cell (0: none)"
    )
    rep.add_argument(
        "--cell-timeout",
        type=int,
        default=None,
        help=f"seconds a cell may run before it fails (default {CELL_TIMEOUT_FULL} in full mode, {CELL_TIMEOUT_FAST} in fast mode)",
    )
    rep.set_defaults(func=_reproduce)
    ext = sub.add_parser(
        "extract",
        help="extract a split's tokens into the cache (one process, or every rank under torchrun / srun)",
        description="Extract the tokens of one split into the token cache. Under torchrun (torchrun --nproc_per_node=N "
        "-m epviz extract ...) or srun with the torchrun variables, the ranks share the split's shards; an interrupted "
        "run, re-run with the same arguments, extracts only the shards it had not finished.",
    )
    ext.add_argument("--backbone", default="tiny-mae", help="zoo name, preset (mae-vit-b, ...) or timm name")
    ext.add_argument("--weights", default=None, help="backbone weights file (safetensors or a checkpoint)")
    ext.add_argument(
        "--dataset",
        default="cluttered-fashion-mnist",
        help="dataset spec: imagenet:<root>, cub:<root>, pets:<root>, imagefolder:<root>, the canvases",
    )
    ext.add_argument("--split", default="test", choices=["train", "val", "test"])
    ext.add_argument(
        "--size",
        type=_size,
        default="all",
        help="number of images, or 'all' (default): the full split (canvases: the standard size)",
    )
    ext.add_argument("--seed", type=int, default=0, help="which images a --size keeps (canvases: which canvases)")
    ext.add_argument(
        "--on-error",
        default="raise",
        choices=["raise", "skip"],
        help="unreadable images: stop (raise) or leave them out, listed (skip)",
    )
    ext.add_argument("--layers", nargs="+", default=["-1"], help="block indices (0 = first, -1 = last) or 'all'")
    ext.add_argument(
        "--norm", default="auto", choices=["auto", "on", "off"], help="the encoder's final norm (auto: the backbone's convention)"
    )
    ext.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ext.add_argument(
        "--dtype",
        default="float16",
        choices=["float16", "float32", "int8"],
        help="storage dtype (int8: per-token scale, half of float16)",
    )
    ext.add_argument("--views", type=int, default=1, help="augmented views stored per image (RandomResizedCrop + flip); 1: none")
    ext.add_argument("--view-seed", type=int, default=0)
    ext.add_argument("--batch-size", type=int, default=128)
    ext.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per rank")
    ext.add_argument(
        "--shard-size", type=int, default=None, help="images per shard (default: at most 10,000, one per rank at least)"
    )
    ext.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: this rank's GPU, else the CPU)")
    ext.add_argument("--cache-dir", default=None, help="token cache folder (default $EPVIZ_CACHE)")
    ext.set_defaults(func=_extract)
    tr = sub.add_parser(
        "train",
        help="train probes with the setting's tuning budget (one process, or data-parallel under torchrun / srun)",
        description="Train probes on a backbone's cached tokens with a setting's tuning budget (every probe tuned on val, "
        "test evaluated once), or with --protocol per-step on fresh augmented images. Under torchrun every fit is "
        "data-parallel over the ranks (global batch split, DDP, BatchNorm synced) and rank 0 alone writes. The cached "
        "runs land in the probe cache under the keys the notebooks compute, so notebooks opened with the same dataset, "
        "SIZES and EXTRACT draw their figures from them without training again.",
    )
    tr.add_argument("--backbone", nargs="+", required=True, help="zoo names, presets (mae-vit-b, ...) or timm names")
    tr.add_argument("--control", default=None, help="the random-init control, one of --backbone (default: none)")
    tr.add_argument("--dataset", default="cluttered-fashion-mnist", help="dataset spec (imagenet:<root>, ...)")
    tr.add_argument("--probes", nargs="+", required=True, help="probe names or variants (cls, gap, ep, ep16, mhca, ...)")
    tr.add_argument("--setting", default="full", choices=SETTINGS, help="budget and grid (paper: LARS, 90 epochs, batch 4096)")
    tr.add_argument("--sizes", nargs="*", default=None, help="images per split, e.g. train=all val=10000 test=all")
    tr.add_argument("--seeds", nargs="+", type=int, default=[0])
    tr.add_argument("--layer", type=int, default=-1, help="the block the probes read")
    tr.add_argument("--layers", nargs="+", default=["-1"], help="the blocks the caches hold ('all' for the notebooks' caches)")
    tr.add_argument("--dtype", default="float16", choices=["float16", "float32", "int8"])
    tr.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="extraction compute (part of the cache key)")
    tr.add_argument("--views", type=int, default=1, help="stored augmented views of each training image (1: none)")
    tr.add_argument("--protocol", default="cached", choices=["cached", "per-step"])
    tr.add_argument("--accum-steps", type=int, default=1, help="per-step protocol: gradient accumulation steps")
    tr.add_argument("--cache-dir", default=None, help="token cache folder (default $EPVIZ_CACHE)")
    tr.add_argument("--save", default=None, help="per-step protocol: folder for the trained probes")
    tr.add_argument("--out", default=None, help="write the runs table as CSV to this file")
    tr.set_defaults(func=_train)
    ev = sub.add_parser(
        "evaluate",
        help="score a saved probe on a split: top-1/top-5, and with --maps its predictors' Δacc, entropy and localization",
        description="Load a saved probe, extract (or read from the token cache) the split's tokens and score it. "
        "Nothing is trained and the probe cache is not touched.",
    )
    ev.add_argument(
        "--probe",
        required=True,
        help="a probe saved by epviz (<path>, .json or .safetensors) or a reference head (.pth, or a released head's folder)",
    )
    ev.add_argument("--backbone", required=True, help="the backbone the probe reads (zoo name, preset or timm name)")
    ev.add_argument("--weights", default=None, help="backbone weights file")
    ev.add_argument("--dataset", required=True, help="dataset spec: cluttered-fashion-mnist, imagenet:<root>, ...")
    ev.add_argument("--split", default="test", choices=["train", "val", "test"])
    ev.add_argument("--size", type=int, default=None, help="number of images (default: the split's standard size)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--layer", type=int, default=None, help="block to read (default: the one the probe was trained on, else -1)")
    ev.add_argument("--maps", action="store_true", help="also the predictor table: Δacc, entropy, MaxBoxAccV2, in-box mass")
    ev.add_argument("--localization-images", type=int, default=None, help="images of the localization measure (default: all)")
    ev.add_argument("--n-boot", type=int, default=0, help="bootstrap resamples of the --maps intervals (0: none)")
    ev.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ev.add_argument("--batch-size", type=int, default=128)
    ev.add_argument("--cache-dir", default=None, help="token cache folder (default $EPVIZ_CACHE)")
    ev.add_argument("--out", default=None, help="write the table as CSV to this file")
    ev.set_defaults(func=_evaluate)
    res = sub.add_parser(
        "results",
        help="the README's generated results section: print it, rebuild it (--write) or check it (--check)",
        description="The README's results section is generated from docs/results.csv, the published copy of a full "
        "run's figures/results.csv. --write copies figures/results.csv (when there is one) to docs/results.csv and "
        "rebuilds the section; --check exits non-zero when the section is not what docs/results.csv gives.",
    )
    mode = res.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="publish figures/results.csv and rebuild the section")
    mode.add_argument("--check", action="store_true", help="exit non-zero when the section differs from docs/results.csv")
    res.add_argument("--readme", default=None, help="default README.md of the checkout")
    res.add_argument("--csv", default=None, help="the published table (default docs/results.csv)")
    res.add_argument("--from", dest="source", default=None, help="a full run's table (default figures/results.csv)")
    res.set_defaults(func=_results)
    z = sub.add_parser("zoo", help="show the embedded backbones' model cards")
    z.set_defaults(func=_zoo)
    args = parser.parse_args(argv)
    if args.func in (_evaluate, _extract, _train):
        try:
            args.func(args)
        except (FileNotFoundError, ValueError, OSError, TypeError) as err:  # bad input: one line, not a traceback
            sys.exit(f"epviz {args.command}: {err}")
        return
    args.func(args)


if __name__ == "__main__":
    main()

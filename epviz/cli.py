"""Command line: ``epviz reproduce | extract | zoo``.

epviz reproduce [--fast] [--only 00_quickstart]   run the notebooks, write figures/ + report.html
epviz extract --backbone tiny-mae --split test --size 4000 --layers -1
epviz zoo                                          the zoo's model cards and probe results
"""

from __future__ import annotations

import argparse
import base64
import functools
import html
import json
import os
import re
import sys
import time
from pathlib import Path

from epviz.atomic import atomic_write, atomic_write_text

__all__ = ["main", "run_notebooks", "write_report"]


def _repo_root() -> Path:
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / "notebooks").is_dir() and (folder / "pyproject.toml").is_file():
            return folder
    return Path(__file__).resolve().parents[1]


def run_notebooks(notebooks: list[Path], fast: bool, timeout: int = 3600) -> list[dict]:
    """Execute notebooks in place of a temporary copy with nbclient; returns per-notebook timings.

    The executed copies (with outputs) go to ``figures/notebooks/``; the stored notebooks
    stay without outputs. A failing notebook does not stop the others: its entry holds
    ``error`` (the failing cell's error) and its executed copy shows the traceback.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    from tqdm.auto import tqdm

    os.environ["EPVIZ_FAST"] = "1" if fast else "0"
    root = _repo_root()
    executed_dir = root / "figures" / ("fast" if fast else "") / "notebooks"
    executed_dir.mkdir(parents=True, exist_ok=True)
    timings = []
    for path in tqdm(notebooks, desc="notebooks", unit="nb"):
        nb = nbformat.read(path, as_version=4)
        start = time.time()
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
        entry = {"notebook": path.name}
        try:
            client.execute()
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as err:
            entry["error"] = _first_line(err)
        atomic_write(executed_dir / path.name, functools.partial(nbformat.write, nb))
        entry["seconds"] = round(time.time() - start, 1)
        timings.append(entry)
        status = f"FAILED: {entry['error']}" if "error" in entry else "ok"
        print(f"{path.name}: {entry['seconds']} s, {status}", flush=True)
    return timings


def _first_line(err: Exception) -> str:
    """The most telling line of a notebook error (nbclient puts the exception last)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # tracebacks arrive coloured
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]]
    return (errors or lines or [type(err).__name__])[-1][:300]


def write_report(figures: Path, timings: list[dict] | None = None) -> Path:
    """One self-contained HTML page showing every PNG in `figures` (images embedded)."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>epviz figures</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%;border:1px solid #ddd}"
        "figure{margin:2em 0}figcaption{color:#555}</style>",
        "<h1>epviz — reproduced figures</h1>",
    ]
    if timings:
        rows = "".join(
            f"<tr><td>{html.escape(t['notebook'])}</td><td>{t['seconds']}</td><td>{html.escape(t.get('error', 'ok'))}</td></tr>"
            for t in timings
        )
        parts.append(f"<table><tr><th>notebook</th><th>seconds</th><th>status</th></tr>{rows}</table>")
    for png in sorted(figures.glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode()
        csv = png.with_suffix(".csv")
        link = f" — data: <a href='{html.escape(csv.name)}'>{html.escape(csv.name)}</a>" if csv.is_file() else ""
        parts.append(
            f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(png.stem)}'>"
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
    timings = run_notebooks(notebooks, fast=args.fast)
    report = write_report(root / "figures" / ("fast" if args.fast else ""), timings)
    print(f"report: {report}")
    failed = [t["notebook"] for t in timings if "error" in t]
    if failed:
        sys.exit(
            f"{len(failed)} notebook(s) failed: {', '.join(failed)}; their executed copies under "
            f"figures/{'fast/' if args.fast else ''}notebooks/ show the error"
        )


def _extract(args: argparse.Namespace) -> None:
    from epviz.backbones import load_backbone
    from epviz.data import ClutteredFashionMNIST
    from epviz.tokens import extract_tokens

    bb = load_backbone(args.backbone, weights=args.weights)
    ds = ClutteredFashionMNIST(args.split, args.size, seed=args.seed)
    layers = None if args.layers == ["all"] else [int(x) for x in args.layers]
    cache = extract_tokens(bb, ds, layers, precision=args.precision, batch_size=args.batch_size, cache_dir=args.cache_dir)
    print(json.dumps({"path": str(cache.path), "hit": cache.hit, "layers": cache.layers, "images": len(cache)}))


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
    rep.set_defaults(func=_reproduce)
    ext = sub.add_parser("extract", help="extract tokens of cluttered canvases into the cache")
    ext.add_argument("--backbone", default="tiny-mae")
    ext.add_argument("--weights", default=None)
    ext.add_argument("--split", default="test", choices=["train", "test"])
    ext.add_argument("--size", type=int, default=4000)
    ext.add_argument("--seed", type=int, default=0)
    ext.add_argument("--layers", nargs="+", default=["-1"], help="block indices (0 = first, -1 = last) or 'all'")
    ext.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ext.add_argument("--batch-size", type=int, default=128)
    ext.add_argument("--cache-dir", default=None)
    ext.set_defaults(func=_extract)
    z = sub.add_parser("zoo", help="show the embedded backbones' model cards")
    z.set_defaults(func=_zoo)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()

"""Update latency of the Explorer when the query or the image changes on cached data.

The Explorer is built on one backbone and probe and warmed up once (tokens extracted or read,
the probe trained or loaded, its predictor table measured); then the query and the image
position are changed from code, alternately, and each update is timed end to end: the new
state (maps of the image, overlay, table), the figure rendered to PNG and the widgets updated.
Then the same in the evidence view (exact per-token contributions): image changes, and changes of
the logit explained (predicted, true, their difference). Target: a median of at most 100 ms.

    python benchmarks/explorer_latency.py [--backbone tiny-mae] [--probe ep] [--changes 20] [--full]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epviz.explorer import Explorer  # noqa: E402
from epviz.explorer.model import EVIDENCE_FOR  # noqa: E402
from epviz.setting import Setting  # noqa: E402


def timed(explorer: Explorer, **values) -> tuple[float, float]:
    """Wall time of one update from code and the part spent computing the state, in ms."""
    start = time.perf_counter()
    state = explorer.set(**values)
    total = (time.perf_counter() - start) * 1000
    if state.error:
        raise RuntimeError(f"the update {values} failed: {state.error}")
    return total, state.seconds * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny-mae")
    parser.add_argument("--probe", default="ep")
    parser.add_argument("--changes", type=int, default=20, help="updates timed per kind")
    parser.add_argument("--full", action="store_true", help="full-size sets (default: fast-mode sizes)")
    args = parser.parse_args()

    start = time.perf_counter()
    explorer = Explorer([args.backbone], [args.probe], setting=Setting.full() if args.full else Setting.fast())
    print(f"first state (tokens, probe, table): {time.perf_counter() - start:.1f} s; error: {explorer.state.error or 'none'}")
    k, n = explorer.state.num_predictors, explorer.state.image_count
    query, image = [], []
    for i in range(args.changes):
        query.append(timed(explorer, query=(i + 1) % k))
        image.append(timed(explorer, position=(7 * i + 1) % n))
    explorer.set(view="evidence")
    evidence_image, evidence_for = [], []
    for i in range(args.changes):
        evidence_image.append(timed(explorer, position=(7 * i + 3) % n))
        evidence_for.append(timed(explorer, evidence=EVIDENCE_FOR[(i + 1) % len(EVIDENCE_FOR)]))
    kinds = {
        "query change": query,
        "image change": image,
        "evidence view, image change": evidence_image,
        "evidence view, logit change": evidence_for,
    }
    for name, runs in kinds.items():
        total = statistics.median(t for t, _ in runs)
        state = statistics.median(s for _, s in runs)
        print(
            f"{name}: median {total:.0f} ms end to end (state {state:.0f} ms, figure and widgets {total - state:.0f} ms), "
            f"max {max(t for t, _ in runs):.0f} ms over {len(runs)} updates"
        )


if __name__ == "__main__":
    main()

"""Train-step time of EP (fast and direct forms) against mhca and jepa, side by side.

One train step = forward + backward + SGD step step on cached tokens at ViT-B shape
(N=196, D=768, M=32, batch 256, C=1000 by default). The probes are timed in
interleaved rounds (fast, direct, mhca, jepa, fast, ...) so that load changes on a
shared machine hit all of them alike; the report gives medians and ratios.

    python benchmarks/probes.py --repeats 3      # with epviz installed, or PYTHONPATH=. from the repo root
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import epviz.probes as probes  # noqa: E402
from epviz.probes.ep import EfficientProbe  # noqa: E402


class DirectEP(nn.Module):
    """EP whose pooling runs in the direct form (project every token, then pool)."""

    def __init__(self, probe: EfficientProbe) -> None:
        super().__init__()
        self.probe = probe

    def forward(self, patch: torch.Tensor) -> torch.Tensor:
        return self.probe.head(self.probe.norm(self.probe.pool_direct(patch)))


def make_step(model: nn.Module, patch: torch.Tensor, labels: torch.Tensor):
    """A closure running one train step of `model`."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    model.train()

    def step() -> None:
        loss = F.cross_entropy(model(patch), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=196)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    patch = torch.randn(args.batch, args.tokens, args.dim)
    labels = torch.randint(0, args.classes, (args.batch,))
    ep = probes.build("ep", args.dim, args.classes, num_queries=args.queries, seed=0)
    ep_direct = probes.build("ep", args.dim, args.classes, num_queries=args.queries, seed=0)
    models = {
        "ep (fast)": ep,
        "ep (direct)": DirectEP(ep_direct),
        "mhca": probes.build("mhca", args.dim, args.classes, seed=0),
        "jepa": probes.build("jepa", args.dim, args.classes, seed=0),
    }
    steps = {name: make_step(m, patch, labels) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}

    print(
        f"train step (forward + backward + SGD step) at B={args.batch}, N={args.tokens}, D={args.dim}, "
        f"M={args.queries}, C={args.classes}; {torch.get_num_threads()} threads, {args.repeats} rounds"
    )
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_:
                times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(t) for name, t in times.items()}
    fast = median["ep (fast)"]
    print(f"\n{'probe':<13}{'median s/step':>15}{'x ep (fast)':>13}   all rounds (s)")
    for name, t in median.items():
        rounds = " ".join(f"{x:.3f}" for x in times[name])
        print(f"{name:<13}{t:>15.3f}{t / fast:>12.1f}x   {rounds}")
    direct_ratio, jepa_ratio = median["ep (direct)"] / fast, median["jepa"] / fast
    print(f"\nEP fast vs direct: {direct_ratio:.1f}x faster (target >= 4x: {'met' if direct_ratio >= 4 else 'MISSED'})")
    print(f"EP fast vs jepa:   {jepa_ratio:.1f}x faster (target >= 5x: {'met' if jepa_ratio >= 5 else 'MISSED'})")
    print(f"EP fast vs mhca:   {median['mhca'] / fast:.1f}x faster")


if __name__ == "__main__":
    main()

"""What does EP16 conclude from where it looks? The README's evidence figure, with its data.

EP16 on the last block of one backbone (default tiny-mae) trains at the standard budget on ``--train``
canvases (seed 0) as one stack of ``--lrs`` (``epviz.training.fit_grid``), the learning rate chosen on the
standard val split. For the first ``--images`` test canvases it draws (``epviz.viz.attribution_gallery``) the
mean attention of the 16 queries, Integrated Gradients on the tokens and the exact evidence
(``Probe.evidence`` summed over the queries) for the predicted class, and writes ``<out>.png``, ``<out>.csv``
(one row per image) and ``<out>.json`` (provenance). The evidence is checked to sum to the logit.

    python scripts/evidence_figure.py [--backbone tiny-mae] [--train 6000] [--images 4] [--out docs/evidence_tiny-mae]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epviz import Setting, extract_tokens, load_backbone  # noqa: E402
from epviz.analysis import attribution_vs_attention  # noqa: E402
from epviz.data import ClutteredFashionMNIST  # noqa: E402
from epviz.errors import DataError  # noqa: E402
from epviz.training import fit_grid  # noqa: E402
from epviz.viz.attribution import attribution_gallery  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny-mae")
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-2, 3e-2, 1e-1])
    parser.add_argument("--train", type=int, default=6000, help="train canvases")
    parser.add_argument("--images", type=int, default=4, help="test canvases drawn")
    parser.add_argument("--steps", type=int, default=32, help="Integrated Gradients steps")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "evidence_tiny-mae")
    parser.add_argument("--fast", action="store_true", help="the fast setting's budget (a pipeline check)")
    args = parser.parse_args(argv)
    setting = Setting.fast() if args.fast else Setting.full()
    backbone = load_backbone(args.backbone)
    sets = (
        ClutteredFashionMNIST("train", args.train, seed=0),
        ClutteredFashionMNIST("train", int(setting.sizes["val"] or 2_000), seed=1),
        ClutteredFashionMNIST("test", args.images, seed=0),
    )
    tr, va, te = (extract_tokens(backbone, ds, layers=[-1]).tokens(-1) for ds in sets)
    keys = ("epochs", "batch_size", "optimizer", "warmup_epochs", "label_smoothing", "early_stopping", "precision")
    budget = {k: v for k, v in setting.fit_options().items() if k in keys}
    probe = fit_grid("ep16", tr, va, lrs=args.lrs, **budget).probe.eval()
    compared = attribution_vs_attention(probe, te, n_steps=args.steps)
    rows = np.arange(len(te))
    batch = te.batch(rows)
    with torch.no_grad():
        evidence, logits = probe.evidence(batch.patch, batch.prefix), probe(batch.patch, batch.prefix)
    targets = torch.as_tensor(compared.attribution.targets)
    exact = evidence.patch[rows, targets].sum(1).numpy()  # (images, tokens), summed over the queries
    if not torch.allclose(evidence.logits(), logits, atol=1e-4):  # the contributions sum to the probe's own logits
        raise DataError(f"the evidence does not sum to the probe's logits ({evidence.logits()} against {logits})")
    test = sets[2]
    attribution_gallery(
        test.images,
        compared.attribution.attributions,
        compared.maps,
        te.grid,
        boxes=test.boxes,
        evidence=exact,
        title=f"EP16 on {args.backbone}: attention, Integrated Gradients and exact evidence for the predicted class",
        out=args.out.parent,
        name=args.out.name,
    )
    print("wrote", args.out.with_suffix(".png"), args.out.with_suffix(".csv"))


if __name__ == "__main__":
    main()

"""Cost of probes: trainable parameters, FLOPs per image and measured throughput (Figs. 2, 3).

FLOPs are what :class:`torch.utils.flop_counter.FlopCounterMode` counts: 2 FLOPs per
multiply-add of matrix products (mm, bmm, addmm, einsum, convolutions, attention kernels);
element-wise work (softmax, normalisation, bias adds, activations) is not counted. Fused
attention kernels are counted through the math backend (see :func:`count_flops`). The
probe is measured on one image's tokens (FLOPs are linear in the batch). With a backbone,
its FLOPs are those of ``model.forward_features`` on one image (every block, no classifier),
i.e. the cost of a probe that runs the frozen backbone at every step.

Throughput is images per second of the probe's forward pass (eval mode, no gradients) on
random tokens, after warm-up, on the chosen device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import pandas as pd
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from epviz.analysis._common import context_columns, prepare_probe
from epviz.evaluate import eval_mode
from epviz.probes import Probe, accepted_options, build, probe_specs, trainable_params

__all__ = ["count_flops", "probe_flops", "backbone_flops", "throughput", "efficiency", "probe_costs"]


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of running `fn()`, as counted by FlopCounterMode (2 per multiply-add).

    ``scaled_dot_product_attention`` runs with the math backend while counting: the fused
    CPU kernel is invisible to FlopCounterMode, the math backend's matmuls are not.
    Gradients are enabled while counting (nothing is backpropagated): FlopCounterMode's
    module tracker cannot hook a view of a parameter made under ``no_grad``, which is how
    the learned queries of coca and siglip enter their attention.
    """
    with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _tokens(probe: Probe, batch: int, num_tokens: int, num_prefix: int, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    patch = torch.randn(batch, num_tokens, probe.dim, generator=gen).to(device)
    prefix = torch.randn(batch, num_prefix, probe.dim, generator=gen).to(device) if num_prefix else None
    return patch, prefix


def probe_flops(probe: Probe, num_tokens: int, num_prefix: int = 1, device: str | torch.device | None = None) -> int:
    """FLOPs of the probe's forward pass for one image of `num_tokens` patch and `num_prefix` prefix tokens."""
    device = prepare_probe(probe, device)
    patch, prefix = _tokens(probe, 1, num_tokens, num_prefix, device)
    with eval_mode(probe):
        return count_flops(lambda: probe(patch, prefix))


def backbone_flops(backbone) -> int:
    """FLOPs of one image through the backbone's ``forward_features`` (all blocks).

    Args:
        backbone: An :class:`epviz.backbones.Backbone` (``.model``, ``.image_size``).
    """
    model = backbone.model
    device = next(model.parameters()).device
    h, w = backbone.image_size
    x = torch.zeros(1, 3, h, w, device=device)
    forward = getattr(model, "forward_features", model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return count_flops(lambda: forward(x))
    finally:
        model.train(was_training)


def throughput(
    probe: Probe,
    num_tokens: int,
    num_prefix: int = 1,
    batch_size: int = 256,
    repeats: int = 10,
    warmup: int = 2,
    device: str | torch.device | None = None,
) -> float:
    """Measured images per second of the probe's forward pass on random tokens."""
    if repeats < 1 or batch_size < 1:
        raise ValueError(f"repeats and batch_size must be positive, got {repeats} and {batch_size}")
    device = prepare_probe(probe, device)
    patch, prefix = _tokens(probe, batch_size, num_tokens, num_prefix, device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with eval_mode(probe):
        for _ in range(warmup):
            probe(patch, prefix)
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            probe(patch, prefix)
        sync()
        elapsed = time.perf_counter() - start
    return batch_size * repeats / max(elapsed, 1e-12)


def _named(probes: Probe | Sequence[Probe] | Mapping[str, Probe]) -> list[tuple[str, Probe]]:
    if isinstance(probes, Probe):
        probes = [probes]
    items = list(probes.items()) if isinstance(probes, Mapping) else [(getattr(p, "name", type(p).__name__), p) for p in probes]
    for label, p in items:
        if not isinstance(p, Probe):
            raise TypeError(f"efficiency expects Probes (see epviz.probes.build); {label!r} is a {type(p).__name__}")
    if not items:
        raise ValueError("no probes given")
    return items


def efficiency(
    probes: Probe | Sequence[Probe] | Mapping[str, Probe],
    num_tokens: int | None = None,
    num_prefix: int | None = None,
    *,
    backbone=None,
    batch_size: int = 256,
    repeats: int = 10,
    measure_speed: bool = True,
    device: str | torch.device | None = None,
    context: Mapping | None = None,
) -> pd.DataFrame:
    """Parameters, FLOPs and throughput of each probe.

    Args:
        probes: A probe, a list of probes (labelled by name) or a mapping label -> probe.
        num_tokens: Patch tokens per image (default: the backbone's, else the probe's grid).
        num_prefix: Prefix tokens per image (default: the backbone's, else 1).
        backbone: An :class:`epviz.backbones.Backbone`; adds its FLOPs per image.
        batch_size: Batch size of the throughput measurement.
        repeats: Timed forward passes.
        measure_speed: Measure throughput (False leaves it NaN).
        device: Where to measure throughput; None picks automatically.
        context: Values of the context columns.

    Returns:
        One row per probe: params (trainable), pool_params (without the classifier),
        flops (probe, per image), backbone_flops, total_flops, gflops, total_gflops,
        throughput (images/s), num_tokens, num_prefix.
    """
    if backbone is not None:
        num_tokens = backbone.num_patches if num_tokens is None else num_tokens
        num_prefix = backbone.num_prefix_tokens if num_prefix is None else num_prefix
    num_prefix = 1 if num_prefix is None else int(num_prefix)
    bb_flops = backbone_flops(backbone) if backbone is not None else None
    rows = []
    for label, probe in _named(probes):
        n = num_tokens
        if n is None:
            if probe.grid is None:
                raise ValueError(f"efficiency needs num_tokens (or a backbone, or a probe built with grid=...) for {label!r}")
            n = probe.grid[0] * probe.grid[1]
        n = int(n)
        flops = probe_flops(probe, n, num_prefix, device=device)
        params = trainable_params(probe)
        total = flops + bb_flops if bb_flops is not None else None
        rows.append(
            {
                **context_columns(context),
                "probe": label,
                "params": params,
                "pool_params": params - trainable_params(probe.head),
                "flops": flops,
                "backbone_flops": bb_flops,
                "total_flops": total,
                "gflops": flops / 1e9,
                "total_gflops": None if total is None else total / 1e9,
                "throughput": throughput(probe, n, num_prefix, batch_size, repeats, device=device)
                if measure_speed
                else float("nan"),
                "num_tokens": n,
                "num_prefix": num_prefix,
            }
        )
    return pd.DataFrame(rows)


def probe_costs(
    probes: str | Sequence[str] | Mapping[str, Mapping | None],
    backbone,
    num_classes: int,
    *,
    measure_speed: bool = False,
) -> pd.DataFrame:
    """Trainable parameters, FLOPs (and optionally throughput) of each probe on a backbone's tokens.

    Args:
        probes: Probe specs (see :func:`epviz.probes.probe_specs`).
        backbone: The backbone (or its name) whose token count, grid, width and FLOPs apply.
        num_classes: Number of classes C (the classifier's size counts).
        measure_speed: Also measure throughput (a timing run; NaN otherwise).

    Returns:
        One row per probe, the columns of :func:`efficiency` with ``backbone``.
    """
    from epviz.backbones import Backbone, load_backbone

    bb = backbone if isinstance(backbone, Backbone) else load_backbone(backbone)
    built = {}
    for label, options in probe_specs(probes).items():
        options = dict(options)
        name = options.pop("name")
        if "grid" not in options and "grid" in accepted_options(name):
            options["grid"] = bb.grid
        built[label] = build(name, bb.dim, num_classes, seed=0, **options)
    return efficiency(built, backbone=bb, measure_speed=measure_speed, context={"backbone": bb.name})

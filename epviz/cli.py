"""Command line: ``epviz reproduce | extract | train | evaluate | results | zoo``.

epviz reproduce [--fast] [--only 00_quickstart]   run the notebooks, write figures/ + report.html
epviz extract --backbone tiny-mae --split test --size 4000 --layers -1
epviz train --backbone tiny-mae --probes ep16 mhca --setting full   tuned probes into the probe cache
epviz evaluate --probe PATH --backbone tiny-mae --dataset cluttered-fashion-mnist --split test [--maps] [--out FILE.csv]
epviz results [--write | --check]                  the README's results section from docs/results.csv
epviz zoo                                          the zoo's model cards and probe results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from epviz.atomic import atomic_write
from epviz.reproduce import (
    CELL_TIMEOUT_FAST,
    CELL_TIMEOUT_FULL,
    repo_root,
    run_notebooks,
    write_report,
)

__all__ = ["main"]


def _reproduce(args: argparse.Namespace) -> None:
    root = repo_root()
    notebooks = sorted((root / "notebooks").glob("[0-9]*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if any(nb.stem.startswith(o) for o in args.only)]
    if not notebooks:
        sys.exit(f"no notebooks found under {root / 'notebooks'}")
    timeout = args.cell_timeout or (CELL_TIMEOUT_FAST if args.fast else CELL_TIMEOUT_FULL)
    timings = run_notebooks(notebooks, fast=args.fast, timeout=timeout)
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


def _load_reference(path: Path) -> Any:
    """A reference head (``.pth``, or a released head's folder) as a Probe."""
    from epviz.training import load_reference_head

    return load_reference_head(path, device="cpu")


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
    scores = _scores_with_intervals(probe, tokens, args)
    summary = {
        "probe_file": str(path),
        "probe": probe.name,
        "backbone": args.backbone,
        "layer": tokens.origin.layer,
        "dataset": args.dataset,
        "split": args.split,
        "images": len(tokens),
        **scores,
        "token_cache": cache.path.name,
    }
    import pandas as pd

    print(pd.DataFrame([summary]).to_string(index=False))
    table, chance = pd.DataFrame([summary]), None
    if args.maps:
        table, chance = _maps_table(args, probe, tokens, dataset, summary)
    if args.out:
        out = Path(args.out)
        atomic_write(out, lambda tmp: table.to_csv(tmp, index=False))
        print(f"written: {out}")
        if chance is not None:
            beside = out.with_name(f"{out.stem}_chance{out.suffix or '.csv'}")
            atomic_write(beside, lambda tmp: chance.to_csv(tmp, index=False))
            print(f"written: {beside} (the trivial maps' scores on the same boxes)")


def _scores_with_intervals(probe: Any, tokens: Any, args: argparse.Namespace) -> dict[str, float]:
    """Top-1 and top-5 accuracy, each with its bootstrap interval over the images unless ``--n-boot 0``."""
    from epviz.analysis.intervals import bootstrap_mean
    from epviz.evaluate import predict

    predictions = predict(probe, tokens, batch_size=args.batch_size)
    scores = predictions.accuracy(topk=(1, 5))
    if args.n_boot:
        for k in (1, 5):
            interval = bootstrap_mean(predictions.hits(k), n_boot=args.n_boot, seed=args.seed)
            scores[f"top{k}_lo"], scores[f"top{k}_hi"] = interval.lo, interval.hi
    return scores


def _maps_table(
    args: argparse.Namespace, probe: Any, tokens: Any, dataset: Any, summary: dict[str, Any]
) -> tuple[Any, Any | None]:
    """The predictor table of `probe` on `tokens` (Δacc, entropy, localization), printed; with the summary's columns.

    Returns:
        The table, and the trivial maps' scores on the same boxes (None when the dataset has no boxes).
    """
    import numpy as np

    from epviz.analysis import localization_baselines, predictor_table

    if probe.num_predictors == 0:
        raise ValueError(f"probe '{probe.name}' has no attention predictors: --maps needs an attentive probe (ep, mhca, ...)")
    index = None if args.localization_images is None else np.arange(min(args.localization_images, len(tokens)))
    context = {"backbone": args.backbone, "layer": tokens.origin.layer, "probe": probe.name, "seed": None}
    table = predictor_table(probe, tokens, dataset, context=context, localization_index=index, n_boot=args.n_boot)
    shown = [
        c
        for c in (
            "predictor",
            "delta_acc",
            "delta_acc_lo",
            "delta_acc_hi",
            "entropy_norm",
            "mask_lift",
            "box_lift",
            "maxboxacc_v2",
        )
        if c in table
    ]
    print(table[shown].round(4).to_string(index=False))
    means = table[[c for c in ("delta_acc", "entropy_norm", "mask_lift", "box_lift", "maxboxacc_v2") if c in table]].mean()
    print("mean over predictors: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    chance = None
    if "maxboxacc_v2" in table:
        chance = localization_baselines(
            dataset,
            tokens.grid,
            target_entropy=float(table["entropy_norm"].mean()),
            seed=args.seed,
            index=None if index is None else index.tolist(),
            context=context,
        )
        print("chance, the trivial maps on the same boxes:")
        columns = [c for c in ("baseline", "mask_lift", "box_lift", "maxboxacc_v2", "entropy_norm") if c in chance]
        print(chance[columns].round(4).to_string(index=False))
    for key, value in summary.items():
        if key not in context:
            table[key] = value
    return table, chance


# --- results -------------------------------------------------------------------------------


def _results(args: argparse.Namespace) -> None:
    from epviz.results import check_readme, publish, read_results, render_section, write_readme

    root = repo_root()
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
            from epviz.results import same_rows

            if not same_rows(read_results(source), read_results(csv)):
                print(f"note: {source} differs from {name}; `epviz results --write` publishes it")
        return
    print(render_section(read_results(csv) if csv.is_file() else None, name))


def _cache_verify(args: argparse.Namespace) -> None:
    """One line per token cache: ok, or what is wrong with it (every checksum is checked: reads each cache once)."""
    from epviz.errors import ConfigError, EpvizError
    from epviz.tokens import default_cache_dir
    from epviz.tokens.cache import verify_cache

    root = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    found = sorted(p for p in root.iterdir() if p.is_dir() and ".partial-" not in p.name) if root.is_dir() else []
    chosen: list[Path | str] = list(found) if not args.caches else []
    for item in args.caches:
        named = [p for p in found if p.name == item or (len(item) >= 6 and p.name.rsplit("__", 1)[-1].startswith(item[:20]))]
        chosen += [Path(item)] if Path(item).is_dir() else named or [item]
    if not chosen:
        print(f"no token caches in {root}")
        return
    bad = 0
    for cache in chosen:
        try:
            if isinstance(cache, str):
                raise ConfigError(f"no token cache folder or key {cache!r} in {root}")
            opened = verify_cache(cache)
            print(f"ok   {cache} ({len(opened)} images, layers {opened.layers}, {opened.meta['dtype']})")
        except (EpvizError, OSError) as err:
            bad += 1
            print(f"BAD  {cache}: {err}")
    if bad:
        sys.exit(f"epviz cache verify: {bad} of {len(chosen)} token caches failed")


def _zoo(args: argparse.Namespace) -> None:
    from epviz.backbones import zoo

    loadable = zoo.available()
    for name, entry in zoo.ENTRIES.items():
        if name not in loadable:
            print(f"{name}: not trained here ({entry.method}, {entry.epochs} epochs, seed {entry.seed}; make zoo trains it)")
            continue
        card = zoo.zoo_card(name)
        print(f"{name}: {card['objective']}")
        if "final_metrics" in card:
            print(f"  final metrics: {card['final_metrics']}  ({card['wall_time_seconds'] / 60:.1f} min)")
    evaluation = zoo.ZOO_DIR / "evaluation.csv"
    if evaluation.is_file():
        print(evaluation.read_text())


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``epviz`` command.

    An error of the input (an epviz error, a missing or unreadable file, a bad value) ends any subcommand with
    one line on stderr, ``epviz <command>: <message>``, and exit status 1; ``-v`` shows its traceback instead.
    """
    exit_status = (
        "exit status:\n"
        "  0  the command did its work\n"
        "  1  it could not: an input error (a file, a value or a configuration epviz refuses), reported as one line\n"
        "     on stderr, 'epviz <command>: <message>', naming the file, the field and the fix (-v shows the\n"
        "     traceback instead); a notebook that failed (reproduce); a results section that differs (results --check)\n"
        "  2  the command line cannot be parsed"
    )
    parser = argparse.ArgumentParser(
        prog="epviz", description=__doc__, epilog=exit_status, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="on an error, show its traceback instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="run the notebooks and write figures/ plus figures/report.html")
    rep.add_argument(
        "--fast", action="store_true", help="fast mode: FAST = True in each notebook's parameters cell (small sizes, as in CI)"
    )
    rep.add_argument("--only", nargs="*", default=None, help="notebook name prefixes to run")
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
    ev.add_argument(
        "--n-boot",
        type=int,
        default=1000,
        help="bootstrap resamples of the 95%% intervals over the images (top-1, top-5 and the --maps measures; 0: none)",
    )
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
    cache = sub.add_parser("cache", help="token cache maintenance: verify the caches' checksums")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    verify = cache_sub.add_parser(
        "verify",
        help="check every file of token caches against the checksums written at extraction (one line per cache)",
        description="Read each token cache once and check its files against the per-shard checksums written at "
        "extraction (opening a cache checks only its manifest, headers and sizes). Prints 'ok' or what is wrong, one "
        "line per cache; exits non-zero when any cache fails.",
    )
    verify.add_argument("--cache-dir", default=None, help="token cache folder (default $EPVIZ_CACHE)")
    verify.add_argument(
        "caches", nargs="*", metavar="KEY_OR_FOLDER", help="cache folders, folder names or keys (default: every cache)"
    )
    verify.set_defaults(func=_cache_verify)
    z = sub.add_parser("zoo", help="show the embedded backbones' model cards")
    z.set_defaults(func=_zoo)
    args = parser.parse_args(argv)
    from epviz.errors import EpvizError
    from epviz.safe_load import strip_ansi

    try:
        args.func(args)
    except (EpvizError, FileNotFoundError, ValueError, OSError, TypeError) as err:  # bad input: one line, not a traceback
        if args.verbose:
            raise
        message = ""
        for line in filter(None, (line.strip() for line in strip_ansi(str(err)).splitlines())):
            message += ("" if not message else " " if message[-1] in ".:;!?" else "; ") + line
        sys.exit(f"epviz {args.command}: {message or type(err).__name__}")


if __name__ == "__main__":
    main()

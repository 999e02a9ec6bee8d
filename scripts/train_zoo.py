"""Pre-train an embedded zoo backbone on cluttered Fashion-MNIST canvases.

Fresh canvases are drawn every epoch from all 60,000 Fashion-MNIST training items, so
the backbone never sees the same canvas twice. Writes ``<name>.safetensors`` (encoder
weights only, no head, projector or decoder) and ``<name>.json`` (model card) atomically;
with ``--save-at`` it writes ``<name>@<epoch>`` entries along one run instead. ``<name>`` is
``tiny-<objective>``, with ``-seed<k>`` for seeds other than 0. Every finished epoch leaves a
resumable state under ``.zoo-runs/``; ``--resume`` continues from it.

    python scripts/train_zoo.py sup --epochs 5                                         # tiny-sup
    python scripts/train_zoo.py mae --epochs 20 --save-at 2,7 --dtype fp16 --resume    # tiny-mae@2, @7, @20
    python scripts/train_zoo.py ssl --epochs 2 --batch-size 128 --dtype fp16 --resume   # tiny-ssl

``make zoo`` runs every entry of the pre-training axis. Seeded: the same command on the same
machine gives the same weights (CPU), resumed or not.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epviz.atomic import atomic_write, atomic_write_text  # noqa: E402
from epviz.backbones.zoo import ARCHITECTURE, NORMALIZATION, ZOO_DIR, build_zoo_vit, file_sha256  # noqa: E402
from epviz.data import CanvasGenerator, ClutteredFashionMNIST  # noqa: E402


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 canvases -> normalised float input."""
    mean = torch.tensor(NORMALIZATION["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(NORMALIZATION["std"]).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, patch*patch*3)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class MaskedAutoencoder(nn.Module):
    """MAE around a timm ViT: 75% of patches hidden, light decoder, normalised-pixel loss.

    No loss term touches [CLS]: it is carried through the encoder but never decoded.
    """

    def __init__(
        self, encoder: nn.Module, decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 4, mask_ratio: float = 0.75
    ) -> None:
        super().__init__()
        self.encoder, self.mask_ratio = encoder, mask_ratio
        self.patch = ARCHITECTURE["patch_size"]
        n = encoder.patch_embed.num_patches
        self.embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.pos = nn.Parameter(torch.zeros(1, n, decoder_dim))
        self.blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, mlp_ratio=4.0) for _ in range(decoder_depth))
        self.norm = nn.LayerNorm(decoder_dim)
        self.pred = nn.Linear(decoder_dim, self.patch * self.patch * 3)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.pos, std=0.02)

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        enc = self.encoder
        x = enc._pos_embed(enc.patch_embed(images))  # (B, 1 + N, D): [CLS] first
        cls, patches = x[:, :1], x[:, 1:]
        b, n, d = patches.shape
        keep = int(round(n * (1 - self.mask_ratio)))
        order = torch.rand(b, n, generator=generator).argsort(dim=1)
        visible = order[:, :keep]
        x = torch.cat([cls, patches.gather(1, visible[..., None].expand(-1, -1, d))], dim=1)
        x = enc.norm(enc.blocks(enc.norm_pre(x)))[:, 1:]
        y = self.embed(x)
        full = self.mask_token.expand(b, n, -1).clone()
        full = full.scatter(1, visible[..., None].expand(-1, -1, y.shape[-1]), y.to(full.dtype))
        full = full + self.pos
        for blk in self.blocks:
            full = blk(full)
        pred = self.pred(self.norm(full)).float()
        target = patchify(images, self.patch)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        hidden = torch.ones(b, n, dtype=torch.bool)
        hidden.scatter_(1, visible, False)
        return ((pred - target) ** 2).mean(-1)[hidden].mean()


class ContrastiveViews(nn.Module):
    """SimCLR-style joint embedding through [CLS]: two fresh canvases of each item are the two views.

    The encoder's final-norm [CLS] goes through a 2-layer projector; the loss is NT-Xent (InfoNCE
    over the 2B views of a batch, temperature `temperature`). Patch tokens get no loss of their own.
    """

    def __init__(self, encoder: nn.Module, hidden: int = 512, out: int = 128, temperature: float = 0.2) -> None:
        super().__init__()
        self.encoder, self.temperature = encoder, temperature
        self.projector = nn.Sequential(nn.Linear(encoder.embed_dim, hidden), nn.GELU(), nn.Linear(hidden, out))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm projections of the [CLS] tokens."""
        return F.normalize(self.projector(self.encoder.forward_features(images)[:, 0]).float(), dim=-1)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NT-Xent loss and the share of views whose nearest other view is their partner."""
        z = self.embed(torch.cat([first, second]))
        b = first.shape[0]
        sim = (z @ z.T / self.temperature).fill_diagonal_(float("-inf"))
        partner = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
        return F.cross_entropy(sim, partner), (sim.argmax(1) == partner).float().mean()


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up, then cosine to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


OBJECTIVES = {
    "sup": "supervised: cross-entropy (label smoothing) of a linear head on the final-norm [CLS] token",
    "mae": "masked autoencoder: 75% of patches hidden, 2-block decoder (D=128), per-patch normalised pixel MSE on "
    "hidden patches; no loss touches [CLS]",
    "ssl": "joint embedding through [CLS] (SimCLR-style): two fresh canvases of the same item are the two views; "
    "2-layer projector (512, 128) on the final-norm [CLS], NT-Xent at temperature 0.2; no loss touches the patch tokens",
}
RUNS_DIR = Path(__file__).resolve().parents[1] / ".zoo-runs"


def build_model(objective: str, seed: int) -> tuple[nn.Module, nn.Module]:
    """(encoder, trained model) of one objective; the encoder's initialisation depends on `seed` alone.

    With seed 0 the encoder starts from exactly ``tiny-random``'s weights, which is why ``<run>@0``
    needs no file.
    """
    torch.manual_seed(seed)
    encoder = build_zoo_vit(num_classes=10 if objective == "sup" else 0)
    model = {"sup": lambda: encoder, "mae": lambda: MaskedAutoencoder(encoder), "ssl": lambda: ContrastiveViews(encoder)}
    return encoder, model[objective]()


def step_loss(objective: str, model: nn.Module, batch, canvases: CanvasGenerator, gen: torch.Generator) -> torch.Tensor:
    """The pre-training loss of one batch of canvases (ssl draws each item's second view here)."""
    x = normalize(batch.images)
    if objective == "sup":
        return F.cross_entropy(model(x).float(), batch.labels, label_smoothing=0.1)
    if objective == "mae":
        return model(x, gen)
    return model(x, normalize(canvases.draw(batch.items, gen).images))[0]


@torch.no_grad()
def evaluate(objective: str, model: nn.Module, test: ClutteredFashionMNIST, precision_ctx) -> dict:
    """Test metrics of the pre-training objective itself."""
    model.eval()
    gen = torch.Generator().manual_seed(12345)
    second = CanvasGenerator("test", test.recipe).draw(test.items, gen).images if objective == "ssl" else None
    sums: dict[str, float] = {}
    for s in range(0, len(test), 500):
        x = normalize(test.images[s : s + 500])
        with precision_ctx():
            if objective == "sup":
                metrics = {"test_accuracy": float((model(x).argmax(1) == test.labels[s : s + 500]).float().mean())}
            elif objective == "mae":
                metrics = {"test_masked_pixel_loss": float(model(x, gen))}
            else:
                loss, retrieval = model(x, normalize(second[s : s + 500]))
                metrics = {"test_ntxent_loss": float(loss), "test_partner_retrieval": float(retrieval)}
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value * x.shape[0]
    model.train()
    return {key: value / len(test) for key, value in sums.items()}


def write_entry(encoder: nn.Module, out: Path, name: str, card: dict, dtype: torch.dtype) -> Path:
    """Encoder weights (no head, projector or decoder) as safetensors in `dtype`, and their model card."""
    state = {k: v.detach().to(dtype).contiguous() for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    weights = out / f"{name}.safetensors"
    atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"name": name}))
    atomic_write_text(out / f"{name}.json", json.dumps(dict(card, name=name, sha256=file_sha256(weights)), indent=2) + "\n")
    return weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("objective", choices=sorted(OBJECTIVES))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=256, help="canvases per step (ssl: items, two views each)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--precision", choices=["bf16", "fp32"], default="fp32", help="bf16 autocast pays only on CPUs with bf16 units"
    )
    parser.add_argument(
        "--save-at", default="", help="comma-separated epochs: ship '<name>@<epoch>' entries there and at the end"
    )
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="storage dtype of the shipped weights")
    parser.add_argument("--resume", action="store_true", help=f"continue the run from its last finished epoch ({RUNS_DIR.name}/)")
    parser.add_argument("--eval-size", type=int, default=4000, help="test canvases for the per-epoch metrics")
    parser.add_argument("--out", type=Path, default=ZOO_DIR)
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (smoke tests); the schedule still spans --epochs")
    parser.add_argument("--items", type=int, default=None, help="use only the first N training items (smoke tests)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = f"tiny-{args.objective}" + (f"-seed{args.seed}" if args.seed else "")
    save_at = sorted({int(e) for e in args.save_at.split(",") if e.strip()} | ({args.epochs} if args.save_at else set()))
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    encoder, model = build_model(args.objective, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos" not in n and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos" not in n and "token" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.999) if args.objective == "sup" else (0.9, 0.95),
    )
    canvases = CanvasGenerator("train")
    if args.items:
        canvases.items, canvases.item_labels = canvases.items[: args.items], canvases.item_labels[: args.items]
    test = ClutteredFashionMNIST("test", args.eval_size, seed=0)
    steps_per_epoch = math.ceil(canvases.num_items / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = int(args.warmup_epochs * steps_per_epoch)
    command = "python scripts/train_zoo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    state_path = (args.out if args.out != ZOO_DIR else RUNS_DIR) / f".{name}.run.pt"

    def precision_ctx():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    history: list[dict] = []
    step, first_epoch, spent = 0, 0, 0.0
    run_args = {k: v for k, v in vars(args).items() if k not in ("resume", "threads")} | {"out": str(args.out)}
    if args.resume and state_path.is_file():
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        if saved["command_args"] != run_args:
            raise SystemExit(f"{state_path} was written by another command ({saved['command_args']}); remove it or match it")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        step, first_epoch, spent, history = saved["step"], saved["epoch"] + 1, saved["seconds"], saved["history"]
        print(f"resumed {name} after epoch {saved['epoch']} (step {step})", flush=True)
    start = time.time() - spent

    def card(epoch: int | None) -> dict:
        return {
            "objective": OBJECTIVES[args.objective],
            "architecture": dict(ARCHITECTURE, timm_class="VisionTransformer", num_prefix_tokens=1),
            "normalization": NORMALIZATION,
            "data": {
                "dataset": "cluttered Fashion-MNIST (epviz.data.ClutteredFashionMNIST recipe)",
                "recipe": asdict(canvases.recipe),
                "sampling": f"fresh canvases every epoch from all {canvases.num_items} Fashion-MNIST train items"
                + ("; the second view of each item is another fresh canvas" if args.objective == "ssl" else ""),
                "evaluation": f"{args.eval_size} test canvases (Fashion-MNIST test items), seed 0",
            },
            "training": {
                "epochs": args.epochs if not args.max_steps else None,
                "checkpoint_epoch": epoch,
                "steps": step,
                "batch_size": args.batch_size,
                "optimizer": "AdamW",
                "lr": args.lr,
                "weight_decay": args.weight_decay,
                "warmup_epochs": args.warmup_epochs,
                "schedule": "linear warm-up then cosine per step",
                "label_smoothing": 0.1 if args.objective == "sup" else None,
                "precision": args.precision,
                "storage": args.dtype,
                "seed": args.seed,
                "threads": torch.get_num_threads(),
            },
            "wall_time_seconds": round(time.time() - start, 1),
            "final_metrics": {k: v for k, v in history[-1].items() if k not in ("epoch", "seconds")} if history else {},
            "history": history,
            "environment": {
                "torch": torch.__version__,
                "timm": timm.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
            },
            "command": command,
        }

    bar = tqdm(total=args.max_steps or total, initial=step, desc=name, unit="step")
    for epoch in range(first_epoch, args.epochs):
        running, count = 0.0, 0
        for batch in canvases.epoch(args.batch_size, gen):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, args.lr)
            with precision_ctx():
                loss = step_loss(args.objective, model, batch, canvases, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running, count, step = running + loss.detach().item(), count + 1, step + 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{running / count:.4f}")
            if args.max_steps and step >= args.max_steps:
                break
        metrics = evaluate(args.objective, model, test, precision_ctx)
        history.append({"epoch": epoch, "train_loss": running / max(count, 1), "seconds": time.time() - start, **metrics})
        print(json.dumps(history[-1]), flush=True)
        if args.max_steps and step >= args.max_steps:
            break
        if epoch + 1 in save_at:
            write_entry(encoder, args.out, f"{name}@{epoch + 1}", card(epoch + 1), dtype)
        saved = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "generator": gen.get_state(),
            "step": step,
            "epoch": epoch,
            "seconds": time.time() - start,
            "history": history,
            "command_args": run_args,
        }
        atomic_write(state_path, lambda tmp, saved=saved: torch.save(saved, tmp))
    bar.close()
    if not save_at:
        write_entry(encoder, args.out, name, card(None), dtype)
    print(f"{name}: done in {(time.time() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()

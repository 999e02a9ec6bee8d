"""Pre-train an embedded zoo backbone on cluttered Fashion-MNIST canvases.

Fresh canvases are drawn every epoch from all 60,000 Fashion-MNIST training items, so
the backbone never sees the same canvas twice. Writes ``<name>.safetensors`` (encoder
weights only, no head or decoder) and ``<name>.json`` (model card) atomically.

    python scripts/train_zoo.py sup --epochs 12     # -> epviz/zoo/tiny-sup.*
    python scripts/train_zoo.py mae --epochs 40     # -> epviz/zoo/tiny-mae.*

Seeded: the same command on the same machine gives the same weights (CPU).
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


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up, then cosine to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def evaluate(objective: str, model: nn.Module, test: ClutteredFashionMNIST, precision_ctx) -> dict:
    """Test metrics of the pre-training objective itself."""
    model.eval()
    gen = torch.Generator().manual_seed(12345)
    total, correct, loss_sum, batches = 0, 0, 0.0, 0
    for s in range(0, len(test), 500):
        x = normalize(test.images[s : s + 500])
        with precision_ctx():
            if objective == "sup":
                correct += int((model(x).argmax(1) == test.labels[s : s + 500]).sum())
            else:
                loss_sum += float(model(x, gen))
                batches += 1
        total += x.shape[0]
    model.train()
    if objective == "sup":
        return {"test_accuracy": correct / total}
    return {"test_masked_pixel_loss": loss_sum / batches}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("objective", choices=["sup", "mae"])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--eval-size", type=int, default=4000, help="test canvases for the per-epoch metrics")
    parser.add_argument("--out", type=Path, default=ZOO_DIR)
    parser.add_argument("--max-steps", type=int, default=None, help="stop early (smoke tests); the schedule still spans --epochs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = f"tiny-{args.objective}"
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    encoder = build_zoo_vit(num_classes=10 if args.objective == "sup" else 0)
    model = encoder if args.objective == "sup" else MaskedAutoencoder(encoder)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos" not in n and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos" not in n and "token" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95) if args.objective == "mae" else (0.9, 0.999),
    )
    canvases = CanvasGenerator("train")
    test = ClutteredFashionMNIST("test", args.eval_size, seed=0)
    steps_per_epoch = math.ceil(canvases.num_items / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = int(args.warmup_epochs * steps_per_epoch)

    def precision_ctx():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    history, step, start = [], 0, time.time()
    bar = tqdm(total=args.max_steps or total, desc=name, unit="step")
    for epoch in range(args.epochs):
        running, count = 0.0, 0
        for batch in canvases.epoch(args.batch_size, gen):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, args.lr)
            x = normalize(batch.images)
            with precision_ctx():
                if args.objective == "sup":
                    loss = F.cross_entropy(model(x).float(), batch.labels, label_smoothing=args.label_smoothing)
                else:
                    loss = model(x, gen)
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
    bar.close()
    wall = time.time() - start

    state = {k: v.contiguous() for k, v in encoder.state_dict().items() if not k.startswith("head.")}
    weights = args.out / f"{name}.safetensors"
    atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"name": name, "objective": args.objective}))
    card = {
        "name": name,
        "objective": {
            "sup": "supervised: cross-entropy (label smoothing) of a linear head on the final-norm [CLS] token",
            "mae": "masked autoencoder: 75% of patches hidden, 2-block decoder (D=128), per-patch normalised pixel MSE on hidden patches; no loss touches [CLS]",
        }[args.objective],
        "architecture": dict(ARCHITECTURE, timm_class="VisionTransformer", num_prefix_tokens=1),
        "normalization": NORMALIZATION,
        "data": {
            "dataset": "cluttered Fashion-MNIST (epviz.data.ClutteredFashionMNIST recipe)",
            "recipe": asdict(canvases.recipe),
            "sampling": f"fresh canvases every epoch from all {canvases.num_items} Fashion-MNIST train items",
            "evaluation": f"{args.eval_size} test canvases (Fashion-MNIST test items), seed 0",
        },
        "training": {
            "epochs": args.epochs if not args.max_steps else None,
            "steps": step,
            "batch_size": args.batch_size,
            "optimizer": "AdamW",
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "warmup_epochs": args.warmup_epochs,
            "schedule": "linear warm-up then cosine per step",
            "label_smoothing": args.label_smoothing if args.objective == "sup" else None,
            "precision": args.precision,
            "seed": args.seed,
            "threads": torch.get_num_threads(),
        },
        "wall_time_seconds": round(wall, 1),
        "final_metrics": {k: v for k, v in history[-1].items() if k not in ("epoch", "seconds")},
        "history": history,
        "environment": {
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "sha256": file_sha256(weights),
        "command": "python scripts/train_zoo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    card_path = args.out / f"{name}.json"
    atomic_write_text(card_path, json.dumps(card, indent=2) + "\n")
    print(f"wrote {weights} and {card_path} in {wall / 60:.1f} min")


if __name__ == "__main__":
    main()

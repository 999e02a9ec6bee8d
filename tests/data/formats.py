"""Writers of small datasets in the real on-disk formats (ImageNet, CUB-200-2011, Oxford-IIIT Pets).

Every image is a dark noisy background with one bright rectangle where its box is, so that
tests can check boxes against pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ("n01440764", "n01443537", "n01484850")


def write_image(path: Path, width: int, height: int, box: tuple[int, int, int, int] | None, seed: int = 0) -> Path:
    """An RGB image: noise in 0..40, the box (x0, y0, x1, y1, exclusive) filled with 255."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 40, (height, width, 3), dtype=np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        pixels[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG", quality=95)
    return path


def voc_xml(wnid: str, width: int, height: int, boxes: list[tuple[int, int, int, int]], stem: str) -> str:
    """A PASCAL-VOC annotation as ImageNet ships it (inclusive xmax/ymax)."""
    objects = "".join(
        f"<object><name>{wnid}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1 - 1}</xmax><ymax>{y1 - 1}</ymax></bndbox></object>"
        for x0, y0, x1, y1 in boxes
    )
    return (
        f"<annotation><folder>val</folder><filename>{stem}</filename><source><database>ILSVRC_2012</database></source>"
        f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size><segmented>0</segmented>"
        f"{objects}</annotation>"
    )


def _box(i: int, width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0 = 4 + 3 * (i % 5), 6 + 2 * (i % 4)
    return x0, y0, min(width, x0 + width // 2), min(height, y0 + height // 2)


def write_imagenet(
    root: Path,
    *,
    train_per_class: int = 6,
    val_per_class: int = 2,
    layout: str = "folders",
    boxes: str = "xml",
    size: tuple[int, int] = (80, 60),
) -> dict[str, tuple]:
    """An ImageNet tree: ``train/<wnid>/`` and ``val/`` (class folders or flat), val boxes as XML or CSV.

    Args:
        layout: "folders" (val/<wnid>/...) or "flat" (val/ILSVRC2012_val_XXXXXXXX.JPEG).
        boxes: "xml" (root/Annotations/CLS-LOC/val/<stem>.xml), "beside" (XML next to the image),
            "csv" (root/LOC_val_solution.csv) or "none".

    Returns:
        ``{val stem: (wnid, box exclusive xyxy, (width, height))}``.
    """
    w, h = size
    for c, wnid in enumerate(WNIDS):
        for i in range(train_per_class):
            write_image(root / "train" / wnid / f"{wnid}_{i}.JPEG", w, h, _box(i, w, h), seed=100 * c + i)
    truth, rows, n = {}, ["ImageId,PredictionString"], 0
    for c, wnid in enumerate(WNIDS):
        for i in range(val_per_class):
            n += 1
            stem = f"ILSVRC2012_val_{n:08d}"
            width, height = w + 8 * i, h + 4 * c
            box = _box(n, width, height)
            folder = root / "val" / (wnid if layout == "folders" else "")
            write_image(folder / f"{stem}.JPEG", width, height, box, seed=1000 + n)
            truth[stem] = (wnid, box, (width, height))
            xml = voc_xml(wnid, width, height, [box], stem)
            if boxes == "xml":
                target = root / "Annotations" / "CLS-LOC" / "val" / f"{stem}.xml"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(xml)
            elif boxes == "beside":
                (folder / f"{stem}.xml").write_text(xml)
            rows.append(f"{stem},{wnid} {box[0]} {box[1]} {box[2] - 1} {box[3] - 1} ")
    if boxes == "csv":
        (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return truth


def write_cub(root: Path, classes: int = 3, per_class: int = 4, size: tuple[int, int] = (90, 70)) -> dict[int, tuple]:
    """A CUB_200_2011 folder; half of each class is train. Returns ``{image id: (label, box, is_train)}``."""
    w, h = size
    lines = {k: [] for k in ("images", "labels", "split", "boxes", "classes")}
    truth, image_id = {}, 0
    for c in range(1, classes + 1):
        folder = f"{c:03d}.Bird_{c}"
        lines["classes"].append(f"{c} {folder}")
        for i in range(per_class):
            image_id += 1
            rel = f"{folder}/Bird_{c}_{i:04d}.jpg"
            box = (5 + i, 7, 5 + i + 40, 7 + 30)
            write_image(root / "images" / rel, w, h, box, seed=image_id)
            is_train = i % 2 == 0
            lines["images"].append(f"{image_id} {rel}")
            lines["labels"].append(f"{image_id} {c}")
            lines["split"].append(f"{image_id} {int(is_train)}")
            lines["boxes"].append(f"{image_id} {float(box[0])} {float(box[1])} {float(box[2] - box[0])} {float(box[3] - box[1])}")
            truth[image_id] = (c - 1, box, is_train)
    names = {
        "images": "images.txt",
        "labels": "image_class_labels.txt",
        "split": "train_test_split.txt",
        "boxes": "bounding_boxes.txt",
        "classes": "classes.txt",
    }
    for key, name in names.items():
        (root / name).write_text("\n".join(lines[key]) + "\n")
    return truth


def write_pets(
    root: Path, breeds: tuple[str, ...] = ("Abyssinian", "american_bulldog"), per_breed: int = 4, size: tuple[int, int] = (72, 64)
) -> dict[str, tuple]:
    """An Oxford-IIIT Pets folder. Returns ``{name: (label, pet box incl. border, is_trainval)}``."""
    w, h = size
    ann = root / "annotations"
    (ann / "trimaps").mkdir(parents=True, exist_ok=True)
    header = ["#Image CLASS-ID SPECIES BREED ID", "#ID: 1:37 Class ids", "#SPECIES: 1:Cat 2:Dog", "#BREED ID: 1-25:Cat 1:12:Dog"]
    listing, trainval, test, truth = [], [], [], {}
    for c, breed in enumerate(breeds, start=1):
        for i in range(1, per_breed + 1):
            name = f"{breed}_{i}"
            inner = (10 + i, 12, 40 + i, 44)
            outer = (inner[0] - 2, inner[1] - 2, inner[2] + 2, inner[3] + 2)
            write_image(root / "images" / f"{name}.jpg", w, h, inner, seed=10 * c + i)
            trimap = np.full((h, w), 2, np.uint8)
            trimap[outer[1] : outer[3], outer[0] : outer[2]] = 3
            trimap[inner[1] : inner[3], inner[0] : inner[2]] = 1
            Image.fromarray(trimap).save(ann / "trimaps" / f"{name}.png")
            line = f"{name} {c} {1 if breed[0].isupper() else 2} {c}"
            listing.append(line)
            (trainval if i % 2 else test).append(line)
            truth[name] = (c - 1, outer, bool(i % 2))
    (ann / "list.txt").write_text("\n".join(header + listing) + "\n")
    (ann / "trainval.txt").write_text("\n".join(trainval) + "\n")
    (ann / "test.txt").write_text("\n".join(test) + "\n")
    return truth


def write_grey_png(path: Path, width: int, height: int, bands: tuple[int, ...] = (0,)) -> Path:
    """A complete 8-bit greyscale PNG of horizontal bands of one grey value each (top to bottom).

    The rows of a band are identical, so each band is compressed once and its deflate blocks
    repeated: a 20000 x 20000 file takes a fraction of a second and little memory.
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    deflate, body, adler, block_rows = zlib.compressobj(6, zlib.DEFLATED, -15), [], zlib.adler32(b""), 64
    for k, value in enumerate(bands):
        rows = (k + 1) * height // len(bands) - k * height // len(bands)
        row = b"\x00" + bytes([value]) * width  # filter type 0, then the pixels
        for count, repeat in ((block_rows, rows // block_rows), (rows % block_rows, 1)):
            if count and repeat:
                data = row * count
                body.append(
                    (deflate.compress(data) + deflate.flush(zlib.Z_FULL_FLUSH)) * repeat
                )  # full flush: independent blocks
                for _ in range(repeat):
                    adler = zlib.adler32(data, adler)
    stream = b"\x78\x9c" + b"".join(body) + deflate.flush() + struct.pack(">I", adler & 0xFFFFFFFF)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        fh.write(chunk(b"IDAT", stream) + chunk(b"IEND", b""))
    return path


# --- the reference implementation's probe heads (github.com/billpsomas/efficient-probing) -------------


def reference_head_state(
    kind: str = "ep", *, dim: int = 16, num_classes: int = 5, num_queries: int = 4, d_out: int = 1, seed: int = 0
) -> dict:
    """A head's state dict under the reference's ``nn.Sequential(pooling, BatchNorm1d, Linear)`` keys.

    Random values, with BatchNorm statistics away from (0, 1) so that a wrong mapping shows.

    Args:
        kind: "ep" (``0.cls_token`` (1, M, D), ``0.v.weight`` (D/d_out, D), ``1.*`` BatchNorm, ``2.*``
            classifier) or "lp" (``0.*`` BatchNorm, ``1.*`` classifier).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    width = dim // d_out if kind == "ep" else dim
    bn, fc = ("1", "2") if kind == "ep" else ("0", "1")
    state = {}
    if kind == "ep":
        state["0.cls_token"] = torch.randn(1, num_queries, dim, generator=g)
        state["0.v.weight"] = torch.randn(width, dim, generator=g) / dim**0.5
    state[f"{bn}.running_mean"] = torch.randn(width, generator=g) * 0.3
    state[f"{bn}.running_var"] = torch.rand(width, generator=g) + 0.5
    state[f"{bn}.num_batches_tracked"] = torch.tensor(1234)
    state[f"{fc}.weight"] = torch.randn(num_classes, width, generator=g) / width**0.5
    state[f"{fc}.bias"] = torch.randn(num_classes, generator=g) * 0.1
    return state


def write_reference_checkpoint(
    path: Path,
    state: dict,
    *,
    cls_features: str = "ep",
    epoch: int = 41,
    val_acc1: float = 71.25,
    saved_module: str = "head",
    **args,
) -> Path:
    """A training checkpoint as the reference's ``misc.save_model`` writes it (``checkpoint-best.pth``).

    It holds the head's state dict under ``model``, a LARS-style optimizer state, the grad scaler's
    state, ``epoch``, ``test_stats`` and ``args``: the run's ``argparse.Namespace``, with the
    ``pathlib.Path`` values and absolute paths of a real run. `args` override its entries.
    """
    import argparse

    import torch

    num_queries = state["0.cls_token"].shape[1] if "0.cls_token" in state else 32
    fc = "2" if "0.cls_token" in state else "1"
    namespace = argparse.Namespace(
        batch_size=512,
        epochs=90,
        accum_iter=1,
        model="vit_base_patch16",
        input_size=224,
        weight_decay=0.0,
        optimizer="lars",
        lr=0.2,
        blr=0.1,
        min_lr=0.0,
        warmup_epochs=10,
        cls_features=cls_features,
        ep_queries=int(num_queries),
        d_out=1,
        num_heads=16,
        dataset_name="imagenet1k",
        data_path=Path("/datasets01/imagenet_full_size/061417"),
        nb_classes=int(state[f"{fc}.weight"].shape[0]),
        output_dir="/scratch/project/outputs/imagenet/vitb/linprobe_run",
        log_dir="/scratch/project/outputs/imagenet/vitb/linprobe_run",
        device="cuda",
        seed=0,
        finetune="/scratch/project/checkpoints/mae_pretrain_vit_base.pth",
        timm=False,
        openclip=False,
        amp="float16",
        distributed=True,
        rank=0,
        gpu=0,
        dist_backend="nccl",
    )
    for key, value in args.items():
        setattr(namespace, key, value)
    params = [k for k in state if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    optimizer = {
        "state": {i: {"mu": torch.zeros_like(state[k])} for i, k in enumerate(params)},
        "param_groups": [
            {"lr": 0.2, "weight_decay": 0.0, "momentum": 0.9, "trust_coefficient": 0.001, "params": list(range(len(params)))}
        ],
    }
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 17}
    stats = {"train_lr": 0.01, "train_loss": 1.5, "test_loss": 1.1, "test_acc1": val_acc1, "test_acc5": 90.5, "epoch": epoch}
    checkpoint = {
        "saved_module": saved_module,
        "model": dict(state) if saved_module == "head" else {f"head.{k}": v for k, v in state.items()},
        "optimizer": optimizer,
        "epoch": epoch,
        "scaler": scaler,
        "args": namespace,
        "test_stats": stats,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


def write_reference_release(folder: Path, state: dict, **meta) -> Path:
    """A released head as the reference's ``tools/export_ep_heads.py`` writes it: ``ep_head.pth`` + ``config.json``.

    The meta has the exporter's keys (``method``, ``arch``, ..., ``d_out`` always 1 as it writes it);
    `meta` overrides them. Returns the ``.pth``.
    """
    import json

    import torch

    doc = {
        "method": "MAE",
        "arch": "ViT-B/16",
        "pretrain": "IN-1K",
        "image_size": 224,
        "model": "vit_base_patch16",
        "loader": "",
        "pretrain_tag": "",
        "finetune": "vit_base_patch16_224.mae",
        "extra_flags": "",
        "cls_features": "ep",
        "ep_queries": int(state["0.cls_token"].shape[1]) if "0.cls_token" in state else 32,
        "d_out": 1,
        "head_epoch": 86,
        "val_acc1_at_head_epoch": 75.41,
        "table_best_acc1": 75.46,
        "note": "best-epoch head: saved at the run's peak, the number the table reports.",
        "training_log": "logs/mae_base/ep.txt",
        **meta,
    }
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": dict(state), "meta": doc}, folder / "ep_head.pth")
    (folder / "config.json").write_text(json.dumps(doc, indent=1))
    return folder / "ep_head.pth"

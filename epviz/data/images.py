"""Reading image files safely, images for display, and a plain ImageFolder dataset (labels, no boxes)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from epviz.errors import DataError

__all__ = ["ImageFileError", "load_image", "to_display", "ImageFolderDataset", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


class ImageFileError(DataError):
    """An image file cannot be used as it is (message names the file and the fix)."""


def load_image(path: str | Path, convert: bool = False) -> torch.Tensor:
    """An RGB image file as a float (3, H, W) tensor in [0, 1].

    Args:
        path: The file.
        convert: Convert grayscale / RGBA / palette images to RGB instead of refusing them.

    Raises:
        ImageFileError: The file is missing, corrupt or truncated, or not RGB (without `convert`).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageFileError(f"image file {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode != "RGB":
                if not convert:
                    kind = {"L": "grayscale", "LA": "grayscale+alpha", "RGBA": "RGBA", "P": "palette", "1": "1-bit", "CMYK": "CMYK"}.get(mode, mode)
                    raise ImageFileError(f"{path} is a {kind} image; the backbone needs RGB. Pass convert=True to convert it")
                img = img.convert("RGB")
            array = np.asarray(img, dtype=np.uint8).copy()
    except ImageFileError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageFileError(f"{path} cannot be decoded ({err}); the file is corrupt or truncated — replace or remove it") from err
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0


def to_display(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """An image (3, H, W), float in [0, 1] or uint8, as uint8 (H, W, 3) for display."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return array.transpose(1, 2, 0) if array.ndim == 3 and array.shape[0] in (1, 3) else array


class ImageFolderDataset(torch.utils.data.Dataset):
    """``root/<class>/<image>`` folders; classes sorted by name, as in torchvision (no boxes).

    Args:
        root: The folder of class folders.
        image_size: Every image is resized (bicubic) to this square size.
        convert: Convert non-RGB images instead of refusing them.
    """

    def __init__(self, root: str | Path, image_size: int = 224, convert: bool = False) -> None:
        self.root, self.image_size, self.convert = Path(root), int(image_size), convert
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"{self.root} has no class folders; expected root/<class>/<image files>")
        self.samples: list[tuple[Path, int]] = []
        for label, cls in enumerate(self.classes):
            files = sorted(p for p in (self.root / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"class folder {self.root / cls} holds no images ({', '.join(IMAGE_SUFFIXES)}); remove it or add images")
            self.samples += [(p, label) for p in files]
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)

    has_boxes = False

    @property
    def num_classes(self) -> int:
        """Number of class folders."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        img = load_image(path, convert=self.convert)
        img = torch.nn.functional.interpolate(img[None], size=(self.image_size, self.image_size), mode="bicubic", antialias=True, align_corners=False)[0]
        return img.clamp(0, 1), label

    def box_list(self, index: int) -> np.ndarray:
        """Always an error: an ImageFolder has labels only.

        Raises:
            ValueError: Always (``has_boxes`` is False).
        """
        raise ValueError(f"the image folder {self.root} has no box annotations, so it cannot be used for localization; "
                         "use a dataset with boxes (ImageNet val with its XML/CSV boxes, CUB, Pets)")

    def display_image(self, index: int) -> np.ndarray:
        """Image `index` as resized for the backbone, uint8 (H, W, 3)."""
        return to_display(self[index][0])

    def fingerprint(self) -> dict:
        """Folder, file list with sizes and mtimes, and the resize (cache key)."""
        digest = hashlib.sha256()
        for path, label in self.samples:
            st = path.stat()
            digest.update(f"{path.relative_to(self.root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return {"dataset": "imagefolder", "root": str(self.root.resolve()), "files": digest.hexdigest()[:20],
                "image_size": self.image_size, "convert": self.convert}

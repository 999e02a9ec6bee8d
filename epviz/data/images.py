"""Reading image files safely, images for display, and a plain ImageFolder dataset (labels, no boxes).

Every loader of epviz reads its images with :func:`load_image` (or :func:`read_image`), which
turns any file into 8-bit RGB by the same rules:

* **Alpha and transparency** (RGBA, LA, a palette or RGB/L image with a transparent colour):
  the image is composited onto :data:`ALPHA_BACKGROUND`, the ImageNet mean colour
  (124, 116, 104). Transparent pixels carry no content, and the colour underneath them is
  arbitrary (often black or leftover paint); the mean colour is what the input normalization
  of ImageNet-normalized backbones maps to zero, so a transparent area becomes the least
  informative input and draws no artificial edge around the object, which black or white
  would (and which attention maps would then show). An opaque alpha channel changes nothing.
* **16-bit samples** (``I;16`` greyscale PNG or TIFF, and 32-bit integer ``I`` images whose
  values lie in 0..65535) are divided by 257 and rounded, so that the full 16-bit range
  0..65535 maps onto 0..255 (65535 -> 255) and relative intensities are kept. Other ``I``
  images and 32-bit float (``F``) images are refused, as no range can be assumed for them.
* **Palette, 1-bit, CMYK, YCbCr** images are converted to RGB; greyscale is repeated over
  the three channels. Without ``convert=True``, every image that is not RGB is refused.

Size limits, so that no file costs gigabytes:

* An image of more than :data:`MAX_PIXELS` pixels (144 megapixels, e.g. 12000 x 12000) is
  refused from its header, before anything is decoded (an :class:`ImageFileError` naming the
  file, its size and the limit; never PIL's ``DecompressionBombError``).
* With ``min_side`` (the shorter side the caller resizes to, e.g. 256 for the evaluation
  transform), an image whose shorter side is at least ``2 * OVERSAMPLE * min_side`` is decoded
  at a reduced scale: by the largest whole factor that keeps its shorter side at least
  ``OVERSAMPLE * min_side`` (JPEG decodes at 1/2, 1/4 or 1/8 scale directly, with ``draft``;
  the rest is box-averaged with ``reduce``). With the default 256-pixel resize this only touches
  images whose shorter side is 2048 pixels or more; every smaller image decodes exactly as
  before. A reduced image is decoded at 4 to 8 times the resolution the resize keeps, so its
  resized result differs from a full decode by far less than one output pixel. A JPEG never
  decodes at full size then; other formats (PNG) decode at full size once, 8 bits per sample,
  before the reduction (a 10000 x 10000 PNG: +140 MB grey, +420 MB RGB at peak, where a full
  decode to floats takes +2.9 GB).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from epviz.errors import DataError

__all__ = [
    "ALPHA_BACKGROUND",
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "OVERSAMPLE",
    "ImageFileError",
    "ImageFolderDataset",
    "load_image",
    "read_image",
    "read_image_size",
    "to_display",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
MAX_PIXELS = 12_000 * 12_000
OVERSAMPLE = 4
ALPHA_BACKGROUND = (124, 116, 104)

_KINDS = {
    "L": "grayscale",
    "LA": "grayscale+alpha",
    "RGBA": "RGBA",
    "P": "palette",
    "PA": "palette+alpha",
    "1": "1-bit",
    "CMYK": "CMYK",
    "I;16": "16-bit grayscale",
    "I;16B": "16-bit grayscale",
    "I;16L": "16-bit grayscale",
    "I;16N": "16-bit grayscale",
    "I": "32-bit integer",
    "F": "32-bit float",
}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageFileError(DataError):
    """An image file cannot be used as it is (message names the file and the fix)."""


def read_image_size(path: str | Path) -> tuple[int, int]:
    """The (width, height) of an image file from its header, without decoding the pixels.

    Raises:
        ImageFileError: The file is missing, is not an image, or exceeds :data:`MAX_PIXELS`.
    """
    path = _existing(path)
    try:
        with _open(path) as img:
            return int(img.size[0]), int(img.size[1])
    except DataError:
        raise
    except _DECODE_ERRORS as err:
        raise _undecodable(path, err) from err


def load_image(path: str | Path, convert: bool = False, *, min_side: int | None = None) -> torch.Tensor:
    """An image file as a float (3, H, W) RGB tensor in [0, 1] (the rules: see the module docstring).

    Args:
        path: The file.
        convert: Convert grayscale / RGBA / palette / 16-bit images to RGB instead of refusing them.
        min_side: The shorter side the caller resizes the image to; a much larger image is then
            decoded at a reduced scale (see the module docstring). None: always full scale.

    Raises:
        ImageFileError: The file is missing, corrupt or truncated, too large (:data:`MAX_PIXELS`),
            or not RGB (without `convert`).
    """
    return read_image(path, convert, min_side=min_side)[0]


def read_image(path: str | Path, convert: bool = False, *, min_side: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Like :func:`load_image`, and the file's own (width, height), which a reduced decode does not show.

    Returns:
        The float (3, H, W) image in [0, 1], and the (width, height) stated by the file.
    """
    path = _existing(path)
    try:
        with _open(path) as img:
            size = (int(img.size[0]), int(img.size[1]))
            if img.mode != "RGB" and not convert:
                kind = _KINDS.get(img.mode, img.mode)
                raise ImageFileError(f"{path} is a {kind} image; the backbone needs RGB. Pass convert=True to convert it")
            factor = _factor(size, min_side)
            if factor > 1 and img.format == "JPEG":
                img.draft(img.mode, (size[0] // factor, size[1] // factor))
            img.load()
            rgb = _to_rgb(img, path, min_side)
            array = np.asarray(rgb, dtype=np.uint8).copy()
    except DataError:
        raise
    except _DECODE_ERRORS as err:
        raise _undecodable(path, err) from err
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0, size


def to_display(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """An image (3, H, W), float in [0, 1] or uint8, as uint8 (H, W, 3) for display."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return array.transpose(1, 2, 0) if array.ndim == 3 and array.shape[0] in (1, 3) else array


# --- decoding ---------------------------------------------------------------------------------


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ImageFileError(f"image file {path} does not exist")
    return path


def _open(path: Path) -> Image.Image:
    """The image opened lazily (header only); more than :data:`MAX_PIXELS` is refused whatever PIL's own limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img: Image.Image = Image.open(path)
        except Image.DecompressionBombError:
            img = _open_unchecked(path)
    width, height = img.size
    if width * height > MAX_PIXELS:
        img.close()
        raise ImageFileError(
            f"{path} is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels), more than the limit of "
            f"{MAX_PIXELS / 1e6:.0f} megapixels (epviz.data.images.MAX_PIXELS) that epviz decodes: decoding it would take "
            "gigabytes of memory; downscale the file or leave it out (load_split(..., on_error='skip'))"
        )
    return img


def _open_unchecked(path: Path) -> Image.Image:
    """Open `path` as :func:`PIL.Image.open` does, without PIL's decompression-bomb check (epviz checks the size)."""
    Image.init()
    with open(path, "rb") as fh:
        prefix = fh.read(16)
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        if accept is not None:
            accepted = accept(prefix)
            if not accepted or isinstance(accepted, str):
                continue
        try:
            return factory(str(path), str(path))  # type: ignore[arg-type]  # an image file opens a path itself
        except (SyntaxError, IndexError, TypeError, OSError, ValueError):
            continue
    raise UnidentifiedImageError(f"no image format recognizes {path}")


def _undecodable(path: Path, err: BaseException) -> ImageFileError:
    if isinstance(err, Image.DecompressionBombError):
        return ImageFileError(
            f"{path} is larger than PIL's own limit (PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}) "
            "lets it decode; raise that limit or downscale the file"
        )
    return ImageFileError(f"{path} cannot be decoded ({err}); the file is corrupt or truncated — replace or remove it")


def _factor(size: tuple[int, int], min_side: int | None) -> int:
    """The whole reduction factor for an image of `size`: its shorter side stays at least ``OVERSAMPLE * min_side``."""
    if not min_side:
        return 1
    return max(1, min(size) // (OVERSAMPLE * int(min_side)))


def _reduce(img: Image.Image, min_side: int | None) -> Image.Image:
    factor = _factor(img.size, min_side)
    return img.reduce(factor) if factor > 1 else img


def _to_rgb(img: Image.Image, path: Path, min_side: int | None) -> Image.Image:
    """A loaded image as 8-bit RGB, by the rules of the module docstring, reduced for `min_side`."""
    if img.mode in _SIXTEEN_BIT or img.mode == "I":
        img = _sixteen_to_grey(img, path)
    elif img.mode == "F":
        raise ImageFileError(
            f"{path} holds 32-bit float samples, for which no intensity range can be assumed; save it as an 8- or 16-bit image"
        )
    transparent = img.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in img.info
    if transparent:
        img = img if img.mode == "RGBA" else img.convert("RGBA")
        if _factor(img.size, min_side) > 1:
            img = _reduce(img.convert("RGBa"), min_side).convert("RGBA")  # average premultiplied colours
        background = Image.new("RGBA", img.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    img = _reduce(img, min_side)
    return img if img.mode == "RGB" else img.convert("RGB")


def _sixteen_to_grey(img: Image.Image, path: Path) -> Image.Image:
    """A 16-bit (or 32-bit integer within 0..65535) greyscale image as 8-bit "L": ``round(value / 257)``."""
    if img.mode == "I":
        low, high = cast("tuple[int, int]", img.getextrema())
        if low < 0 or high > 65535:
            raise ImageFileError(
                f"{path} holds 32-bit integer samples from {low} to {high}, outside the 16-bit range "
                "0..65535 that epviz scales to 8 bits; save it as an 8- or 16-bit image"
            )
    values = np.asarray(img)
    grey = np.empty(values.shape, dtype=np.uint8)
    for start in range(0, len(values), 1024):  # row blocks: no full-size 32-bit temporary
        block = values[start : start + 1024].astype(np.uint32)
        grey[start : start + 1024] = (2 * block + 257) // 514
    return Image.fromarray(grey)


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
                raise ValueError(
                    f"class folder {self.root / cls} holds no images ({', '.join(IMAGE_SUFFIXES)}); remove it or add images"
                )
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
        img = load_image(path, convert=self.convert, min_side=self.image_size)
        img = torch.nn.functional.interpolate(
            img[None], size=(self.image_size, self.image_size), mode="bicubic", antialias=True, align_corners=False
        )[0]
        return img.clamp(0, 1), label

    def box_list(self, index: int) -> np.ndarray:
        """Always an error: an ImageFolder has labels only.

        Raises:
            ValueError: Always (``has_boxes`` is False).
        """
        raise ValueError(
            f"the image folder {self.root} has no box annotations, so it cannot be used for localization; "
            "use a dataset with boxes (ImageNet val with its XML/CSV boxes, CUB, Pets)"
        )

    def display_image(self, index: int) -> np.ndarray:
        """Image `index` as resized for the backbone, uint8 (H, W, 3)."""
        return to_display(self[index][0])

    def fingerprint(self) -> dict:
        """Folder, file list with sizes and mtimes, and the resize (cache key)."""
        digest = hashlib.sha256()
        for path, label in self.samples:
            st = path.stat()
            digest.update(f"{path.relative_to(self.root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return {
            "dataset": "imagefolder",
            "root": str(self.root.resolve()),
            "files": digest.hexdigest()[:20],
            "image_size": self.image_size,
            "convert": self.convert,
        }

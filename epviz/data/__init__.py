"""Datasets: the embedded cluttered Fashion-MNIST, the Fashion-MNIST file loader, and image files on disk
(ImageNet-1k, CUB-200-2011, Oxford-IIIT Pets, ImageFolder) under the reference evaluation transform.

Every dataset kind registers itself in its own module (:func:`register_dataset`); importing
this package registers the built-in ones, and :func:`load_split` opens any of them by spec.
"""

from epviz.data.annotated import AnnotatedImages, AnnotationError
from epviz.data.cluttered import Canvases, CanvasGenerator, CanvasRecipe, ClutteredFashionMNIST
from epviz.data.cub import cub
from epviz.data.fashion_mnist import CLASSES, FashionMNISTNotFound, load_fashion_mnist
from epviz.data.imagefolder import image_folder
from epviz.data.imagenet import imagenet
from epviz.data.images import ImageFileError, ImageFolderDataset, load_image, to_display
from epviz.data.pets import pets
from epviz.data.protocol import Fingerprinted, GroundTruthBoxes, ImageBatches, ImageDataset, missing_members
from epviz.data.registry import (
    DEFAULT_DATASET,
    DatasetKind,
    DatasetSpec,
    dataset_kind,
    dataset_kinds,
    load_split,
    parse_spec,
    register_dataset,
    standard_splits,
    unregister_dataset,
)
from epviz.data.splits import HOLDOUT_SEED, SPLITS, VAL_FRACTION, Subsettable, balanced_subset, held_out, train_val
from epviz.data.transforms import EvalTransform, train_transform
from epviz.data.unreadable import SkippedImage, drop_unreadable

__all__ = [
    "AnnotatedImages",
    "AnnotationError",
    "CLASSES",
    "CanvasGenerator",
    "CanvasRecipe",
    "Canvases",
    "ClutteredFashionMNIST",
    "DEFAULT_DATASET",
    "DatasetKind",
    "DatasetSpec",
    "EvalTransform",
    "FashionMNISTNotFound",
    "Fingerprinted",
    "GroundTruthBoxes",
    "HOLDOUT_SEED",
    "ImageBatches",
    "ImageDataset",
    "ImageFileError",
    "ImageFolderDataset",
    "SPLITS",
    "SkippedImage",
    "Subsettable",
    "VAL_FRACTION",
    "balanced_subset",
    "cub",
    "dataset_kind",
    "dataset_kinds",
    "drop_unreadable",
    "held_out",
    "image_folder",
    "imagenet",
    "load_fashion_mnist",
    "load_image",
    "load_split",
    "missing_members",
    "parse_spec",
    "pets",
    "register_dataset",
    "standard_splits",
    "to_display",
    "train_transform",
    "train_val",
    "unregister_dataset",
]

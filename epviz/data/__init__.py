"""Datasets: the embedded cluttered Fashion-MNIST, the Fashion-MNIST file loader, and image files on disk
(ImageNet-1k, CUB-200-2011, Oxford-IIIT Pets, ImageFolder) under the reference evaluation transform."""

from epviz.data.cluttered import CanvasGenerator, CanvasRecipe, Canvases, ClutteredFashionMNIST
from epviz.data.annotated import AnnotatedImages, AnnotationError
from epviz.data.cub import cub
from epviz.data.fashion_mnist import CLASSES, FashionMNISTNotFound, load_fashion_mnist
from epviz.data.imagenet import imagenet
from epviz.data.pets import pets
from epviz.data.specs import DATASETS, DEFAULT_DATASET, image_folder, load_split, open_split, parse_spec, standard_splits
from epviz.data.transforms import EvalTransform, train_transform

__all__ = [
    "AnnotatedImages", "DATASETS", "DEFAULT_DATASET", "load_split", "standard_splits", "AnnotationError", "CLASSES", "CanvasGenerator", "CanvasRecipe", "Canvases", "ClutteredFashionMNIST",
    "EvalTransform", "FashionMNISTNotFound", "cub", "image_folder", "imagenet", "load_fashion_mnist", "open_split", "parse_spec",
    "pets", "train_transform",
]

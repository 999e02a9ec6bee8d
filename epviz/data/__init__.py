"""Datasets: the embedded cluttered Fashion-MNIST and the Fashion-MNIST file loader."""

from epviz.data.cluttered import CanvasGenerator, CanvasRecipe, Canvases, ClutteredFashionMNIST
from epviz.data.fashion_mnist import CLASSES, FashionMNISTNotFound, load_fashion_mnist

__all__ = ["CLASSES", "CanvasGenerator", "CanvasRecipe", "Canvases", "ClutteredFashionMNIST", "FashionMNISTNotFound", "load_fashion_mnist"]

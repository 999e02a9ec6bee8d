"""The errors epviz raises at its public face, one family per kind of bad input.

Each subclasses the matching builtin, so ``except ValueError`` keeps working, and each message
names the file or argument, the reason and the fix:

* :class:`DataError` (ValueError): an image or token file that cannot be used as it is.
* :class:`AnnotationError` (DataError): an annotation file that is missing, malformed or does not
  fit its image.
* :class:`WeightsError` (ValueError): a weights file that cannot be read safely, or does not fit
  the model.
* :class:`StorageError` (OSError): a disk that cannot hold what is to be written (checked before
  writing, and a full disk while writing).
* :class:`ConfigError` (ValueError): an argument out of range (learning rate, epochs, sizes, labels,
  layers, grids).
"""

from __future__ import annotations

__all__ = ["AnnotationError", "ConfigError", "DataError", "EpvizError", "StorageError", "WeightsError"]


class EpvizError(Exception):
    """Base class of every epviz error (catch this to handle any of them)."""


class DataError(EpvizError, ValueError):
    """An image, dataset or token file that cannot be used as it is."""


class AnnotationError(DataError):
    """An annotation file is missing, malformed, or does not fit its image (the message names the file)."""


class WeightsError(EpvizError, ValueError):
    """A weights file cannot be read safely or does not fit the model (the message says what does not fit)."""


class ConfigError(EpvizError, ValueError):
    """An argument is out of range or inconsistent (the message names the argument and the valid values)."""


class StorageError(EpvizError, OSError):
    """Too little disk for what is to be written; nothing half-written reads as complete."""

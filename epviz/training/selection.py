"""Model selection never looks at test data: a check for the tokens that choose the best epoch.

:func:`epviz.fit` keeps the epoch with the best top-1 on its ``val`` tokens, and
:func:`epviz.training.fit_grid` also picks the learning rate there; a number chosen on the test
set and then reported on it is optimistic. Token sets remember the split of their images
(``TokenOrigin.split``, filled by :func:`epviz.extract_tokens`), and both warn when ``val``
comes from a test split.
"""

from __future__ import annotations

import warnings

from epviz.tokens import TokenSet

__all__ = ["TEST_SPLITS", "check_selection_split"]

TEST_SPLITS = ("test",)


def check_selection_split(val: TokenSet | None, caller: str = "fit", stacklevel: int = 3) -> None:
    """Warn when the tokens used for selection come from a test split.

    Args:
        val: The validation tokens (None: nothing is selected, nothing to check).
        caller: Name of the function selecting on them, for the message.
        stacklevel: Passed to :func:`warnings.warn` (3: the caller's caller).
    """
    split = None if val is None else val.origin.split
    if split in TEST_SPLITS:
        assert val is not None  # split is None when val is
        dataset = val.origin.dataset
        name = dataset.get("dataset") if isinstance(dataset, dict) else dataset
        warnings.warn(
            f"{caller} selects on its val tokens, but they come from a test split ({name or 'unknown dataset'}, "
            f"split {split!r}): the best epoch would be chosen on the test set. Select on held-out training data "
            'instead: for the canvases ClutteredFashionMNIST("train", size, seed=1) (other canvases of the train '
            'items), for any dataset epviz.data.load_split(spec, "val")',
            UserWarning,
            stacklevel=stacklevel,
        )

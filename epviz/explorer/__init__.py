"""The interactive Explorer: pick a backbone, a block, a probe, an attention view and an image.

Two layers:

* :class:`ExplorerModel` holds the data and every cache, and turns a :class:`Selection`
  (the user's choices) into an :class:`ExplorerState` (everything on screen: the image, its GT
  boxes, the overlay, the labels, the predictor table, an error text). It needs no browser.
* :class:`Explorer` is the ipywidgets view of it: one widget per field of the selection, a
  progress bar, the rendered figure (matplotlib, as PNG), the predictor table and an error line.

Computed once per Explorer and kept in memory: loaded backbones, the token caches of every
block per backbone and split (on disk, :func:`epviz.tokens.extract_sets`), trained probes
keyed by (backbone, block, probe options) (also in the on-disk probe cache of
:func:`epviz.training.train_probe`), test-set predictions, per-predictor tables
(:func:`epviz.analysis.predictor_table`: Δacc under uniform attention and its three controls, entropy, localization), query groups and the
per-image effect of making predictors uniform. Changing the query, the image, the ordering or
the opacity only reads these caches.

Views:

* ``"image only"``: the image, its GT boxes and the prediction (any probe).
* ``"one query"``: the map of predictor ``query`` (inferno colours).
* ``"all queries"``: every predictor at once, each pixel coloured by the predictor whose map is
  strongest there, its opacity given by that map.
* ``"query groups"``: the same with groups of predictors (:func:`epviz.analysis.query_groups`),
  ``groups`` of them; the group of ``query`` is the one highlighted.

Image orderings (after the optional class filter on the true label):

* ``"index"``: dataset order.
* ``"most confident mistakes"``: misclassified images, most confident prediction first.
* ``"largest Δacc"``: images whose prediction suffers most when the highlighted predictors
  (the query, its group, or all of them) are made uniform: first those that turn from correct
  to wrong, then by the drop of the true class's probability.
"""

from epviz.explorer.model import ALL_CLASSES, ORDERS, QUERY_CHOICES, VIEWS, ExplorerModel, ExplorerState, Selection, table_columns
from epviz.explorer.render import render_state, save_state, state_png, table_html
from epviz.explorer.widgets import Explorer

__all__ = [
    "VIEWS",
    "ORDERS",
    "ALL_CLASSES",
    "QUERY_CHOICES",
    "table_columns",
    "Selection",
    "ExplorerState",
    "ExplorerModel",
    "Explorer",
    "render_state",
    "state_png",
    "save_state",
    "table_html",
]

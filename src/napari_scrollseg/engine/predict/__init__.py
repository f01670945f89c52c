"""Prediction: a warm session, regions for live inference, whole volumes chunk by chunk.

- :class:`Predictor` (``session.py``): a loaded model, its device lock, tile cache and
  forward-pass count;
- :func:`iter_predict_region` / :func:`predict_region` (``region.py``): a box with the
  whole-volume answer, batch by batch;
- :func:`run_tiles`, :func:`finalize` (``tiles.py``): tiles through the network, logits
  to probabilities;
- :class:`TileCache` (``cache.py``);
- :func:`iter_predict_volume` / :func:`predict_volume` (``volume.py``, the orchestrator):
  the pure planner (``plan.py``), the output store (``store.py``), the tasks
  (``tasks.py``), the schedulers (``schedule.py``) and the mask (``mask.py``).
"""

from napari_scrollseg.engine.predict.cache import TileCache
from napari_scrollseg.engine.predict.region import (
    RegionProgress,
    iter_predict_region,
    predict_region,
)
from napari_scrollseg.engine.predict.session import ModelRef, Predictor
from napari_scrollseg.engine.predict.tiles import finalize, grid_patch, iter_tiles, run_tiles
from napari_scrollseg.engine.predict.volume import (
    PredictProgress,
    iter_predict_volume,
    predict_volume,
    prepare_output,
)

__all__ = [
    "ModelRef",
    "PredictProgress",
    "Predictor",
    "RegionProgress",
    "TileCache",
    "finalize",
    "grid_patch",
    "iter_predict_region",
    "iter_predict_volume",
    "iter_tiles",
    "predict_region",
    "predict_volume",
    "prepare_output",
    "run_tiles",
]

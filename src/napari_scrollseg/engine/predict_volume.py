"""Whole-volume prediction (moved to :mod:`napari_scrollseg.engine.predict`; this path stays
for scripts written against it)."""

from napari_scrollseg.engine.config import PredictConfig, parse_folds, parse_roi
from napari_scrollseg.engine.predict.schedule import CLUSTERS, open_client
from napari_scrollseg.engine.predict.store import LABELS_NAME, STATE_DIR
from napari_scrollseg.engine.predict.volume import (
    PredictProgress,
    iter_predict_volume,
    predict_volume,
)

__all__ = [
    "CLUSTERS",
    "LABELS_NAME",
    "STATE_DIR",
    "PredictConfig",
    "PredictProgress",
    "iter_predict_volume",
    "open_client",
    "parse_folds",
    "parse_roi",
    "predict_volume",
]

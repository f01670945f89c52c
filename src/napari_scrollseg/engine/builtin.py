"""Built-in models shipped with the package (no download needed).

Each is a complete nnU-Net v2 trained-model folder under
``napari_scrollseg/data/models/<name>/`` (``dataset.json``, ``plans.json``,
``fold_0/checkpoint_final.pth``), trained by the project's own code
(``scripts/train_builtin_model.py``) and loadable by stock nnU-Net.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from napari_scrollseg.engine.errors import ScrollsegError

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent.parent / "data" / "models"
DEFAULT_MODEL = "phantom-tiny"


def builtin_models() -> dict[str, Path]:
    """Names and folders of the built-in models (folders that hold a trained fold)."""
    if not MODELS_DIR.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(MODELS_DIR.iterdir())
        if (p / "plans.json").is_file() and any(p.glob("fold_*/checkpoint_final.pth"))
    }


def builtin_model(name: str = DEFAULT_MODEL) -> Path:
    """The model folder of the built-in model ``name``.

    Raises
    ------
    ScrollsegError
        If there is no such built-in model.
    """
    models = builtin_models()
    if name not in models:
        known = ", ".join(models) or "none (reinstall napari-scrollseg)"
        raise ScrollsegError(f"no built-in model named {name!r}; built-in models: {known}")
    return models[name]


def resolve_model(path: str | os.PathLike) -> Path:
    """``path`` as a model path; a built-in model's name where no such path exists."""
    p = Path(path).expanduser()
    if not p.exists() and str(path) in builtin_models():
        return builtin_models()[str(path)]
    return p

"""Model and device choices shared by the live and full-run widgets (no torch import)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from napari_scrollseg.widgets._common import session

_RECENT: list[str] = []  # model paths chosen in this process, newest first
_MAX_RECENT = 5


def device_choices() -> list[str]:
    """``auto``, each CUDA GPU, MPS, CPU: probed only once torch is imported (no import)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return ["auto", "cpu", "cuda", "mps"]
    found = ["auto"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return [*found, "cpu"]


def model_choices(_widget: object = None) -> list[tuple[str, str]]:
    """(label, path) of the built-in models, recent ones and those trained this session."""
    from napari_scrollseg.engine.builtin import builtin_models

    out: list[tuple[str, str]] = []
    for name, path in builtin_models().items():
        out.append((f"built-in: {name}", str(path)))
    for path in [*_RECENT, *(str(p) for p in reversed(session().trained_models))]:
        if all(path != p for _, p in out):
            out.append((f"{Path(path).name} ({Path(path).parent})", path))
    return out


def remember_model(path: str | os.PathLike) -> str:
    """Put a model folder or zip first in the recent list; return its absolute path."""
    text = str(Path(path).expanduser().absolute())
    if text in _RECENT:
        _RECENT.remove(text)
    _RECENT.insert(0, text)
    del _RECENT[_MAX_RECENT:]
    return text

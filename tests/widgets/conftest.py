"""Widget tests: each test starts with a fresh shared :class:`Session` (last dataset,
trained models) and no remembered models, whatever ran before it in this process."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def fresh_session(monkeypatch: pytest.MonkeyPatch) -> None:
    from napari_scrollseg.widgets import _common, _models

    monkeypatch.setattr(_common, "_SESSION", None)
    monkeypatch.setattr(_models, "_RECENT", [])

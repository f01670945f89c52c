"""Drive an engine generator of progress events to its end (scripts and the command line).

Long engine calls are generators of events that return their result
(``iter_predict_volume``, ``iter_export_dataset``, ``train``); :func:`drive` runs one to
the end, handing each event to a callback and, optionally, to a terminal progress bar.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

__all__ = ["drive"]

E = TypeVar("E")
R = TypeVar("R")


def drive(
    events: Generator[E, Any, R],
    progress: Callable[[E], None] | None = None,
    *,
    bar: Callable[[E], dict | None] | None = None,
) -> R:
    """Run ``events`` to the end and return its value; close it on any error.

    ``progress(event)`` is called for every event. ``bar(event)`` gives the state of a
    tqdm bar for the event (``total``, ``n``, ``postfix``, and ``unit``/``desc`` when it
    opens), or None to leave it as it is; a bar opens at the first state, so errors
    raised before that come without one; ``{"close": True}`` closes it (the next state
    opens a new one).
    """
    pbar = None
    try:
        while True:
            try:
                ev = next(events)
            except StopIteration as stop:
                return stop.value
            if progress is not None:
                progress(ev)
            state = bar(ev) if bar is not None else None
            if state is not None:
                pbar = _update(pbar, state)
    finally:
        events.close()
        if pbar is not None:
            pbar.close()


def _update(pbar: Any, state: dict) -> Any:
    from tqdm.auto import tqdm

    if state.get("close"):
        if pbar is not None:
            pbar.close()
        return None
    if pbar is None:
        pbar = tqdm(
            unit=state.get("unit", "it"),
            desc=state.get("desc"),
            total=state.get("total"),
            initial=state.get("n", 0),
            dynamic_ncols=True,
        )
    pbar.total = state.get("total", pbar.total)
    pbar.n = state.get("n", pbar.n)
    if state.get("postfix"):
        pbar.set_postfix(**state["postfix"], refresh=False)
    pbar.refresh()
    return pbar

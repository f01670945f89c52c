"""The one exception type the engine raises for bad input."""

from __future__ import annotations


class ScrollsegError(Exception):
    """A problem with the user's input or environment, with a message that says what to do.

    The command line prints it as one ``error: ...`` line; the widgets show it as a
    napari notification. Programming errors are not wrapped in it.
    """

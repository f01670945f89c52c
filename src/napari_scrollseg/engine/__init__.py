"""Headless engine: everything the plugin does, usable from scripts with no display.

This package never imports Qt, napari or torch at import time.
"""

from napari_scrollseg.engine.errors import ScrollsegError

__all__ = ["ScrollsegError"]

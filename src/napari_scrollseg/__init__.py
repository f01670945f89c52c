"""napari-scrollseg: segment huge 3D X-ray CT scans in napari with nnU-Net v2.

The package import is deliberately light: the engine (``napari_scrollseg.engine``)
and the widgets are imported only where they are used.
"""

__version__ = "0.1.0"

"""Thin Qt/magicgui widgets over the engine; one module per widget."""

"""nnU-Net trainer classes used by :mod:`napari_scrollseg.engine.train`.

This folder can also be named in nnU-Net's ``nnUNet_extTrainer`` environment
variable, so that stock ``nnUNetv2_train ... -tr nnUNetTrainerSparse`` finds the
sparse-aware trainer. Models it writes record the stock ``nnUNetTrainer`` name,
so they load in plain nnU-Net without this package.
"""

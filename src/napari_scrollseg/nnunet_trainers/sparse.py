"""A sparse-aware nnU-Net trainer: annotated voxels anywhere in the patch.

Only the sampling changes (and, through attributes the engine sets, the number of
epochs and iterations); network, loss and data augmentation are nnU-Net's
defaults. Because the network is the stock one, checkpoints record the stock
``nnUNetTrainer`` name and the results folder is the stock
``nnUNetTrainer__<plans>__<configuration>``: the model then loads in plain nnU-Net
(``nnUNetv2_predict``, ``nnUNetPredictor``) where this package is not installed.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import shutil
from contextlib import suppress
from os.path import basename, join
from typing import TYPE_CHECKING

import numpy as np
import torch
from nnunetv2.paths import nnUNet_results
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from napari_scrollseg.nnunet_trainers.sampling import (
    BACKGROUND,
    background_locations,
    random_patch_keys,
    sparse_bbox,
)

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)
#: nnU-Net's validation summary with the background class too (stock ``summary.json`` has not)
ALL_CLASSES_SUMMARY = "summary_all_classes.json"


class TrainingCancelled(Exception):
    """Raised inside the training loop when a stop was requested."""


class _WithBackgroundLocations:
    """A preprocessed nnU-Net dataset whose cases also locate their annotated background.

    nnU-Net's preprocessing samples locations per foreground class, and with an ignore
    label for "any annotated voxel" (key ``(-1, *all_labels)``), but never for the
    background class alone. ``load_case`` adds key :data:`BACKGROUND`: the rows of the
    annotated key whose label is background (0, or -1 outside the nonzero crop, which
    training turns into 0). They are a uniform sample of the annotated background
    voxels, as the foreground keys are of theirs; computed once per case and cached.
    """

    def __init__(self, dataset, annotated_key: tuple):
        self._dataset = dataset
        self._annotated_key = annotated_key
        self._cache: dict[str, np.ndarray] = {}

    def __getattr__(self, name: str):
        if name.startswith("_"):  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._dataset, name)

    def load_case(self, identifier: str):
        data, seg, seg_prev, properties = self._dataset.load_case(identifier)
        locations = properties["class_locations"]
        if identifier not in self._cache:
            self._cache[identifier] = background_locations(
                locations.get(self._annotated_key, []), seg
            )
        locations[BACKGROUND] = self._cache[identifier]
        return data, seg, seg_prev, properties


class SparseDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader with class-balanced anchors placed anywhere in the patch."""

    def __init__(self, data, *args, sampling: str = "balanced", **kwargs):
        super().__init__(data, *args, **kwargs)
        self.sampling = sampling  # sampling.SAMPLINGS
        if self.has_ignore:
            self._data = _WithBackgroundLocations(data, self.annotated_classes_key)

    def _pick_voxels(self, force_fg: bool, class_locations: dict | None, overwrite_class=None):
        """Candidate voxels for the patch's anchor (None: a random patch).

        Forced-foreground patches: a random foreground class, as nnU-Net. Other patches:
        class-balanced. Each annotated class present in the case, the background one
        included (key :data:`BACKGROUND`, sparse labels only), and "anywhere" (any
        annotated voxel with sparse labels, a random patch with dense ones), is equally
        likely. Stock nnU-Net takes any annotated voxel (sparse) or a random patch
        (dense), so a rare class is seldom under a patch, and with sparse labels it is
        rarer still: it exists only on the painted slices. Dense labels need no
        background key: random patches are mostly background already.
        """
        if class_locations is None:
            return None
        keys: list = [k for k, v in class_locations.items() if len(v) > 0]
        if not force_fg:
            if not self.has_ignore:
                keys.append(None)
            keys = random_patch_keys(keys, self.sampling, self.annotated_classes_key)
            key = keys[np.random.choice(len(keys))] if keys else None
            return None if key is None else class_locations[key]
        keys = [k for k in keys if not (isinstance(k, int) and k == BACKGROUND)]
        if len(keys) > 1 and self.annotated_classes_key in keys:
            keys.remove(self.annotated_classes_key)
        if not keys:
            return None
        key = overwrite_class if overwrite_class in keys else keys[np.random.choice(len(keys))]
        return class_locations[key]

    def get_bbox(
        self,
        data_shape: np.ndarray,
        force_fg: bool,
        class_locations: dict | None,
        overwrite_class: int | tuple[int, ...] | None = None,
        verbose: bool = False,
    ) -> tuple[list[int], list[int]]:
        """Patch box around an annotated (or foreground) voxel, off-centre; random otherwise."""
        dim = len(data_shape)
        need_to_pad = self.need_to_pad.copy()
        for d in range(dim):
            need_to_pad[d] = max(need_to_pad[d], self.patch_size[d] - data_shape[d])
        lbs = [-need_to_pad[d] // 2 for d in range(dim)]
        ubs = [
            data_shape[d] + need_to_pad[d] // 2 + need_to_pad[d] % 2 - self.patch_size[d]
            for d in range(dim)
        ]
        voxels = self._pick_voxels(force_fg, class_locations, overwrite_class)
        if voxels is None or len(voxels) == 0:
            lower = [np.random.randint(lbs[d], ubs[d] + 1) for d in range(dim)]
            return lower, [lower[d] + self.patch_size[d] for d in range(dim)]
        voxel = voxels[np.random.choice(len(voxels))][1:]  # first entry is the channel
        return sparse_bbox(voxel, data_shape, self.patch_size, self.final_patch_size, lbs)


class nnUNetTrainerSparse(nnUNetTrainer):
    """nnU-Net's default trainer with :class:`SparseDataLoader` sampling.

    Attributes set by the engine before ``initialize``: ``num_epochs``,
    ``num_iterations_per_epoch``, ``num_val_iterations_per_epoch``;
    ``should_stop`` (a callable checked before every training step),
    ``epoch_callback`` (called with a dict after every epoch) and ``sampling`` (random
    patches' anchors, :data:`~napari_scrollseg.nnunet_trainers.sampling.SAMPLINGS`).
    """

    record_as = "nnUNetTrainer"

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnU-Net's signature)
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.should_stop: Callable[[], bool] | None = None
        self.epoch_callback: Callable[[dict], None] | None = None
        self.sampling = "balanced"  # random patches' anchors: sampling.SAMPLINGS
        self._use_stock_folder()

    def _use_stock_folder(self) -> None:
        """Write into ``nnUNetTrainer__<plans>__<config>``, not a folder named after this class."""
        if self.output_folder_base is None:
            return
        old_base, old_folder = self.output_folder_base, self.output_folder
        self.output_folder_base = join(
            str(nnUNet_results),
            self.plans_manager.dataset_name,
            f"{self.record_as}__{self.plans_manager.plans_name}__{self.configuration_name}",
        )
        self.output_folder = join(self.output_folder_base, f"fold_{self.fold}")
        os.makedirs(self.output_folder, exist_ok=True)
        new_log = join(self.output_folder, basename(self.log_file))
        if os.path.isfile(self.log_file):
            shutil.move(self.log_file, new_log)
        self.log_file = new_log
        self.logger.output_folder = self.output_folder
        for folder in (old_folder, old_base):
            with suppress(OSError):  # not empty: someone else's results, leave them
                os.rmdir(folder)

    def get_dataloaders(self):
        """nnU-Net's loaders, with :class:`SparseDataLoader` swapped in."""
        import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as stock

        original = stock.nnUNetDataLoader
        stock.nnUNetDataLoader = functools.partial(SparseDataLoader, sampling=self.sampling)
        try:
            return super().get_dataloaders()
        finally:
            stock.nnUNetDataLoader = original

    def train_step(self, batch: dict) -> dict:
        """One optimisation step; raises :class:`TrainingCancelled` when a stop was requested."""
        if self.should_stop is not None and self.should_stop():
            raise TrainingCancelled(self.current_epoch)
        return super().train_step(batch)

    def on_epoch_end(self) -> None:
        """Stock bookkeeping, then ``progress.csv`` and the epoch callback."""
        super().on_epoch_end()
        epoch = self.current_epoch - 1
        self.write_progress_csv()
        if self.epoch_callback is not None and self.local_rank == 0:
            self.epoch_callback(self.epoch_record(epoch))

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's step, plus the background's TP/FP/FN (stock pseudo Dice leaves it out)."""
        target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
        target = target.clone()  # the stock step overwrites ignore voxels in place
        seen: dict = {}
        hook = self.network.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
        try:
            result = super().validation_step(batch)
        finally:
            hook.remove()
        if self.label_manager.has_regions or "out" not in seen:
            return result
        out = seen["out"][0] if isinstance(seen["out"], (list, tuple)) else seen["out"]
        target = target.to(out.device)
        pred_bg = out.argmax(1, keepdim=True) == 0
        true_bg = target == 0
        if self.label_manager.has_ignore_label:
            valid = target != self.label_manager.ignore_label
            pred_bg &= valid
            true_bg &= valid
        result["bg_hard"] = np.array(
            [
                int((pred_bg & true_bg).sum()),
                int((pred_bg & ~true_bg).sum()),
                int((~pred_bg & true_bg).sum()),
            ]
        )
        return result

    def on_validation_epoch_end(self, val_outputs: list[dict]) -> None:
        """Stock bookkeeping, and the background's pseudo Dice in ``background_dice``."""
        parts = [o.pop("bg_hard") for o in val_outputs if "bg_hard" in o]
        super().on_validation_epoch_end(val_outputs)
        log_ = self.logger.local_logger.my_fantastic_logging
        values = log_.setdefault("background_dice", [])
        values.extend([float("nan")] * (self.current_epoch - len(values)))  # resumed old run
        tp, fp, fn = np.sum(parts, axis=0) if parts else (0, 0, 0)
        dice = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else float("nan")
        self.logger.log("background_dice", float(dice), self.current_epoch)

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's validation, then ``validation/summary_all_classes.json``: background too."""
        super().perform_actual_validation(save_probabilities)
        if self.local_rank != 0 or self.label_manager.has_regions:
            return
        from nnunetv2.configuration import default_num_processes
        from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder

        folder = join(self.output_folder, "validation")
        compute_metrics_on_folder(
            join(self.preprocessed_dataset_folder_base, "gt_segmentations"),
            folder,
            join(folder, ALL_CLASSES_SUMMARY),
            self.plans_manager.image_reader_writer_class(),
            self.dataset_json["file_ending"],
            [0, *self.label_manager.foreground_labels],
            self.label_manager.ignore_label,
            chill=True,
            num_processes=default_num_processes,
        )

    def class_names(self) -> list[str]:
        """Annotation class names, in the order of :meth:`epoch_record`'s pseudo Dice.

        Class 1 (nnU-Net's background) first, then the foreground labels.
        """
        from napari_scrollseg.engine.annotations import ClassTable

        names = ClassTable.from_dataset_json(self.dataset_json).names()
        values = [0, *self.label_manager.foreground_labels]
        return [names[v] if v < len(names) else str(v) for v in values]

    def epoch_record(self, epoch: int) -> dict:
        """Train/val loss, pseudo Dice per class (background included) and time of an epoch."""
        get = self.logger.get_value
        bg = self.logger.local_logger.my_fantastic_logging.get("background_dice", [])
        dice = [bg[epoch] if epoch < len(bg) else float("nan")]
        dice += list(get("dice_per_class_or_region", step=epoch))
        return {
            "fold": self.fold,
            "epoch": epoch,
            "epochs": self.num_epochs,
            "train_loss": float(get("train_losses", step=epoch)),
            "val_loss": float(get("val_losses", step=epoch)),
            "pseudo_dice": {n: float(d) for n, d in zip(self.class_names(), dice, strict=False)},
            "ema_pseudo_dice": float(get("ema_fg_dice", step=epoch)),
            "lr": float(get("lrs", step=epoch)),
            "epoch_time": float(
                get("epoch_end_timestamps", step=epoch) - get("epoch_start_timestamps", step=epoch)
            ),
        }

    def write_progress_csv(self) -> None:
        """``fold_X/progress.csv``: one row per finished epoch (whole history after a resume)."""
        n = len(self.logger.get_value("epoch_end_timestamps", step=None))
        names = self.class_names()
        path = join(self.output_folder, "progress.csv")
        with open(path + ".tmp", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(
                ["fold", "epoch", "train_loss", "val_loss", "ema_pseudo_dice", "lr", "epoch_time"]
                + [f"dice_{n}" for n in names]
            )
            for e in range(n):
                r = self.epoch_record(e)
                w.writerow(
                    [r["fold"], e, r["train_loss"], r["val_loss"], r["ema_pseudo_dice"], r["lr"]]
                    + [r["epoch_time"]]
                    + [r["pseudo_dice"][k] for k in names]
                )
        os.replace(path + ".tmp", path)

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, recording the stock trainer name so plain nnU-Net can load it."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        from torch._dynamo import OptimizedModule

        mod = self.network.module if self.is_ddp else self.network
        if isinstance(mod, OptimizedModule):
            mod = mod._orig_mod
        checkpoint = {
            "network_weights": mod.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict()
            if self.grad_scaler is not None
            else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.record_as,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "scrollseg": {
                "trainer": type(self).__name__,
                "sampling": f"annotated voxel off-centre, background a class; {self.sampling}",
            },
        }
        torch.save(checkpoint, filename + ".tmp")
        os.replace(filename + ".tmp", filename)

    def save_interrupted(self) -> str:
        """Save ``checkpoint_latest.pth`` so that a resume restarts the unfinished epoch."""
        epoch = self.current_epoch
        for values in self.logger.local_logger.my_fantastic_logging.values():
            del values[epoch:]
        self.current_epoch = epoch - 1
        path = join(self.output_folder, "checkpoint_latest.pth")
        try:
            self.save_checkpoint(path)
        finally:
            self.current_epoch = epoch
        return path

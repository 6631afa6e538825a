"""Trainer for MoE detection models: builds MoEDetectionModel, logs the aux loss and expert utilisation."""

from __future__ import annotations

from typing import Any

from ultralytics.cfg import DEFAULT_CFG
from ultralytics.data.utils import check_det_dataset
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import RANK
from ultralytics.utils.torch_utils import unwrap_model

from ...analysis.utilisation import UtilisationTracker
from ...nn.settings import MoESettings, pop_moe_overrides
from ...nn.tasks import MoEModel, build_model
from ...utils import use_allowed_cpus

UTILISATION_CSV = "expert_utilisation.csv"


class MoEDetectionTrainer(DetectionTrainer):
    """DetectionTrainer for MoE models.

    Accepts MoE settings (experts=8, top_k=2, ...) beside the Ultralytics arguments; they apply when the model is
    built from a YAML. The 'moe' loss column comes from MoEDetectionModel.loss; per-epoch expert shares go to
    `expert_utilisation.csv` in the run folder.
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides: dict[str, Any] | None = None, _callbacks=None):
        overrides = dict(overrides or {})
        self.moe_overrides = pop_moe_overrides(overrides)
        MoESettings().replace(**self.moe_overrides)  # fail before any run folder exists
        if isinstance(overrides.get("data"), str) and not overrides.get("resume"):
            check_det_dataset(overrides["data"])  # a missing dataset fails before any run folder exists
        super().__init__(cfg, overrides, _callbacks)
        use_allowed_cpus(self.device)
        self.utilisation = UtilisationTracker()
        self.add_callback("on_train_batch_end", _track_utilisation)
        self.add_callback("on_train_epoch_end", _write_utilisation)

    def get_model(self, cfg=None, weights=None, verbose: bool = True) -> MoEModel:
        """Build the MoE model for this dataset's classes, optionally loading weights."""
        model = build_model(
            cfg, nc=self.data["nc"], ch=self.data["channels"], verbose=verbose and RANK == -1, **self.moe_overrides
        )
        model = self.set_model_names_for_load(model)
        if weights:
            model.load(weights)
        return model


def _track_utilisation(trainer: MoEDetectionTrainer) -> None:
    trainer.utilisation.update(unwrap_model(trainer.model).named_moe_blocks())


def _write_utilisation(trainer: MoEDetectionTrainer) -> None:
    if RANK in {-1, 0}:
        trainer.utilisation.write(trainer.save_dir / UTILISATION_CSV, trainer.epoch + 1)

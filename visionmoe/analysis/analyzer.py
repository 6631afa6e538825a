"""`analyze`: run a model over a dataset's val split and write its routing analysis to a run folder."""

from __future__ import annotations

from typing import Any

from ultralytics.data.utils import check_det_dataset

from ..nn.tasks import MoEModel
from .report import run_info, write_analysis
from .validator import RoutingValidator


def analyze(model: MoEModel, args: dict[str, Any], _callbacks: dict | None = None) -> dict[str, Any]:
    """Validate `model` with Ultralytics `args` (data, split, imgsz, batch, project, name, ...) while recording its
    routing; write analysis.json, analysis.md and the PNGs to the run folder (runs/detect/analyze by default).

    Returns the analysis.json contents, with the run folder under 'save_dir'.
    """
    if not isinstance(model, MoEModel):  # fail before a run folder exists, as a missing dataset does
        raise ValueError(f"{type(model).__name__} has no MoE layers: routing analysis needs a visionmoe model")
    check_det_dataset(args["data"])
    validator = RoutingValidator(args={**args, "mode": "analyze"}, _callbacks=_callbacks)
    metrics = validator(model=model)
    info = {**run_info(validator.args, metrics), "save_dir": str(validator.save_dir)}
    return write_analysis(validator.routing, validator.save_dir, info)

"""How much of Ultralytics' gradient clip the MoE's router losses take, against dense YOLO11n.

    python benchmarks/grad_norms.py model=visionmoe-yolo-n.yaml data=synth-shapes.yaml epochs=4 imgsz=128 \
        batch=16 nbs=16 workers=1 seed=0 val=False project=/tmp/exp/probe name=norms_moe
    python benchmarks/grad_norms.py model=yolo11n.yaml ... name=norms_dense

Ultralytics clips the gradient norm of all parameters at 10 before every optimizer step
(`BaseTrainer.optimizer_step`). The MoE adds its routers' losses (balance, z, domain) to the detection loss, scaled
by the batch size as the criterion is, so under that clip their gradients count in the norm that scales the
detector's step (stop 38 measured this probe's first form); since stop 39 the MoE trainer clips the routers apart
(`MoEDetectionTrainer.optimizer_step`). Prints, per epoch, the mean gradient norm before the clip of all parameters,
of the routers and of everything else, and the mean clip factor of the detector's gradient, min(1, 10 / the rest).
"""

from __future__ import annotations

import sys
from collections import defaultdict

import torch
from block_prototype import pop_arg, trainer_from_argv
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils.torch_utils import unwrap_model

from visionmoe.data import find_data_yaml
from visionmoe.engine.compare import is_moe_model
from visionmoe.models.yolo.train import CLIP_NORM, MoEDetectionTrainer


class NormMeter:
    """Per-step gradient norms, by epoch, read just before the trainer clips and steps."""

    def __init__(self) -> None:
        self.steps: dict[int, list[tuple[float, float, float]]] = defaultdict(list)

    def wrap(self, trainer: DetectionTrainer) -> None:
        """Read the gradients at each optimizer step, then step as the trainer does (on this trainer only)."""
        step = trainer.optimizer_step

        def measured_step() -> None:
            named = [(n, p.grad) for n, p in unwrap_model(trainer.model).named_parameters() if p.grad is not None]
            router = torch.stack([g.norm() for n, g in named if ".router." in n] or [torch.zeros(())]).norm()
            rest = torch.stack([g.norm() for n, g in named if ".router." not in n]).norm()
            total = float(torch.hypot(router, rest))
            self.steps[trainer.epoch].append((total, float(router), float(rest)))
            step()

        trainer.optimizer_step = measured_step

    def report(self) -> None:
        for epoch, rows in sorted(self.steps.items()):
            mean = [sum(r[i] for r in rows) / len(rows) for i in range(3)]
            clip = sum(min(1.0, CLIP_NORM / r[2]) for r in rows) / len(rows)
            clipped = sum(r[2] > CLIP_NORM for r in rows) / len(rows)
            print(
                f"epoch {epoch + 1}: norm {mean[0]:.2f} (routers {mean[1]:.2f}, the rest {mean[2]:.2f}); "
                f"clip factor {clip:.3f}, clipped in {clipped:.0%} of {len(rows)} steps"
            )


if __name__ == "__main__":
    model = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("model=")), "visionmoe-yolo-n.yaml")
    dense = not is_moe_model(model)
    data = pop_arg("data")
    # packaged names (synth-shapes.yaml) resolve for the dense trainer as the MoE trainer resolves them
    defaults = {"data": str(find_data_yaml(data))} if data else {}
    trainer = trainer_from_argv(DetectionTrainer if dense else MoEDetectionTrainer, **defaults)
    meter = NormMeter()
    trainer.add_callback("on_train_start", meter.wrap)
    trainer.train()
    meter.report()

"""How far an optimizer step moves the experts, against the block weights around them, before and after the split.

    python benchmarks/expert_steps.py [split_moment_scale=0.25] data=synth-shapes.yaml epochs=4 imgsz=128 batch=16 \
        nbs=16 workers=1 seed=0 val=False project=/tmp/exp/probe name=steps [any other `visionmoe train` setting]

Trains visionmoe-yolo-n (the default dense warmup splits at half the epochs) and prints, per epoch, the mean
relative step of expert 0's conv weights in every MoE block (|w_after - w_before| / |w_before| over the step,
divided by the learning rate) and the same for every other conv weight of the model. Expert 0 is the tied expert
before the split and one of the E copies after it, so the ratio of the two columns shows how far a routed expert
moves per step against how far it moved tied (the `split_moment_scale` setting scales the experts' Adam second
moments at the split).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from block_prototype import trainer_from_argv
from ultralytics.utils.torch_utils import unwrap_model

from visionmoe.models.yolo.train import MoEDetectionTrainer, split_epoch


class StepMeter:
    """Relative step per learning rate of two groups of conv weights, per optimizer step, by epoch."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.steps: dict[int, list[tuple[float, float]]] = defaultdict(list)

    @staticmethod
    def weights(trainer: MoEDetectionTrainer) -> dict[str, torch.Tensor]:
        named = unwrap_model(trainer.model).named_parameters()
        return {n: p for n, p in named if p.ndim == 4 and (".experts." not in n or ".experts.0." in n)}

    def start(self, trainer: MoEDetectionTrainer) -> None:
        self.before = {n: p.detach().clone() for n, p in self.weights(trainer).items()}

    def end(self, trainer: MoEDetectionTrainer) -> None:
        lr = trainer.optimizer.param_groups[1]["lr"]  # Ultralytics' group 1: weights with decay
        if lr == 0:  # the first warmup steps
            return
        moved = {
            n: ((p.detach() - self.before[n]).square().sum(), self.before[n].square().sum())
            for n, p in self.weights(trainer).items()
        }

        def relative(expert: bool) -> float:
            picked = [v for n, v in moved.items() if (".experts.0." in n) == expert]
            return (sum(d for d, _ in picked) / sum(w for _, w in picked)).sqrt().item() / lr

        self.steps[trainer.epoch].append((relative(True), relative(False)))

    def report(self, split_at: int) -> None:
        """One line per epoch; `split_at`: the first routed epoch (0-based)."""
        for epoch, rows in sorted(self.steps.items()):
            expert = sum(r[0] for r in rows) / len(rows)
            other = sum(r[1] for r in rows) / len(rows)
            phase = "routed" if epoch >= split_at else "tied"
            print(
                f"epoch {epoch + 1} ({phase}): expert 0 {expert:.3f}, other weights {other:.3f}, "
                f"ratio {expert / other:.3f} over {len(rows)} steps"
            )


if __name__ == "__main__":
    trainer = trainer_from_argv()
    meter = StepMeter()
    trainer.add_callback("on_train_batch_start", meter.start)
    trainer.add_callback("on_train_batch_end", meter.end)
    trainer.train()
    meter.report(split_epoch(trainer))

"""Prototype recipe: at the dense-warmup split, scale each expert copy's Adam second moment to the gradients it
will see.

    python benchmarks/split_moments.py moment_scale=0.25 data=synth-shapes.yaml epochs=20 imgsz=128 batch=16 nbs=16 \
        workers=1 seed=0 project=/tmp/exp/train name=moments_q [any other `visionmoe train` setting]

The default split gives every copy the tied expert's optimizer state. That state's second moment (Adam's v) was
built from gradients of every image in a batch; after the split an expert's gradient comes from its own images only,
about a quarter of them at E=4, k=1, so it is smaller, and since v forgets at beta2=0.999 (about 1000 steps, more
than the 600 of a 20-epoch synth-shapes run's routed half) each expert steps at a fraction of the learning rate the
tied expert stepped at for the rest of the run, and the copies move apart more slowly than they could.
`moment_scale` (not `scale`, Ultralytics' augmentation setting) multiplies the copies' v (the experts' parameters
only), so a copy steps as far as the tied expert did when its gradient is `sqrt(moment_scale)` of the tied one's;
`moment_scale=1` is the default split.
"""

from __future__ import annotations

from block_prototype import pop_arg, trainer_from_argv
from ultralytics.utils import LOGGER
from ultralytics.utils.torch_utils import unwrap_model

from visionmoe.models.yolo.train import MoEDetectionTrainer, split_epoch


def scale_expert_moments(trainer: MoEDetectionTrainer, scale: float) -> None:
    """Multiply the second moment of every routed expert weight by `scale`, in the epoch the experts split."""
    if trainer.epoch != split_epoch(trainer):
        return
    state = trainer.optimizer.state
    scaled = 0
    for block in unwrap_model(trainer.model).moe_blocks():
        for p in block.experts.parameters():
            if p in state and "exp_avg_sq" in state[p]:
                state[p]["exp_avg_sq"].mul_(scale)
                scaled += 1
    LOGGER.info(f"split_moments: second moments of {scaled} expert tensors scaled by {scale}")


if __name__ == "__main__":
    scale = float(pop_arg("moment_scale") or 0.25)
    trainer = trainer_from_argv()
    # registered after the trainer's own split callback, so the copies' state exists when it runs
    trainer.add_callback("on_train_epoch_start", lambda t: scale_expert_moments(t, scale))
    trainer.train()

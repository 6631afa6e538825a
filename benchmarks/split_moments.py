"""Prototype recipe: at the dense-warmup split, scale each expert copy's Adam second moment to the gradients it
will see.

    python benchmarks/split_moments.py scale=0.25 data=synth-shapes.yaml epochs=20 imgsz=128 batch=16 nbs=16 \
        workers=1 seed=0 project=/tmp/exp/train name=moments_q [any other `visionmoe train` setting]

The default split gives every copy the tied expert's optimizer state. That state's second moment (Adam's v) was
built from gradients of every image in a batch; after the split an expert's gradient comes from its own images only,
about a quarter of them at E=4, k=1, so it is smaller, and since v forgets at beta2=0.999 (about 1000 steps, more
than the 600 of a 20-epoch synth-shapes run's routed half) each expert steps at a fraction of the learning rate the
tied expert stepped at for the rest of the run, and the copies move apart more slowly than they could. `scale`
multiplies the copies' v (the experts' parameters only), so a copy steps as far as the tied expert did when its
gradient is `sqrt(scale)` of the tied one's; `scale=1` is the default split.
"""

from __future__ import annotations

import sys

from ultralytics.cfg import DEFAULT_CFG
from ultralytics.utils import LOGGER
from ultralytics.utils.torch_utils import unwrap_model

from visionmoe.cli import parse_args
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
    args = [a for a in sys.argv[1:] if not a.startswith("scale=")]
    scale = float(next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("scale=")), 0.25))
    _, overrides, settings = parse_args(["train", *args])
    trainer = MoEDetectionTrainer(DEFAULT_CFG, {"model": "visionmoe-yolo-n.yaml", **overrides, **settings})
    # registered after the trainer's own split callback, so the copies' state exists when it runs
    trainer.add_callback("on_train_epoch_start", lambda t: scale_expert_moments(t, scale))
    trainer.train()

"""Shared entry point of the prototype recipes that change how the MoE blocks route (merged_experts.py,
pixel_routing.py, shared_routing.py): `visionmoe train` with every MoEC3k2 of the model given another class, in that
run only; and the command-line helpers of the scripts that train otherwise (router_gradients.py, expert_steps.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ultralytics.cfg import DEFAULT_CFG

from visionmoe.cli import parse_args
from visionmoe.models.yolo.train import MoEDetectionTrainer
from visionmoe.nn.blocks import MoEC3k2


def train_with_block(block_class: type[MoEC3k2], prepare: Callable[[list[MoEC3k2]], None] | None = None) -> None:
    """Train as `visionmoe train <command-line arguments>` (model visionmoe-yolo-n.yaml unless given), with every
    MoEC3k2 block of the model built as `block_class`, a subclass that keeps its parameters; `prepare`, if given,
    then gets the model's MoE blocks in forward order."""

    class PrototypeTrainer(MoEDetectionTrainer):
        def get_model(self, cfg=None, weights=None, verbose: bool = True):
            model = super().get_model(cfg, weights, verbose)
            for block in model.moe_blocks():
                if type(block) is MoEC3k2:
                    block.__class__ = block_class
            if prepare is not None:
                prepare(model.moe_blocks())
            return model

    # domain_loss=0 unless given: these recipes were measured before domain_loss=auto became the default
    trainer_from_argv(PrototypeTrainer, domain_loss=0).train()


def trainer_from_argv(
    trainer_class: type[MoEDetectionTrainer] = MoEDetectionTrainer, **defaults: Any
) -> MoEDetectionTrainer:
    """A trainer for `visionmoe train <command-line arguments>` (model visionmoe-yolo-n.yaml and `defaults` unless
    given)."""
    _, overrides, settings = parse_args(["train", *sys.argv[1:]])
    return trainer_class(DEFAULT_CFG, {"model": "visionmoe-yolo-n.yaml", **defaults, **overrides, **settings})


def pop_arg(key: str) -> str | None:
    """Remove a script's own `key=value` from the command line, so that the rest parse as `visionmoe train`
    arguments, and return its value (None when not given)."""
    value = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith(f"{key}=")), None)
    sys.argv = [a for a in sys.argv if not a.startswith(f"{key}=")]
    return value

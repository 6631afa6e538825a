"""Shared entry point of the prototype recipes that change how the MoE blocks route (merged_experts.py,
pixel_routing.py, shared_routing.py): `visionmoe train` with every MoEC3k2 of the model given another class, in that
run only."""

from __future__ import annotations

import sys
from collections.abc import Callable

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

    _, overrides, settings = parse_args(["train", *sys.argv[1:]])
    # domain_loss=0 unless given: these recipes were measured before domain_loss=auto became the default
    PrototypeTrainer(DEFAULT_CFG, {"model": "visionmoe-yolo-n.yaml", "domain_loss": 0, **overrides, **settings}).train()

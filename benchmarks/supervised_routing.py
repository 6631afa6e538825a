"""Diagnostic: routers taught the domain groups in training decide alone in validation (DAMEX-style supervision).

    python benchmarks/supervised_routing.py data=synth-shapes.yaml epochs=20 imgsz=128 batch=16 nbs=16 workers=1 \
        seed=0 project=/tmp/exp/train name=supervised [any other `visionmoe train` setting]

Trains as `oracle_routing.py` does (routed epochs send each image to the expert of its domain group) and adds to the
aux loss a cross-entropy that teaches every router to predict that group from its block's features. Validation does
not overrule the routers: each val image goes where its routers send it, from its pixels alone. The oracle is handed
the group at validation too, which on a set whose labels depend on the group (`conflict_set.py`) tells it part of
the answer; this measures what routers that had learned the useful partition would buy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from oracle_routing import ORACLE, OracleTrainer, train

from visionmoe.analysis.validator import RoutingValidator
from visionmoe.nn.tasks import MoEDetectionModel

ROUTER_CE = 0.1  # weight of each router's cross-entropy with the image's domain group


class SupervisedRoutingModel(MoEDetectionModel):
    def aux_loss(self) -> torch.Tensor:
        loss, target = super().aux_loss(), ORACLE["indices"]
        if not self.training or target is None:
            return loss
        for routing in (block.routing for block in self.moe_blocks()):
            if routing is not None and routing.logits.shape[0] == target.shape[0]:
                loss = loss + ROUTER_CE * F.cross_entropy(routing.logits, target[:, 0].to(routing.logits.device))
        return loss


class RouterDecidesValidator(RoutingValidator):
    def preprocess(self, batch: dict[str, Any]) -> dict[str, Any]:
        ORACLE["indices"] = None  # no overruling: the routers route the val images
        return super().preprocess(batch)


class SupervisedTrainer(OracleTrainer):
    validator_class = RouterDecidesValidator

    def get_model(self, cfg=None, weights=None, verbose: bool = True):
        model = super().get_model(cfg, weights, verbose)
        model.__class__ = SupervisedRoutingModel
        return model


if __name__ == "__main__":
    train(SupervisedTrainer)

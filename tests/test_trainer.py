"""Trainer set-up: CPU threads and MoE overrides."""

import os

import torch

from visionmoe import MoEDetectionTrainer


def test_trainer_uses_every_allowed_core_and_builds_overrides(tmp_path, coco8):
    trainer = MoEDetectionTrainer(
        overrides={"model": "visionmoe-yolo-n.yaml", "data": "coco8.yaml", "device": "cpu", "experts": 3,
                   "project": str(tmp_path), "imgsz": 64}
    )  # fmt: skip
    assert torch.get_num_threads() == len(os.sched_getaffinity(0))
    assert all(len(block.experts) == 3 for block in trainer.model.moe_blocks())  # built before DDP could need it

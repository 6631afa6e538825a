"""Sparse upcycling: an MoE model started from a dense YOLO11 checkpoint predicts what the dense model predicts."""

from __future__ import annotations

import pytest
import torch
from ultralytics import YOLO
from ultralytics.nn.tasks import load_checkpoint

from visionmoe import MoEDetectionTrainer, VisionMoE
from visionmoe.nn.routing import route

MOE_LAYERS = (6, 8, 13, 16, 19, 22)  # the MoEC3k2 rows of visionmoe-yolo.yaml


@pytest.fixture(scope="module")
def dense_ckpt(coco8, tmp_root):
    """best.pt of a dense YOLO11n trained for one tiny epoch (BN statistics and weights moved off their init)."""
    project = tmp_root / "runs" / "upcycle"
    YOLO("yolo11n.yaml").train(
        data="coco8.yaml", epochs=1, imgsz=64, batch=4, nbs=4, workers=0, plots=False, project=str(project), name="d"
    )
    return project / "d" / "weights" / "best.pt"


def _rel_diff(moe: torch.nn.Module, dense: torch.nn.Module) -> float:
    """Largest difference, relative to the dense model's largest value, of the predictions and of the outputs of the
    MoE layers (a tiny-trained model's features are small, so an absolute bound would say little)."""
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    outputs = []
    for model in (moe, dense):
        feats = []
        hooks = [model.model[i].register_forward_hook(lambda m, i, o: feats.append(o)) for i in MOE_LAYERS]
        with torch.no_grad():
            outputs.append([model.eval()(x)[0], *feats])
        for h in hooks:
            h.remove()
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*outputs))


def test_upcycled_model_equals_dense_at_init(dense_ckpt):
    dense, _ = load_checkpoint(dense_ckpt)
    model = VisionMoE("visionmoe-yolo-n.yaml", renormalize=False, dense_warmup=0).load(dense_ckpt)
    s = model.upcycled
    assert s.source == str(dense_ckpt) and s.settings == {"renormalize": True}
    assert model.model.moe_settings.renormalize and all(b.router.renormalize for b in model.model.moe_blocks())
    assert {n.split(".experts.")[0] for n in s.experts} == {f"model.{i}" for i in MOE_LAYERS}
    assert {int(n.split(".experts.")[1].split(".")[0]) for n in s.experts} == {0, 1, 2, 3}
    assert s.fresh and all(".router." in n for n in s.fresh)  # routers are the only new tensors
    assert not s.mismatched and not s.unused  # every dense tensor found its place
    assert _rel_diff(model.model, dense) < 1e-4
    for block in model.model.moe_blocks():  # Switch-style gates (top prob < 1) would scale the experts' output
        block.router.renormalize = False
    assert _rel_diff(model.model, dense) > 0.05


def test_pretrained_dense_weights_upcycle_in_the_trainer(dense_ckpt, tmp_path):
    args = dict(model="visionmoe-yolo-n.yaml", data="coco8.yaml", pretrained=str(dense_ckpt), imgsz=64)
    args["project"] = str(tmp_path)
    trainer = MoEDetectionTrainer(overrides=args)
    trainer.setup_model()
    dense, _ = load_checkpoint(dense_ckpt)
    assert _rel_diff(trainer.model, dense) < 1e-4


def test_k1_renormalized_gate_is_one_and_trains_the_router():
    logits = torch.tensor([[0.3, 1.2, -0.5, 0.1]], requires_grad=True)
    r = route(logits, top_k=1, renormalize=True)
    assert r.gates.item() == 1.0 and r.indices.item() == 1
    r.gates.sum().backward()
    assert logits.grad.abs().sum() > 0


def test_refuses_another_scale_and_shared_experts(dense_ckpt):
    with pytest.raises(ValueError, match="another scale"):
        VisionMoE("visionmoe-yolo-s.yaml").load(dense_ckpt)
    with pytest.raises(ValueError, match="shared_expert"):
        VisionMoE("visionmoe-yolo-n.yaml", shared_expert=True).load(dense_ckpt)

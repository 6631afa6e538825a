"""ViT-MoE: token routing (capacity, drops, BPR), token dispatch against a per-token reference, eval capacity
calibration, the ViT family's models, MoEC2PSA, bad settings, and one CLI training run on COCO8 followed by predict,
reload, calibrate and val."""

from __future__ import annotations

import csv
import pickle
from copy import deepcopy

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.engine.results import Results
from ultralytics.nn.tasks import load_checkpoint, torch_safe_load
from ultralytics.utils import ASSETS, YAML

from visionmoe import MoEDetectionTrainer, VisionMoE
from visionmoe.analysis.utilisation import UtilisationTracker
from visionmoe.nn import MoEMlp, MoESettings, load_model_yaml
from visionmoe.nn.capacity import calibrate_capacity, token_routed_layers
from visionmoe.nn.dispatch import buffer_rows, combine_tokens, dispatch_tokens
from visionmoe.nn.routing import (
    CAPACITY_STEP,
    TARGET_DROP,
    TOPK_MAX,
    capacity_drop_rate,
    expert_capacities,
    expert_capacity,
    fit_capacity_factors,
    token_loads,
    token_slots,
)
from visionmoe.nn.tasks import MoEViTDetectionModel, build_model, models_dir
from visionmoe.nn.vit import dense_baseline
from visionmoe.utils.flops import active_gflops

from conftest import run_cli


def make_mlp(experts=4, top_k=1, cf=(100.0, 100.0), bpr=False, shared=False, dim=8, hidden=16) -> MoEMlp:
    torch.manual_seed(0)
    settings = MoESettings(experts=experts, top_k=top_k, capacity_factor=cf, bpr=bpr, shared_expert=shared)
    return MoEMlp(dim, hidden, settings)


def force_experts(block: MoEMlp, preferred: list[float]) -> MoEMlp:
    """Make the router ignore its input and rank experts by `preferred` (one logit per expert)."""
    gate = block.router.gate[0]
    with torch.no_grad():
        gate.weight.zero_()
        gate.bias.copy_(torch.tensor(preferred))
    return block


def per_token_loop(block: MoEMlp, x: torch.Tensor) -> torch.Tensor:
    """out[b, t] = sum over kept choices j of gate * expert_e(x[b, t]), one token and one expert at a time."""
    r, kept, ex = block.routing, block.kept, block.experts
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for j in range(r.indices.shape[-1]):
                if kept[b, t, j]:
                    e = int(r.indices[b, t, j])
                    y = F.gelu(x[b, t] @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]
                    out[b, t] += r.gates[b, t, j] * y
    return out


def test_capacity_arithmetic():
    assert expert_capacity(tokens=16, num_experts=4, top_k=1, capacity_factor=1.0) == 4
    assert expert_capacity(tokens=16, num_experts=8, top_k=2, capacity_factor=1.25) == 5  # ceil(2*16*1.25/8)
    assert expert_capacity(tokens=10, num_experts=3, top_k=1, capacity_factor=1.0) == 4  # ceil(3.33)
    assert expert_capacity(tokens=4, num_experts=2, top_k=2, capacity_factor=2.0) == 4  # never above T
    assert expert_capacities(tokens=16, top_k=1, factors=[2.0, 1.0, 0.5, 0.0]) == [8, 4, 2, 0]
    assert expert_capacities(tokens=16, top_k=1, factors=[1.25] * 4) == [expert_capacity(16, 4, 1, 1.25)] * 4


def test_slots_queue_first_choices_before_second_and_drop_past_capacity():
    indices = torch.tensor([[[0, 1], [0, 1], [1, 0]]])  # [B=1, T=3, k=2], E=2
    slots, kept = token_slots(indices, torch.full((1, 3, 2), 0.5), num_experts=2, capacity=2)
    # first choices: t0->e0 slot 0, t1->e0 slot 1, t2->e1 slot 0; then second: t0->e1 slot 1, t1->e1 2, t2->e0 2
    assert slots.tolist() == [[[0, 1], [1, 2], [0, 2]]]
    assert kept.tolist() == [[[True, True], [True, False], [True, False]]]


def test_bpr_lets_high_gate_tokens_claim_capacity_first():
    indices = torch.zeros(1, 4, 1, dtype=torch.long)  # every token wants expert 0, which has 2 slots
    gates = torch.tensor([0.2, 0.9, 0.5, 0.7]).view(1, 4, 1)
    slots, kept = token_slots(indices, gates, num_experts=2, capacity=2)
    assert slots.flatten().tolist() == [0, 1, 2, 3] and kept.flatten().tolist() == [True, True, False, False]
    slots, kept = token_slots(indices, gates, num_experts=2, capacity=2, bpr=True)
    assert slots.flatten().tolist() == [3, 0, 2, 1] and kept.flatten().tolist() == [False, True, False, True]
    tied = torch.tensor([0.5, 0.9, 0.5, 0.7]).view(1, 4, 1)  # equal gates keep raster order
    assert token_slots(indices, tied, num_experts=2, capacity=2, bpr=True)[0].flatten().tolist() == [2, 0, 3, 1]


@pytest.mark.parametrize("tokens", [40, 1600, TOPK_MAX + 60])  # 1600: a 640 px image at stride 16
def test_bpr_slots_of_an_onnx_export_equal_eager_with_ties(tmp_path, tokens):
    """An export ranks tokens with TopK (pairwise above TensorRT's TopK limit) instead of a stable sort; ONNX Runtime
    must queue equal gates alike."""
    ort = pytest.importorskip("onnxruntime")

    class Slots(nn.Module):
        def forward(self, indices, gates):
            return token_slots(indices, gates, num_experts=3, capacity=tokens // 2, bpr=True)

    torch.manual_seed(0)
    indices = torch.randint(0, 3, (2, tokens, 2))
    gates = torch.randint(0, 4, (2, tokens, 2)).float() / 4  # four gate levels: many ties
    path = tmp_path / "slots.onnx"
    torch.onnx.export(Slots(), (indices, gates), path, input_names=["i", "g"], opset_version=17, dynamo=False)
    assert ("TopK" in {node.op_type for node in onnx.load(path).graph.node}) == (tokens <= TOPK_MAX)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    slots, kept = session.run(None, {"i": indices.numpy(), "g": gates.numpy()})
    expected_slots, expected_kept = token_slots(indices, gates, num_experts=3, capacity=tokens // 2, bpr=True)
    assert (slots == expected_slots.numpy()).all() and (kept == expected_kept.numpy()).all()
    assert 0 < expected_kept.float().mean() < 1  # capacity binds, so the order decides who is kept


@pytest.mark.parametrize("top_k, bpr, shared", [(1, False, False), (2, True, False), (2, False, True)])
def test_sparse_dispatch_equals_per_token_reference_without_drops(top_k, bpr, shared):
    block = make_mlp(top_k=top_k, bpr=bpr, shared=shared).eval()
    x = torch.randn(3, 10, 8)
    y = block(x)
    assert block.dropped == 0.0
    expected = per_token_loop(block, x)
    if shared:
        expected = expected + block.shared(x.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    block.dispatch = "dense"  # the einsum reference that export tests and users can switch to
    torch.testing.assert_close(block(x), y, atol=1e-5, rtol=1e-5)


def test_tokens_over_capacity_skip_the_expert():
    block = force_experts(make_mlp(experts=4, cf=(1.0, 1.0)), [5.0, 0.0, 0.0, 0.0]).eval()  # all want expert 0
    x = torch.randn(2, 8, 8)
    y = block(x)
    capacity = expert_capacity(8, 4, 1, 1.0)  # 2 of 8 tokens per image fit
    assert block.kept[..., 0].sum(1).tolist() == [capacity, capacity]
    assert block.dropped == pytest.approx(1 - capacity / 8)
    assert torch.all(y[~block.kept[..., 0]] == 0)  # dropped: no expert output, the residual carries them
    assert torch.all(y[block.kept[..., 0]].abs().sum(-1) > 0)
    torch.testing.assert_close(y, per_token_loop(block, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_per_expert_capacities_keep_what_fits_and_match_the_per_token_reference(top_k):
    block = force_experts(make_mlp(experts=4, top_k=top_k, cf=(1.0, 2.0), bpr=True), [3.0, 2.0, 1.0, 0.0]).eval()
    block.eval_capacity_factors = [1.5, 0.5, 0.0, 2.0]  # k=1: 6, 2, 0 and 8 of 16 tokens; k=2: 12, 4, 0 and 16
    with torch.no_grad():
        block.router.gate[0].weight.normal_()  # tokens spread over the experts, most to expert 0
        x = torch.randn(3, 16, 8)
        y = block(x)
    loads = token_loads(block.routing.indices, 4)
    indices, kept = block.routing.indices.flatten(1), block.kept.flatten(1).long()
    kept = torch.zeros(3, 4, dtype=torch.long).scatter_add_(1, indices, kept)
    capacities = torch.tensor(expert_capacities(16, top_k, block.eval_capacity_factors))
    assert capacities.tolist() == [6 * top_k, 2 * top_k, 0, 8 * top_k]
    assert torch.equal(kept, loads.clamp(max=capacities))  # every expert keeps min(load, C_e)
    expected_drops = capacity_drop_rate(loads, top_k, block.eval_capacity_factors)
    assert block.dropped > 0 and block.dropped == pytest.approx(expected_drops)
    torch.testing.assert_close(y, per_token_loop(block, x), atol=1e-5, rtol=1e-5)
    block.dispatch = "dense"
    torch.testing.assert_close(block(x), y, atol=1e-5, rtol=1e-5)
    for bad in ([1.0] * 3, [3.0, 3.0, 3.0, 3.0], [-0.5, 1.0, 1.0, 1.0], 0.0):
        with pytest.raises(ValueError, match="eval capacity factors"):
            block.eval_capacity_factors = bad


def test_buffer_rows_place_each_kept_assignment_once_and_send_drops_past_the_buffers():
    indices = torch.tensor([[[0], [2], [2], [0], [2]]])  # one image, 5 tokens, top-1, E=3
    slots, kept = token_slots(indices, torch.ones(1, 5, 1), num_experts=3, capacity=[1, 0, 2])
    rows = buffer_rows(indices, slots, kept, [1, 0, 2])  # expert 0 owns row 0, expert 2 rows 1-2; S = 3
    assert rows.flatten().tolist() == [0, 1, 2, 3, 3]  # tokens 3 and 4 found their experts full
    x = torch.arange(1.0, 6.0).view(1, 5, 1)
    buffers = dispatch_tokens(x, rows, [1, 0, 2])
    assert buffers.flatten().tolist() == [1.0, 2.0, 3.0]
    out = combine_tokens(buffers * 10, rows, torch.ones(1, 5, 1) * kept)
    assert out.flatten().tolist() == [10.0, 20.0, 30.0, 0.0, 0.0]  # dropped tokens read a row with gate 0


def test_drop_rate_from_loads_is_what_the_slots_drop():
    torch.manual_seed(0)
    indices = torch.stack([torch.randperm(4)[:2] for _ in range(3 * 24)]).view(3, 24, 2)  # k=2 distinct experts
    indices[0, :12] = torch.tensor([1, 0])  # one image crowds experts 1 and 0
    for factors in (0.5, 1.0, 1.25, [1.5, 0.75, 1.0, 0.5]):
        per_expert = [factors] * 4 if isinstance(factors, float) else factors
        _, kept = token_slots(indices, torch.rand(3, 24, 2), 4, expert_capacities(24, 2, per_expert), bpr=True)
        rate = capacity_drop_rate(token_loads(indices, 4), top_k=2, capacity_factor=factors)
        assert rate * kept.numel() == pytest.approx((~kept).sum().item()) and (factors == 1.25 or rate > 0)


def _slots(factors: list[float], loads: torch.Tensor, top_k: int = 1) -> int:
    return sum(sum(expert_capacities(int(t), top_k, factors)) for t in loads.sum(-1) // top_k)


def test_fit_capacity_factors_on_constructed_loads():
    balanced = torch.tensor([[20, 20, 20, 20], [20, 20, 20, 20]])  # T=80, E=4, k=1: fair share 20
    assert fit_capacity_factors(balanced, top_k=1, max_factor=2.0) == [1.0] * 4  # 0.95 gives 19 slots: 5% dropped
    assert fit_capacity_factors(balanced, top_k=2, max_factor=2.0) == [1.0] * 4  # the same loads as k=2 of 40 tokens
    assert fit_capacity_factors(balanced * 2, top_k=1, max_factor=2.0) == [1.0] * 4  # T=160
    skewed = torch.tensor([[20, 20, 20, 20], [30, 20, 20, 10]])  # 160 assignments
    assert fit_capacity_factors(skewed, top_k=1, max_factor=2.0, target_drop=0.0) == [1.5, 1.0, 1.0, 1.0]
    # One factor for all needs 1.1 (22 slots each, 8 of 160 dropped, 5%); per expert the 8 drops come off the
    # experts whose steps drop one assignment (expert 0 over image 1's 30, expert 3 over image 0's 20)
    fitted = fit_capacity_factors(skewed, top_k=1, max_factor=2.0, target_drop=0.05)
    assert capacity_drop_rate(skewed, top_k=1, capacity_factor=fitted) == 0.05
    assert sum(fitted) == pytest.approx(4.5 - 8 * CAPACITY_STEP) and fitted[1:3] == [1.0, 1.0]
    capped = fit_capacity_factors(skewed, top_k=1, max_factor=1.0, target_drop=0.0)  # 4.5 steps wanted, 4.0 allowed
    assert sum(capped) == pytest.approx(4.0)  # never more slots than the configured factor gives all experts
    assert capacity_drop_rate(skewed, 1, capped) <= capacity_drop_rate(skewed, 1, 1.0)  # nor more drops than it
    halves = torch.tensor([[40, 0, 40, 0]])  # the configured 1.0 drops half; its slots, placed, drop nothing
    assert fit_capacity_factors(halves, top_k=1, max_factor=1.0) == [2.0, 0.0, 2.0, 0.0]
    assert capacity_drop_rate(halves, 1, 1.0) == 0.5
    mixed = torch.tensor([[20, 20, 20, 20], [24, 12, 12, 12]])  # T=80 and T=60: fair shares 20 and 15
    assert fit_capacity_factors(mixed, top_k=1, max_factor=2.0, target_drop=0.0) == [1.55, 1.0, 1.0, 1.0]  # 24 of 60
    with pytest.raises(ValueError, match="target_drop"):
        fit_capacity_factors(balanced, top_k=1, max_factor=2.0, target_drop=1.0)


@pytest.mark.parametrize("target", [0.0, 0.02, 0.1])
def test_fit_capacity_factors_uses_the_fewest_slots_within_the_target(target):
    """Against every combination of factors on the grid, for three experts of random crowded loads."""
    torch.manual_seed(int(target * 100))
    loads = torch.stack([torch.bincount(torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), 20, True), minlength=3)
                         for _ in range(6)])  # fmt: skip
    fitted = fit_capacity_factors(loads, top_k=1, max_factor=2.0, target_drop=target, step=0.15)
    assert capacity_drop_rate(loads, 1, fitted) <= target
    grid = [round(i * 0.15, 6) for i in range(21)]  # up to 3.0 = E/k: C = T
    fewest = min(
        _slots([a, b, c], loads)
        for a in grid for b in grid for c in grid
        if capacity_drop_rate(loads, 1, [a, b, c]) <= target and a + b + c <= 6.0 + 1e-9
    )  # fmt: skip
    assert _slots(fitted, loads) == fewest < _slots([2.0] * 3, loads)


def test_fit_capacity_factors_keeps_every_image_size_within_the_target():
    """Square images as a static export sees them (T=16), and the same images in the validator's padded batches
    (T=25), whose border crowds one expert."""
    torch.manual_seed(0)
    content = torch.tensor([0.4, 0.3, 0.2, 0.1])
    square = torch.stack([torch.bincount(torch.multinomial(content, 16, True), minlength=4) for _ in range(40)])
    padded = square + torch.tensor([0, 0, 0, 9])  # 9 border tokens per image, all to expert 3
    target = 0.05
    assert capacity_drop_rate(padded, 1, fit_capacity_factors(square, 1, 2.0, target)) > 2 * target  # the bug fixed
    fitted = fit_capacity_factors(torch.cat([square, padded]), top_k=1, max_factor=2.0, target_drop=target)
    assert sum(fitted) < 4 * 2.0  # the configured total does not bind here
    assert all(capacity_drop_rate(part, 1, fitted) <= target for part in (square, padded))
    for e in (e for e, f in enumerate(fitted) if f > 0):  # one step less for any expert misses it for one input
        less = [f - CAPACITY_STEP * (i == e) for i, f in enumerate(fitted)]
        assert max(capacity_drop_rate(part, 1, less) for part in (square, padded)) > target


class MoEStack(nn.Module):
    """Residual token MLPs whose routers score experts by orthonormal projections: balanced on Gaussian tokens."""

    def __init__(self, layers: int = 3, experts: int = 4, dim: int = 8):
        super().__init__()
        torch.manual_seed(0)
        settings = MoESettings(experts=experts, top_k=1, capacity_factor=(1.25, 2.0), bpr=True)
        self.layers = nn.ModuleList(MoEMlp(dim, 2 * dim, settings) for _ in range(layers))
        with torch.no_grad():
            for layer in self.layers:
                gate = layer.router.gate[0]
                gate.weight.copy_(3 * torch.linalg.qr(torch.randn(dim, dim))[0][:experts])
                gate.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def measured_drop_rates(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, float]:
    kept = {name: [] for name, _ in token_routed_layers(model)}
    with torch.no_grad():
        for x in batches:
            model(x)
            for name, layer in token_routed_layers(model):
                kept[name].append(layer.kept)
    return {name: 1 - torch.cat(k).float().mean().item() for name, k in kept.items()}


@pytest.mark.parametrize("target", [TARGET_DROP, 0.1])
def test_calibration_gives_every_layer_the_fewest_slots_within_the_drop_target(target):
    model = MoEStack()
    batches = [torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    calibration = calibrate_capacity(model, batches, target)
    assert model.training  # put back in its mode
    assert calibration.images == 8 and set(calibration.layers) == {"layers.0", "layers.1", "layers.2"}
    model.eval()
    measured = measured_drop_rates(model, batches)
    for name, layer in token_routed_layers(model):
        fit = calibration.layers[name]
        assert fit.factors == layer.eval_capacity_factors and fit.mean_factor < fit.configured == 2.0
        # exact for these images, though each layer's drops change the routing of the layers after it
        assert measured[name] == pytest.approx(fit.drop_rate, abs=1e-9) and fit.drop_rate <= target
    for name, layer in token_routed_layers(model):  # one step less capacity for any expert misses the target
        fitted = calibration.layers[name].factors
        for e in (e for e, f in enumerate(fitted) if f > 0):
            layer.eval_capacity_factors = [f - CAPACITY_STEP * (i == e) for i, f in enumerate(fitted)]
            assert measured_drop_rates(model, batches)[name] > target
        layer.eval_capacity_factors = fitted


def test_eval_capacity_factors_survive_checkpoints(tmp_path):
    model = build_model("visionmoe-vit-t.yaml", nc=2, verbose=False)
    factors = {}
    per_layer = ((1.1, 2.85, 0.0, 0.05) * 2, (0.85,) * 8)  # 1.1 is not exact in fp16
    for (name, layer), layer_factors in zip(token_routed_layers(model), per_layer):
        layer.eval_capacity_factors = factors[name] = layer_factors
    torch.save({"model": deepcopy(model).half()}, tmp_path / "calibrated.pt")  # fp16, as Ultralytics saves
    loaded, _ = load_checkpoint(tmp_path / "calibrated.pt")
    assert {name: layer.eval_capacity_factors for name, layer in token_routed_layers(loaded)} == factors
    fresh = build_model("visionmoe-vit-t.yaml", nc=2, verbose=False)
    fresh.load_state_dict(model.state_dict())
    assert {name: layer.eval_capacity_factors for name, layer in token_routed_layers(fresh)} == factors
    old = deepcopy(token_routed_layers(model)[0][1])
    del old._buffers["eval_capacity_milli"]  # a layer pickled before calibration existed gets the configured factor
    assert pickle.loads(pickle.dumps(old)).eval_capacity_factors == (2.0,) * 8
    old._buffers["eval_capacity_milli"] = torch.tensor(1250)  # one calibrated factor for the layer (before stop 17)
    assert pickle.loads(pickle.dumps(old)).eval_capacity_factors == (1.25,) * 8


def test_training_from_a_calibrated_checkpoint_starts_at_the_configured_eval_capacity(tmp_path, coco8):
    model = build_model("visionmoe-vit-t.yaml", nc=80, verbose=False)
    for _, layer in token_routed_layers(model):
        layer.eval_capacity_factors = [1.1, 0.0] * 4
    torch.save({"model": model}, tmp_path / "calibrated.pt")
    args = {"model": str(tmp_path / "calibrated.pt"), "data": "coco8.yaml", "imgsz": 64, "project": str(tmp_path)}
    trainer = MoEDetectionTrainer(overrides=args)
    trainer.setup_model()
    assert [layer.eval_capacity_factors for _, layer in token_routed_layers(trainer.model)] == [(2.0,) * 8] * 2


def test_export_after_calibration_has_smaller_expert_buffers_and_matches_eager(tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)
    model = VisionMoE("visionmoe-vit-t.yaml", experts=4)
    net = model.model
    # random routers crowd an image's tokens onto a few experts; a loose target shrinks the buffers all the same
    calibration = calibrate_capacity(net, [torch.rand(4, 3, 128, 128)], target_drop=0.1)
    tokens, dim = (128 // 16) ** 2, net.model[0].norm.normalized_shape[0]
    configured = (1, 4 * expert_capacity(tokens, 4, 1, 2.0), dim)
    # each layer's buffers [1, S, dim], S = its experts' slots; unequal factors slice one expert's rows at a time
    buffers = {(1, sum(expert_capacities(tokens, 1, f.factors)), dim) for f in calibration.layers.values()}
    per_expert = {(1, c, dim) for f in calibration.layers.values() for c in expert_capacities(tokens, 1, f.factors)}
    assert configured not in buffers and max(s for _, s, _ in buffers) < configured[1]  # every layer's slots shrank
    assert any(len(set(f.factors)) > 1 for f in calibration.layers.values())  # and differ between experts
    path = model.export(format="onnx", imgsz=128)
    graph = onnx.shape_inference.infer_shapes(onnx.load(path)).graph
    exported = {tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in graph.value_info}
    assert buffers <= exported and per_expert - {(1, 0, dim)} <= exported and configured not in exported
    weights = {init.name for init in graph.initializer}
    expert_matmuls = [n for n in graph.node if n.op_type == "MatMul" and "/experts" in n.name]
    capacities = [expert_capacities(tokens, 1, f.factors) for f in calibration.layers.values()]
    calls = sum(1 if len(set(c)) == 1 else sum(n > 0 for n in c) for c in capacities)  # per expert if unequal
    assert len(expert_matmuls) == 2 * calls and all(n.input[1] in weights for n in expert_matmuls)  # constant weights
    session = ort.InferenceSession(path)
    for img in torch.rand(2, 1, 3, 128, 128):
        (y,) = session.run(None, {session.get_inputs()[0].name: img.numpy()})
        with torch.no_grad():
            expected = net.eval()(img)[0]
        torch.testing.assert_close(torch.from_numpy(y), expected, atol=1e-3, rtol=1e-4)


def test_utilisation_csv_logs_drop_rate_per_expert(tmp_path):
    block = force_experts(make_mlp(experts=4, cf=(1.0, 1.0)), [5.0, 0.0, 0.0, 0.0]).train()
    block(torch.randn(2, 8, 8))
    tracker = UtilisationTracker()
    tracker.update([("blk", block)])
    tracker.write(tmp_path / "util.csv", epoch=1)
    rows = list(csv.DictReader(open(tmp_path / "util.csv")))
    assert [(r["expert"], r["count"], float(r["drop_rate"])) for r in rows] == [
        ("0", "16", 0.75),  # 16 tokens want expert 0, which takes 2 per image
        ("1", "0", 0.0),
        ("2", "0", 0.0),
        ("3", "0", 0.0),
    ]


def test_token_routing_is_batch_invariant_even_with_drops():
    block = make_mlp(experts=4, cf=(0.5, 0.5), bpr=True).eval()
    x = torch.randn(4, 16, 8)
    y = block(x)
    assert 0 < block.dropped < 1
    for i in range(4):
        torch.testing.assert_close(block(x[i : i + 1]), y[i : i + 1], atol=1e-5, rtol=1e-5)

    model = build_model("visionmoe-vit-t.yaml", nc=2, verbose=False).eval()
    imgs = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        batch, single = model(imgs)[0], model(imgs[1:2])[0]
    torch.testing.assert_close(single, batch[1:2], atol=1e-4, rtol=1e-4)


def test_gradients_reach_router_and_chosen_experts_only():
    block = force_experts(make_mlp(experts=4, cf=(2.0, 2.0)), [1.0, 1.0, -50.0, -50.0]).train()
    with torch.no_grad():
        block.router.gate[0].weight.normal_(0, 0.5)  # input-dependent choices between experts 0 and 1
    block(torch.randn(2, 12, 8)).pow(2).sum().backward()
    chosen = set(block.routing.indices[block.kept].tolist())
    assert chosen == {0, 1}
    assert block.router.gate[0].weight.grad.abs().sum() > 0
    for e in range(4):
        grad = sum(p.grad[e].abs().sum() for p in block.experts.parameters())
        assert (grad > 0) if e in chosen else (grad == 0), f"expert {e}"


@pytest.mark.parametrize("scale, moe_blocks", [("t", [3, 5]), ("s", [7, 9, 11])])
def test_every_scale_builds_with_moe_in_every_other_block_of_the_last_half(scale, moe_blocks):
    model = build_model(f"visionmoe-vit-{scale}.yaml", nc=3, verbose=False)
    assert isinstance(model, MoEViTDetectionModel)
    blocks = model.model[0].blocks
    assert [i for i, b in enumerate(blocks) if isinstance(b.mlp, MoEMlp)] == moe_blocks
    assert model.moe_settings.capacity_factor == (1.25, 2.0) and model.moe_settings.bpr
    with torch.no_grad():
        y = model.eval()(torch.zeros(1, 3, 64, 96))
    assert y[0].shape == (1, 4 + 3, 8 * 12 + 4 * 6 + 2 * 3)  # P3/P4/P5 anchors of a 64x96 image
    assert model.active_params() < sum(p.numel() for p in model.parameters())


def test_active_gflops_at_top1_within_10pct_of_dense_mlp_vit():
    moe = build_model("visionmoe-vit-t.yaml", verbose=False, top_k=1)
    dense = dense_baseline(build_model("visionmoe-vit-t.yaml", verbose=False, top_k=1))
    ratio = active_gflops(moe, 640) / active_gflops(dense, 640)
    assert 1.0 <= ratio <= 1.1, f"active GFLOPs {ratio:.3f}x the dense-MLP ViT"


def test_moe_c2psa_in_a_yolo_yaml(tmp_path):
    cfg = YAML.load(models_dir() / "visionmoe-yolo.yaml")
    cfg["backbone"][10][2] = "MoEC2PSA"
    path = tmp_path / "yolo-psa-moe.yaml"
    YAML.save(path, cfg)
    model = build_model(path, verbose=False, bpr=True)
    tokens = [m for m in model.moe_blocks() if isinstance(m, MoEMlp)]
    assert type(model.model[10]).__name__ == "MoEC2PSA" and len(tokens) == 1
    assert model.moe_settings.capacity_factor == (1.25, 2.0)  # token layers get the default capacity
    model.train()(torch.zeros(2, 3, 64, 64))
    assert tokens[0].kept.shape == (2, 2 * 2, 1)  # 2x2 tokens at stride 32
    assert torch.isfinite(model.aux_loss())
    assert model.moe_settings.dense_warmup > 0  # the YAML's per-image blocks keep it; the token layer routes throughout
    assert [b.routes_images for b in model.moe_blocks()].count(False) == 1


@pytest.mark.parametrize(
    "model, overrides, message",
    [
        ("visionmoe-vit-t.yaml", {"capacity_factor": 0.0}, "capacity factors must be > 0"),
        ("visionmoe-vit-t.yaml", {"capacity_factor": [1.25, -1]}, "capacity factors must be > 0"),
        ("visionmoe-vit-t.yaml", {"top_k": 9}, "top_k=9 with experts=8"),
        ("visionmoe-vit-t.yaml", {"bpr": "yes"}, "bpr='yes'"),
        ("visionmoe-yolo-n.yaml", {"bpr": True}, "bpr apply to token-routed MoE layers"),
        ("visionmoe-yolo-n.yaml", {"capacity_factor": 1.25}, "capacity_factor apply to token-routed"),
        ("visionmoe-vit-t.yaml", {"dense_warmup": 0.3, "renormalize": True}, "applies to per-image MoE blocks"),
        ("visionmoe-vit-t.yaml", {"router_input": "mean_std"}, "routes only tokens"),
        ("visionmoe-vit-t.yaml", {"router_context": 2}, "routes only tokens"),
    ],
)
def test_bad_settings_fail_with_one_line(model, overrides, message):
    with pytest.raises(ValueError, match=message) as e:
        VisionMoE(model, **overrides)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"vit": {"mlp_ratio": 4.0, "moe_evry": 2}}, "unknown keys \\['moe_evry'\\] in 'vit'"),
        ({"vit": {"moe_last": 0}}, "moe_last=0"),
        ({"scales": {"t": [6, 190, 3, 64]}}, "dim 190 must be divisible by heads 3"),
        ({"backbone": []}, "unknown keys \\['backbone'\\]"),
    ],
)
def test_invalid_vit_yaml_fails_with_one_line(tmp_path, change, message):
    cfg = {**YAML.load(models_dir() / "visionmoe-vit.yaml"), **change}
    path = tmp_path / "broken-vit.yaml"
    YAML.save(path, cfg)
    with pytest.raises(ValueError, match=message) as e:
        load_model_yaml(path)
    assert "\n" not in str(e.value)


def test_image_size_not_a_multiple_of_32_is_a_clear_error():
    model = build_model("visionmoe-vit-t.yaml", verbose=False).eval()
    with pytest.raises(ValueError, match="image size 48x64 is not a multiple of 32") as e:
        model(torch.zeros(1, 3, 48, 64))
    assert "\n" not in str(e.value)


def test_vit_moe_exports_a_static_sparse_onnx_that_matches_eager(tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)  # a model built from a YAML exports into the working directory
    model = VisionMoE("visionmoe-vit-t.yaml", capacity_factor=[1.0, 0.5])  # tight eval capacity: drops happen
    path = model.export(format="onnx", imgsz=64)  # the exporter checks that the graph is static
    x = torch.rand(2, 3, 64, 64)  # batch 1 at export; run both images one by one
    session = ort.InferenceSession(path)
    net = model.model.eval()
    for img in x.split(1):
        (y,) = session.run(None, {session.get_inputs()[0].name: img.numpy()})
        with torch.no_grad():
            expected = net(img)[0]
        assert any(b.dropped > 0 for b in net.moe_blocks())
        torch.testing.assert_close(torch.from_numpy(y), expected, atol=1e-3, rtol=1e-4)


def test_cli_train_then_predict_reload_and_val(coco8, tmp_root):
    project = tmp_root / "runs" / "vit"
    result = run_cli(
        "train", "model=visionmoe-vit-t.yaml", "data=coco8.yaml", "epochs=1", "imgsz=64", "batch=4", "nbs=4",
        "workers=0", f"project={project}", "name=train", "seed=0", "plots=False",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = project / "train"
    log = result.stdout + result.stderr
    assert "moe" in log
    assert "eval capacity calibrated on 8 images" in log  # COCO8 val, square and as validated, before the final val
    rows = list(csv.DictReader(open(run / "results.csv")))
    assert len(rows) == 1 and float(rows[0]["train/moe"]) > 0
    util = list(csv.DictReader(open(run / "expert_utilisation.csv")))
    assert len(util) == 2 * 8  # 2 MoE MLPs x 8 experts
    assert all(0 <= float(row["drop_rate"]) <= 1 for row in util)
    assert all(float(row["drop_rate"]) == 0 for row in util if int(row["count"]) == 0)  # nothing chosen, none dropped
    weights = run / "weights" / "best.pt"

    ckpt, _ = torch_safe_load(weights, safe_only=True)  # weights_only load: every class is on the allow-list
    assert isinstance(ckpt["model"], MoEViTDetectionModel)

    model = VisionMoE(weights)
    trained = {name: layer.eval_capacity_factors for name, layer in token_routed_layers(model.model)}
    calibration = model.calibrate(data="coco8.yaml", imgsz=64, batch=4, workers=0)  # what training did, again
    assert calibration.images == 8 and {name: fit.factors for name, fit in calibration.layers.items()} == trained
    results = model.predict(ASSETS / "bus.jpg", imgsz=64, conf=0.0, verbose=False)
    assert isinstance(results[0], Results) and results[0].boxes.data.shape[1] == 6
    _, total, active, gflops = model.info(imgsz=64)
    assert active < total and gflops > 0
    metrics = model.val(data="coco8.yaml", imgsz=64, batch=4, workers=0, plots=False, project=str(project))
    assert 0 <= metrics.box.map <= 1

"""Every packaged model builds; MoE settings flow from YAML and overrides; bad configs fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ultralytics.nn.tasks import DetectionModel
from ultralytics.utils import YAML

from visionmoe import VisionMoE
from visionmoe.nn import MoEBlock, MoESettings, load_model_yaml
from visionmoe.nn.router import Router
from visionmoe.nn.tasks import build_model, models_dir
from visionmoe.utils.flops import active_gflops

CONFIGS = sorted(
    f"{path.stem}-{scale}.yaml" for path in models_dir().glob("*.yaml") for scale in YAML.load(path)["scales"]
)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_packaged_config_builds_and_runs(name):
    model = build_model(name, nc=3, verbose=False).eval()
    assert model.moe_blocks(), f"{name} has no MoE block"
    with torch.no_grad():
        y = model(torch.zeros(1, 3, 64, 64))
    assert y[0].shape[:2] == (1, 4 + 3)
    total = sum(p.numel() for p in model.parameters())
    assert model.active_params() < total


BENCHMARK_CONFIGS = sorted((Path(__file__).parents[1] / "benchmarks" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", BENCHMARK_CONFIGS, ids=lambda p: p.stem)
def test_benchmark_configs_build_at_yolo11n_active_flops(path):
    """The diagnostic layouts of benchmarks/results/recipe.md stay rerunnable, at the active cost they claim."""
    model = build_model(path.with_name(f"{path.stem}-n.yaml"), verbose=False)
    assert model.moe_blocks()
    ratio = active_gflops(model, 128) / active_gflops(DetectionModel("yolo11n.yaml", verbose=False), 128)
    assert 0.95 <= ratio <= 1.1, f"{path.name}: active GFLOPs {ratio:.3f}x YOLO11n"


def test_fine_experts_prototype_keeps_its_claims(monkeypatch):
    """benchmarks/fine_experts.py (recipe.md, stop 32): k fine experts cost at most one dense chain, each image takes
    one expert per group, and the split computes what the tied block did."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import fine_experts

    torch.manual_seed(0)
    default = build_model("visionmoe-yolo-n.yaml", verbose=False, domain_loss=0)
    model = build_model("visionmoe-yolo-n.yaml", verbose=False, experts=8, top_k=2, domain_loss=0)
    for block in model.moe_blocks():
        block.__class__ = fine_experts.FineMoEC3k2
    fine_experts.make_fine(model.moe_blocks())
    ratio = active_gflops(model, 128) / active_gflops(default, 128)
    assert 0.97 <= ratio <= 1.0, f"fine experts at {ratio:.3f}x the default MoE's active GFLOPs"
    model.eval()
    x = torch.randn(2, 3, 128, 128)
    for block in model.moe_blocks():
        block.tie()
    with torch.no_grad():
        tied = model(x)[0]
        for block in model.moe_blocks():
            block.router.gate[0].weight.normal_()  # routers that pick other experts than the group heads
            block.split()
        split = model(x)[0]
    torch.testing.assert_close(split, tied)
    indices = torch.cat([block.routing.indices for block in model.moe_blocks()])
    assert ((indices[:, 0] < 4) & (indices[:, 1] >= 4)).all()  # one of experts 0-3 and one of 4-7
    assert (indices % 4 != 0).any()  # the check above ran through copies, not only the tied heads


def test_width_probe_widens_one_part_to_yolo11s(tmp_path, monkeypatch):
    """benchmarks/width_probe.py (recipe.md, stop 33): the widened part's layers have YOLO11s's output channels, every
    other layer YOLO11n's; a pair scaled by factors has the MoE at its dense trunk's widths and active FLOPs."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    import width_probe

    def widths(model: DetectionModel) -> dict[int, int]:
        out = {}
        for i, layer in enumerate(model.model):
            if type(layer).__name__ in width_probe.WIDENED:
                layer.register_forward_hook(lambda module, args, y, i=i: out.__setitem__(i, y.shape[1]))
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, 64, 64))
        return out

    n, s = (widths(DetectionModel(f"yolo11{scale}.yaml", verbose=False)) for scale in "ns")
    paths = width_probe.write(tmp_path)
    assert len(paths) == len(width_probe.PARTS)
    for path in paths:
        part = width_probe.PARTS[path.stem.removeprefix("yolo11n-wide-")]
        wide = widths(DetectionModel(path, verbose=False))
        assert wide == {i: (s if i in part else n)[i] for i in n}, path.name
        assert any(wide[i] != n[i] for i in part if i in n), path.name

    dense_path, moe_path = width_probe.write(tmp_path, {"early": 1.5, "deep": 0.6875, "head": 0.6875}, "realloc")
    dense = DetectionModel(dense_path, verbose=False)
    moe = build_model(moe_path.with_name("visionmoe-yolo-realloc-n.yaml"), verbose=False)
    assert len(moe.moe_blocks()) == 6
    dense_widths = widths(dense)
    assert dense_widths[0] == 24 and dense_widths[5] == 88  # 16 * 1.5 and 128 * 0.6875 channels
    assert active_gflops(moe, 128) == pytest.approx(active_gflops(dense, 128), rel=0.01)  # same trunk, top-1


@pytest.mark.parametrize("scale", ["n", "s", "m", "l", "x"])
def test_yolo_moe_active_flops_match_yolo11_at_top1(scale):
    moe = build_model(f"visionmoe-yolo-{scale}.yaml", verbose=False, top_k=1)
    dense = DetectionModel(f"yolo11{scale}.yaml", verbose=False)
    ratio = active_gflops(moe, 256) / active_gflops(dense, 256)
    assert 0.9 <= ratio <= 1.1, f"scale {scale}: active GFLOPs {ratio:.3f}x YOLO11{scale}"
    assert sum(p.numel() for p in moe.parameters()) > sum(p.numel() for p in dense.parameters())


def test_tied_moe_starts_as_the_dense_yolo_built_from_the_same_seed():
    """So a dense warmup trains what YOLO11 trains, and `compare` pairs the two from one start."""
    torch.manual_seed(0)
    dense = DetectionModel("yolo11n.yaml", nc=3, verbose=False).eval()
    torch.manual_seed(0)
    moe = build_model("visionmoe-yolo-n.yaml", nc=3, verbose=False).eval()
    for block in moe.moe_blocks():
        block.tie()
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[0], dense(x)[0], atol=0, rtol=0)
    experts = moe.moe_blocks()[0].experts
    assert not torch.equal(experts[0].m[0].cv1.conv.weight, experts[1].m[0].cv1.conv.weight)  # the rest start fresh


def test_params_grow_with_experts_but_active_params_do_not():
    small, big = (build_model("visionmoe-yolo-n.yaml", verbose=False, experts=e) for e in (2, 8))
    total = [sum(p.numel() for p in m.parameters()) for m in (small, big)]
    assert total[1] > total[0] * 1.5
    assert abs(big.active_params() - small.active_params()) < 0.01 * small.active_params()  # only router sizes differ


def test_overrides_from_python_reach_every_block(capsys):
    model = VisionMoE("visionmoe-yolo-n.yaml", experts=8, top_k=2, shared_expert=True)
    blocks = [m for m in model.model.modules() if isinstance(m, MoEBlock)]
    assert len(blocks) == 6
    assert all(len(b.experts) == 8 and b.router.top_k == 2 and b.shared is not None for b in blocks)
    assert model.model.yaml["moe"]["experts"] == 8
    layers, total, active, gflops = model.info(imgsz=128)
    assert active < total and gflops > 0


def test_router_context_feeds_every_router_the_earlier_layers_map():
    model = build_model("visionmoe-yolo-n.yaml", router_context=2, verbose=False).eval()
    contexts, layer2 = [], []
    for block in model.moe_blocks():
        block.router.register_forward_pre_hook(lambda m, args: contexts.append(args[1]))
    model.model[2].register_forward_hook(lambda m, args, output: layer2.append(output))
    with torch.no_grad():
        model(torch.rand(2, 3, 64, 64))
    assert len(contexts) == len(model.moe_blocks()) == 6 and all(c is layer2[0] for c in contexts)
    dense = build_model("visionmoe-yolo-n.yaml", verbose=False)
    assert active_gflops(model, 128) < 1.001 * active_gflops(dense, 128)  # a mean and std per context channel


def test_router_context_is_pooled_once_per_forward(monkeypatch):
    """All routers share one pooling of the context map per forward and keep nothing of it afterwards. With
    mask_letterbox, the constructor's forward (for the context's channels) runs before the MoE blocks exist, so this
    also checks that the model's list of MoE blocks is not that of the dense layers."""
    model = build_model("visionmoe-yolo-n.yaml", router_context=2, mask_letterbox=True, verbose=False).eval()
    assert len(model.moe_blocks()) == 6
    pooled_shapes, layer2 = [], []
    mean_std = Router._mean_std
    monkeypatch.setattr(Router, "_mean_std", lambda r, x, std: pooled_shapes.append(x.shape) or mean_std(r, x, std))
    model.model[2].register_forward_hook(lambda m, args, output: layer2.append(output))
    x = torch.rand(2, 3, 64, 64)
    x[..., 48:] = 114 / 255  # a letterbox border: the routers average over the content cells
    with torch.no_grad():
        model(x)
    assert pooled_shapes.count(layer2[0].shape) == 1 and len(pooled_shapes) == 1 + 6  # the context, then each block
    assert all(b.router.shared_context is None and b.router.content is None for b in model.moe_blocks())


def test_shared_router_context_gives_each_router_its_own_logits():
    model = build_model("visionmoe-yolo-n.yaml", router_context=2, verbose=False).eval()
    inputs = []
    for block in model.moe_blocks():
        block.router.register_forward_pre_hook(lambda m, args: inputs.append(args))
    with torch.no_grad():
        model(torch.rand(2, 3, 64, 64))
        for block, (b, context) in zip(model.moe_blocks(), inputs):
            torch.testing.assert_close(block.routing.logits, block.router.logits(b, context))  # pooled by itself


def test_yaml_moe_section_is_read(tmp_path):
    cfg = YAML.load(models_dir() / "visionmoe-yolo.yaml")
    cfg["moe"].update(experts=3, top_k=2, router="mlp")
    path = tmp_path / "custom-moe.yaml"
    YAML.save(path, cfg)
    model = build_model(path, verbose=False)
    assert model.moe_settings == MoESettings.from_dict(cfg["moe"])
    assert (model.moe_settings.experts, model.moe_settings.top_k, model.moe_settings.router) == (3, 2, "mlp")
    assert all(len(b.experts) == 3 for b in model.moe_blocks())


@pytest.mark.parametrize(
    "settings, scale",
    [
        ({"dense_warmup": 0.5}, 0.25),  # k/E: each expert sees about a quarter of the images
        ({"dense_warmup": 0.5, "top_k": 2}, 0.5),
        ({"dense_warmup": 0.5, "split_moment_scale": 0.6}, 0.6),
        ({"dense_warmup": 0.5, "residual_experts": True}, 1.0),  # deltas start with fresh optimizer state
        ({"dense_warmup": 0.0}, 1.0),  # no split
    ],
)
def test_split_moment_scale_auto_is_k_over_e_where_experts_split_by_copying(settings, scale):
    moe = {"renormalize": True, "split_moment_scale": "auto", **settings}
    assert MoESettings.from_dict(moe).moment_scale_at_split() == scale


def test_scale_from_name():
    assert load_model_yaml("visionmoe-yolo-s.yaml")["scale"] == "s"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"top_k": 5}, "top_k=5 with experts=4"),
        ({"experts": 0}, "experts=0"),
        ({"router": "softmax"}, "router='softmax'"),
        ({"expert": 4}, "unknown key 'expert'"),
        ({"balance_loss": -1.0}, "balance_loss=-1.0"),
        ({"router_init": "pca"}, "router_init='pca'"),
        ({"router_init": "kmeans", "dense_warmup": 0.0}, "router_init='kmeans' needs"),
        ({"router_init": "kmeans", "router": "mlp"}, "router_init='kmeans' needs"),
        ({"mask_letterbox": True, "router_input": "max"}, "mask_letterbox=True needs router_input='mean'"),
        ({"router_context": -1}, "router_context=-1, use a layer index"),
        ({"detach_router": "always"}, "detach_router='always', use True, False or 'warmup'"),
        ({"detach_router": 1}, "detach_router=1, use True, False or 'warmup'"),
        ({"residual_experts": "yes"}, "residual_experts='yes', use True or False"),
        ({"residual_experts": True, "dense_warmup": 0.0}, "residual_experts=True needs dense_warmup > 0"),
        ({"split_moment_scale": 0}, "split_moment_scale=0, use a number in \\(0, 1\\]"),
        ({"split_moment_scale": "half"}, "split_moment_scale='half', use a number in \\(0, 1\\] .* or 'auto'"),
        ({"split_moment_scale": 0.25, "dense_warmup": 0.0}, "split_moment_scale=0.25 needs dense_warmup > 0"),
        ({"split_moment_scale": 0.25, "residual_experts": True}, "split_moment_scale=0.25 needs .*residual_experts"),
        ({"router_context": 6}, "router_context=6 must name a layer before the first per-image MoE block \\(layer 6"),
    ],
)
def test_impossible_settings_fail_with_one_line(overrides, message):
    with pytest.raises(ValueError, match=message) as e:
        VisionMoE("visionmoe-yolo-n.yaml", **overrides)
    assert "\n" not in str(e.value)


def _write_yaml(tmp_path: Path, **changes) -> Path:
    cfg = YAML.load(models_dir() / "visionmoe-yolo.yaml")
    cfg.update(changes)
    path = tmp_path / "broken-moe.yaml"
    YAML.save(path, cfg)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"moe": {"expertz": 4}}, "unknown key 'expertz'.*did you mean 'experts'"),
        ({"backbon": []}, "unknown keys \\['backbon'\\]"),
        ({"head": [[-1, 1, "MoEC3k3", [64]]]}, "unknown module 'MoEC3k3'"),
        ({"head": "Detect"}, "'head' must be a non-empty list"),
    ],
)
def test_invalid_model_yaml_fails_with_one_line(tmp_path, change, message):
    with pytest.raises(ValueError, match=message) as e:
        build_model(_write_yaml(tmp_path, **change), verbose=False)
    assert "\n" not in str(e.value)


def test_yaml_without_moe_layers_is_refused(tmp_path):
    cfg = YAML.load(models_dir() / "visionmoe-yolo.yaml")
    for row in cfg["backbone"] + cfg["head"]:
        row[2] = row[2].replace("MoEC3k2", "C3k2")
    path = tmp_path / "dense.yaml"
    YAML.save(path, cfg)
    with pytest.raises(ValueError, match="has no MoE layer"):
        build_model(path, verbose=False)


def test_missing_model_and_bad_scale():
    with pytest.raises(FileNotFoundError, match="model 'nope.yaml' not found.*visionmoe-yolo.yaml"):
        VisionMoE("nope.yaml")
    with pytest.raises(ValueError, match="scale 'q'"):
        VisionMoE("visionmoe-yolo-q.yaml")
    with pytest.raises(FileNotFoundError, match="ultralytics.YOLO"):
        VisionMoE("yolo11n.yaml")


def test_packaged_yamls_are_found_from_the_install():
    assert (models_dir() / "visionmoe-yolo.yaml").is_file()

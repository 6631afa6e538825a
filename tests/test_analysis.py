"""Routing analysis: metrics with known answers, the recorder on constructed routings, and `analyze` end to end."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from ultralytics.utils import YAML
from ultralytics.utils.checks import check_yaml

from visionmoe import VisionMoE
from visionmoe.analysis import RoutingRecorder, entropy, mutual_information, normalized_mutual_information
from visionmoe.analysis.domains import domain_experts, load_domains
from visionmoe.analysis.recorder import token_grid
from visionmoe.analysis.utilisation import dead_experts, dominant_experts
from visionmoe.nn.routing import Routing

from conftest import run_cli

LAYER_KEYS = {
    "routing", "experts", "top_k", "items", "counts", "utilisation", "entropy", "max_entropy", "router_entropy",
    "dead_experts", "dominant_experts", "drop_rate", "routing_matrices", "nmi",
}  # fmt: skip


@pytest.mark.parametrize("e", [2, 4, 8, 13])
def test_entropy_of_uniform_is_log_e_and_of_one_hot_is_zero(e):
    assert entropy(np.ones(e)) == pytest.approx(math.log(e))
    assert entropy(np.eye(e)[0] * 7) == 0.0
    assert entropy(np.zeros(e)) == 0.0


def test_mutual_information_of_a_variable_with_itself_is_its_entropy():
    joint = np.diag([10, 10, 10, 10])
    assert mutual_information(joint) == pytest.approx(math.log(4))
    assert mutual_information(np.ones((3, 4))) == pytest.approx(0.0, abs=1e-12)


def test_nmi_is_one_for_a_perfect_class_to_expert_mapping():
    rng = np.random.default_rng(0)
    permutation = np.eye(6)[rng.permutation(6)] * rng.integers(5, 50, size=(6, 1))  # class c -> expert pi(c)
    assert normalized_mutual_information(permutation) == pytest.approx(1.0)


def test_nmi_is_near_zero_for_independent_routing():
    rng = np.random.default_rng(0)
    classes, experts = rng.integers(0, 10, 200_000), rng.integers(0, 8, 200_000)
    joint = np.zeros((10, 8))
    np.add.at(joint, (classes, experts), 1)
    assert 0.0 <= normalized_mutual_information(joint) < 0.05


def test_nmi_partial_dependence_and_constant_variable():
    half = np.array([[50, 0], [25, 25]])  # knowing the row tells something, not everything
    assert 0.05 < normalized_mutual_information(half) < 0.95
    assert normalized_mutual_information(np.array([[5, 7, 9]])) == 0.0  # one class: nothing to share


def test_dead_and_dominant_experts():
    assert dead_experts([0.7, 0.25, 0.05, 0.0]) == [2, 3]  # under a quarter of the fair share 0.25
    assert dominant_experts([0.7, 0.25, 0.05, 0.0]) == [0]  # over twice the fair share
    assert dead_experts([0.25] * 4) == dominant_experts([0.25] * 4) == []
    assert dominant_experts([0.95, 0.05]) == [0] and dead_experts([1.0]) == []


def test_token_grid_follows_the_input_aspect():
    assert token_grid(16, 64, 64) == (4, 4)
    assert token_grid(8, 32, 64) == (2, 4)
    with pytest.raises(ValueError, match="do not tile"):
        token_grid(7, 64, 64)


def fake_block(indices: torch.Tensor, num_experts: int, kept: torch.Tensor | None = None) -> SimpleNamespace:
    """What the recorder reads from an MoE block: its last routing, router size and (token routing) capacity mask."""
    probs = torch.full((*indices.shape[:-1], num_experts), 1 / num_experts)
    routing = Routing(probs.log(), probs, torch.ones(indices.shape, dtype=torch.float32), indices)
    return SimpleNamespace(routing=routing, router=SimpleNamespace(num_experts=num_experts), kept=kept)


def make_batch(size: tuple[int, int], boxes: list[tuple[int, int, list[float]]], ori_shape, pads, files):
    """Val batch as the validator's preprocess leaves it; boxes are (image, class, normalised xywh)."""
    b = len(files)
    return {
        "img": torch.zeros(b, 3, *size),
        "batch_idx": torch.tensor([i for i, _, _ in boxes], dtype=torch.float32),
        "cls": torch.tensor([[c] for _, c, _ in boxes], dtype=torch.float32).view(-1, 1),
        "bboxes": torch.tensor([xywh for _, _, xywh in boxes], dtype=torch.float32).view(-1, 4),
        "ori_shape": ori_shape,
        "ratio_pad": [((1.0, 1.0), pad) for pad in pads],
        "im_file": files,
    }


def test_recorder_counts_images_for_every_class_and_size_present():
    names = {0: "cat", 1: "dog", 2: "car"}
    boxes = [(0, 0, [0.5, 0.5, 0.02, 0.02]), (0, 1, [0.5, 0.5, 0.1, 0.1]), (1, 2, [0.5, 0.5, 0.5, 0.5])]
    batch = make_batch((64, 64), boxes, [(64, 64)] * 3, [(0, 0)] * 3, ["d/a.jpg", "d/b.jpg", "d/c.jpg"])
    block = fake_block(torch.tensor([[0], [1], [2]]), 3)  # image i -> expert i
    recorder = RoutingRecorder([("layer", block)], names, {"a": "day", "b": "night"}, examples=2)
    recorder.update(batch)
    layer = recorder.layers["layer"]
    assert recorder.rows["class"] == ["cat", "dog", "car", "background"]
    # image 0 has a cat and a dog: it counts in both rows; image 2 has no object: background
    assert layer.matrices["class"].tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    # sizes: 0.02^2 of the image is small, 0.1^2 medium, 0.5^2 large
    assert layer.matrices["size"].tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert recorder.rows["domain"] == ["day", "night", "untagged"]
    assert layer.matrices["domain"].tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert layer.examples == [[0], [1], [2]] and set(recorder.thumbnails) == {0, 1, 2}
    assert layer.items == 3 and layer.entropy_sum == pytest.approx(3 * math.log(3))
    assert normalized_mutual_information(layer.matrices["domain"]) == pytest.approx(1.0)


def test_recorder_counts_tokens_by_the_box_they_lie_in_and_skips_padding():
    # one 64x64 input holding a 64x48 image padded by 8 px above and below; 4x4 tokens of stride 16, so the last
    # token row (centres at y=56) lies on the padding; a dog box covers x 0-32, y 8-40: four token centres
    batch = make_batch((64, 64), [(0, 1, [16 / 64, 24 / 64, 32 / 64, 32 / 64])], [(48, 64)], [(0, 8)], ["d/a.jpg"])
    in_box = torch.zeros(4, 4, dtype=torch.long)
    in_box[:2, :2] = 1
    kept = torch.ones(1, 16, 1, dtype=torch.bool)
    kept[0, :3] = False
    block = fake_block(in_box.view(1, 16, 1), 2, kept)  # tokens in the box -> expert 1, the rest -> expert 0
    recorder = RoutingRecorder([("tokens", block)], {0: "cat", 1: "dog"}, examples=1)
    recorder.update(batch)
    layer = recorder.layers["tokens"]
    assert layer.tokens and layer.items == 16
    assert layer.matrices["class"].tolist() == [[0, 0], [0, 4], [8, 0]]  # 4 padding tokens count nowhere
    assert layer.matrices["size"].tolist() == [[0, 0], [0, 0], [0, 4], [8, 0]]  # 32x32 of 64x48: large
    assert normalized_mutual_information(layer.matrices["class"]) == pytest.approx(1.0)
    assert recorder.utilisation.counts["tokens"].tolist() == [12, 4]
    image_id, top1, dropped = layer.examples[0]
    assert image_id == 0 and top1.tolist() == in_box.tolist() and dropped.sum() == 3


def test_domain_tags_from_the_data_yaml_key_or_a_csv(tmp_path):
    assert load_domains({"path": str(tmp_path)}) is None
    assert load_domains({"path": str(tmp_path), "domains": {1: "day"}}) == {"1": "day"}
    (tmp_path / "domains.csv").write_text("image,domain\n# a comment\n\na,day\nb, night\n")
    assert load_domains({"path": str(tmp_path)}) == {"a": "day", "b": "night"}
    (tmp_path / "tags.csv").write_text("a,day\nb\n")
    with pytest.raises(ValueError, match="tags.csv line 2"):
        load_domains({"path": str(tmp_path), "domains": "tags.csv"})
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_domains({"path": str(tmp_path), "domains": "missing.csv"})


def test_domain_experts_map_each_domain_in_name_order_or_as_the_data_yaml_says():
    tags = {"a": "night", "b": "day", "c": "day", "d": "fog"}
    assert domain_experts({}, tags, 4) == {"day": 0, "fog": 1, "night": 2}
    with pytest.raises(ValueError, match="3 domains for 2 experts; set experts=3, or map domains"):
        domain_experts({}, tags, 2)
    grouped = {"domain_experts": {"day": 0, "fog": 1, "night": 1}}
    assert domain_experts(grouped, tags, 2) == {"day": 0, "fog": 1, "night": 1}
    with pytest.raises(ValueError, match=r"maps no expert for the tagged domains \['fog'\]"):
        domain_experts({"domain_experts": {"day": 0, "night": 1}}, tags, 2)
    with pytest.raises(ValueError, match=r"\{'night': 2\} are not expert indices 0..1"):
        domain_experts({"domain_experts": {"day": 0, "fog": 1, "night": 2}}, tags, 2)


def check_analysis_folder(folder, layers: int, domains: bool) -> dict:
    """The run folder holds analysis.json with every key, analysis.md, and every PNG it lists, readable."""
    result = json.loads((folder / "analysis.json").read_text())
    assert {"model", "data", "split", "imgsz", "metrics", "images", "layers", "plots", "nmi_definition"} <= set(result)
    assert result["images"] == 4 and len(result["layers"]) == layers
    factors = {"class", "size", "domain"} if domains else {"class", "size"}
    for name, layer in result["layers"].items():
        assert set(layer) == LAYER_KEYS, name
        assert set(layer["nmi"]) == set(layer["routing_matrices"]) == factors
        assert all(0.0 <= v <= 1.0 for v in layer["nmi"].values())
        assert sum(layer["counts"]) == layer["items"] * layer["top_k"] and abs(sum(layer["utilisation"]) - 1) < 1e-6
    expected = {"utilisation.png", *(f"routing_{f}.png" for f in factors)}
    expected |= {f"routing_map_{name}.png" for name in result["layers"]}
    assert set(result["plots"]) == expected
    for png in expected:
        image = cv2.imread(str(folder / png))
        assert image is not None and image.shape[0] > 100 and image.shape[1] > 100, png
    assert "NMI" in (folder / "analysis.md").read_text()
    return result


def test_analyze_trained_model_with_domains(trained_run, coco8, tmp_path):
    data = tmp_path / "coco8-domains.yaml"
    coco8_yaml = YAML.load(check_yaml("coco8.yaml"))
    stems = sorted(p.stem for p in (coco8 / "images" / "val").glob("*.jpg"))
    tags = {stem: "day" if i % 2 else "night" for i, stem in enumerate(stems)}  # stems stay strings, unlike '0036'
    YAML.save(data, {**coco8_yaml, "path": str(coco8), "domains": tags})
    model = VisionMoE(trained_run / "weights" / "best.pt")
    result = model.analyze(data=str(data), imgsz=64, batch=4, project=str(tmp_path), name="a")
    assert result["save_dir"] == str(tmp_path / "a")
    result = check_analysis_folder(tmp_path / "a", layers=6, domains=True)
    for layer in result["layers"].values():
        assert layer["routing"] == "image" and layer["drop_rate"] is None
        assert layer["routing_matrices"]["domain"]["rows"] == ["day", "night", "untagged"]
        assert np.asarray(layer["routing_matrices"]["domain"]["counts"]).sum(1).tolist() == [2, 2, 0]


def test_analyze_token_routed_model_reports_drop_rate(coco8, tmp_path):
    result = VisionMoE("visionmoe-vit-t.yaml").analyze(
        data="coco8.yaml", imgsz=64, batch=4, project=str(tmp_path), name="vit"
    )
    result = check_analysis_folder(tmp_path / "vit", layers=len(result["layers"]), domains=False)
    for layer in result["layers"].values():
        assert layer["routing"] == "token" and 0.0 <= layer["drop_rate"] <= 1.0
        assert layer["routing_matrices"]["class"]["rows"][-1] == "background"


def test_training_writes_the_routing_summary(trained_run):
    result = json.loads((trained_run / "analysis.json").read_text())
    assert len(result["layers"]) == 6 and result["plots"] == [] and result["images"] == 4
    assert all(set(layer["nmi"]) == {"class", "size"} for layer in result["layers"].values())
    assert (trained_run / "analysis.md").is_file()


def test_cli_analyze(trained_run, tmp_path):
    weights = trained_run / "weights" / "best.pt"
    r = run_cli("analyze", f"model={weights}", "data=coco8.yaml", "imgsz=64", f"project={tmp_path}", "name=cli")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "MoE routing model.6" in r.stdout + r.stderr
    check_analysis_folder(tmp_path / "cli", layers=6, domains=False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["data=coco8.yaml"], "analyze needs a trained model"),
        (["model=missing.pt", "data=coco8.yaml"], "missing.pt"),
        (["model=WEIGHTS", "data=missing.yaml"], "'missing.yaml' does not exist"),
    ],
)
def test_cli_analyze_errors_are_one_line_and_write_nothing(trained_run, tmp_path, args, message):
    args = [a.replace("WEIGHTS", str(trained_run / "weights" / "best.pt")) for a in args]
    r = run_cli("analyze", *args, f"project={tmp_path / 'runs'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("visionmoe error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-2000:]
    assert not (tmp_path / "runs").exists()

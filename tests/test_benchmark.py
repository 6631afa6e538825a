"""`visionmoe benchmark`: every available format of an MoE model and its dense YOLO11, validated and timed."""

from __future__ import annotations

import csv

import pytest
from conftest import run_cli

from visionmoe.engine.benchmark import COLUMNS, dense_baseline
from visionmoe import VisionMoE


@pytest.fixture(scope="module")
def benchmarked(coco8, tmp_root):
    project = tmp_root / "runs" / "benchmark"
    r = run_cli("benchmark", "model=visionmoe-yolo-n.yaml", "data=coco8.yaml", "imgsz=64", f"project={project}",
                "name=b", "experts=3")  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return project / "b", r.stdout + r.stderr


def test_table_has_every_format_for_both_models(benchmarked):
    folder, log = benchmarked
    rows = list(csv.DictReader(open(folder / "benchmark.csv")))
    assert list(rows[0]) == [*COLUMNS, "status"]
    got = {(r["family"], r["format"], r["moe_form"]) for r in rows}
    expected = {("moe", "pytorch", ""), ("dense", "pytorch", ""), ("moe", "onnx", "branch"), ("moe", "onnx", "gather"),
                ("dense", "onnx", ""), ("moe", "openvino", "gather"), ("dense", "openvino", ""),
                ("moe", "torchscript", "gather"), ("dense", "torchscript", "")}  # fmt: skip
    assert got == expected  # no TensorRT row without a GPU
    for r in rows:
        assert r["status"] == "", r
        assert 0 <= float(r["mAP50-95"]) <= 1 and float(r["latency_ms"]) > 0
        assert r["format"] == "pytorch" or float(r["size_MB"]) > 0
        assert float(r["latency_vs_dense"]) > 0
    assert "latency_vs_dense" in log and "benchmark.csv" in log


def test_baseline_follows_scale_and_refuses_unscaled_models():
    assert dense_baseline(VisionMoE("visionmoe-yolo-s.yaml"), "visionmoe-yolo-s.yaml") == "yolo11s.yaml"
    with pytest.raises(ValueError, match="baseline="):
        dense_baseline(VisionMoE("visionmoe-vit-s.yaml"), "visionmoe-vit-s.yaml")


def test_unknown_key_is_refused():
    r = run_cli("benchmark", "epochs=3")
    assert r.returncode == 2 and "'epochs' is not a valid visionmoe argument" in r.stderr

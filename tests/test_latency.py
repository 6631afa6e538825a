"""Latency helpers: ONNX Runtime sessions never spin idle, exported models are timed in a child process."""

from __future__ import annotations

import pytest
import torch

from visionmoe.utils.latency import SPINNING_OFF, exported_latency_ms, ort_session, paired_latency, torch_latency_ms
from visionmoe.nn.tasks import build_model


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("latency") / "conv.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 8, 3, padding=1), torch.rand(1, 3, 32, 32), str(path), dynamo=False)
    return path


def test_ort_sessions_never_spin(tiny_onnx):
    options = ort_session(tiny_onnx, threads=1).get_session_options()
    for key, value in SPINNING_OFF.items():
        assert options.get_session_config_entry(key) == value
    assert options.intra_op_num_threads == 1


def test_exported_models_timed_side_by_side_in_a_child(tiny_onnx):
    ms = exported_latency_ms({"a": tiny_onnx, "b": tiny_onnx}, "onnxruntime", 32, runs=3, warmup=1)
    assert set(ms) == {"a", "b"} and all(t > 0 for t in ms.values())


def test_paired_latency_times_each_model_beside_the_reference(tiny_onnx, tmp_path):
    other = tmp_path / "other.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 16, 3, padding=1), torch.rand(1, 3, 32, 32), str(other), dynamo=False)
    timed = paired_latency({"ref": tiny_onnx, "other": other}, "ref", "onnxruntime", 32, repeats=2, runs=3, warmup=1)
    assert set(timed) == {"ref", "other"}
    assert timed["ref"][1] == 1.0 and all(ms > 0 and ratio > 0 for ms, ratio in timed.values())
    alone = paired_latency({"ref": tiny_onnx, "other": other}, None, "onnxruntime", 32, runs=2, warmup=1)
    assert set(alone) == {"ref", "other"} and all(ms > 0 and ratio is None for ms, ratio in alone.values())
    with pytest.raises(ValueError, match="reference 'missing' is not one of the models to time"):
        paired_latency({"ref": tiny_onnx}, "missing")


def test_child_failure_and_unknown_runtime_are_one_line_errors(tmp_path):
    with pytest.raises(RuntimeError, match="timing onnxruntime models failed"):
        exported_latency_ms({"missing": tmp_path / "missing.onnx"}, "onnxruntime", 32, runs=1, warmup=0)
    with pytest.raises(ValueError, match="unknown runtime 'tflite'"):
        exported_latency_ms({}, "tflite")


def test_torch_models_timed_together():
    models = {k: build_model("visionmoe-yolo-n.yaml", verbose=False, experts=k) for k in (2, 4)}
    ms = torch_latency_ms(models, 64, runs=2, warmup=1)
    assert set(ms) == {2, 4} and all(t > 0 for t in ms.values())


def test_torch_latency_times_the_requested_batch():
    seen = []
    model = build_model("visionmoe-yolo-n.yaml", verbose=False)
    model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))  # deep-copied with the model
    torch_latency_ms({"moe": model}, 64, runs=1, warmup=0, batch=3)
    assert seen == [(3, 3, 64, 64)]

"""Batch-1 latency: median wall time of eager PyTorch and ONNX Runtime forwards after warmup."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from ultralytics.nn.tasks import BaseModel

from . import allowed_cpus


def interleaved_median_ms(
    fns: dict[str, Callable[[], object]], runs: int = 20, warmup: int = 3, sync: Callable[[], None] | None = None
) -> dict[str, float]:
    """Median milliseconds of each `fn()` after `warmup` calls, run in interleaved rounds (one call of each per
    round), so that load from other processes hits every variant alike and their ratios stay meaningful on a shared
    machine; `sync` waits for async devices."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if sync:
                sync()
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def median_ms(
    fn: Callable[[], object], runs: int = 20, warmup: int = 3, sync: Callable[[], None] | None = None
) -> float:
    """Median milliseconds of `fn()` over `runs` calls after `warmup` calls; `sync` waits for async devices."""
    return interleaved_median_ms({"fn": fn}, runs, warmup, sync)["fn"]


def torch_latency_ms(model: BaseModel, imgsz: int, device: str = "cpu", runs: int = 20) -> float:
    """Eager latency of a fused fp32 copy of `model` on one imgsz x imgsz image (on every allowed CPU core)."""
    if device == "cpu":
        torch.set_num_threads(allowed_cpus())  # Ultralytics' trainers and validators leave one core idle
    m = deepcopy(model).float().to(device).eval().fuse(verbose=False)  # Conv+BN folded, as deployed
    x = torch.rand(1, 3, imgsz, imgsz, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    with torch.inference_mode():
        return median_ms(lambda: m(x), runs, sync=sync)


def onnx_latency_ms(path: str | Path, provider: str = "CPUExecutionProvider", runs: int = 20) -> float:
    """ONNX Runtime latency of a static-shape model on a random input of its declared shape."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = allowed_cpus()  # the same cores eager PyTorch uses
    session = ort.InferenceSession(str(path), options, providers=[provider])
    inp = session.get_inputs()[0]
    x = np.random.default_rng(0).random(inp.shape, dtype=np.float32)
    return median_ms(lambda: session.run(None, {inp.name: x}), runs)

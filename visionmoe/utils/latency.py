"""Batch-1 latency measured without cross-runtime interference.

Thread pools interfere when two runtimes share a process: after a run, ONNX Runtime's intra-op threads keep
spinning and, on a small machine, take the cores from whatever is timed next (one model read 45 ms or 78 ms
depending on what ran before it). So:
- every ONNX Runtime session made here has spinning turned off (`ort_session`);
- exported models are timed in a child process per runtime (`exported_latency_ms`), so no other runtime's pool
  is alive beside them, and PyTorch models are timed in this process (`torch_latency_ms`), where no exported model
  runs;
- the models of one runtime are timed in interleaved rounds, so load from other processes hits them alike and
  their ratios stay meaningful on a shared machine;
- a ratio against a reference model comes from processes that hold only the two (`paired_latency`), repeated in
  fresh processes: with many models in one process, each runs with caches that the others filled, and how much
  that costs differs between models (the same E=16 export read 1.16-1.22x YOLO11n timed among six other models,
  1.01-1.09x beside YOLO11n alone); the process a model lands in also moves its latency by a few percent.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ultralytics.nn.tasks import BaseModel

from . import allowed_cpus

RUNTIMES = ("onnxruntime", "openvino", "torchscript", "tensorrt")  # what `exported_latency_ms` can time
SPINNING_OFF = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


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


def torch_latency_ms(
    models: dict[str, BaseModel], imgsz: int, device: str = "cpu", runs: int = 20, warmup: int = 3, batch: int = 1
) -> dict[str, float]:
    """Eager latency of fused fp32 copies of `models` on `batch` imgsz x imgsz images, interleaved (every allowed
    core)."""
    if device == "cpu":
        torch.set_num_threads(allowed_cpus())  # Ultralytics' trainers and validators leave one core idle
    fused = {name: deepcopy(m).float().to(device).eval().fuse(verbose=False) for name, m in models.items()}
    x = torch.rand(batch, 3, imgsz, imgsz, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    with torch.inference_mode():
        return interleaved_median_ms({name: (lambda m=m: m(x)) for name, m in fused.items()}, runs, warmup, sync)


def ort_session(path: str | Path, provider: str = "CPUExecutionProvider", threads: int | None = None):
    """ONNX Runtime session on `threads` intra-op threads (default: every allowed core) that never spins idle."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or allowed_cpus()
    for key, value in SPINNING_OFF.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=[provider])


def _runner(runtime: str, path: str, shape: list[int], device: str, threads: int) -> Callable[[], object]:
    """A zero-argument batch inference of one exported model on a fixed random input of `shape`."""
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    if runtime == "onnxruntime":
        provider = "CUDAExecutionProvider" if device.startswith("cuda") else "CPUExecutionProvider"
        session = ort_session(path, provider, threads)
        feed = {session.get_inputs()[0].name: x}
        return lambda: session.run(None, feed)
    if runtime == "openvino":
        import openvino as ov

        xml = next(Path(path).glob("*.xml")) if Path(path).is_dir() else Path(path)
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        request = ov.Core().compile_model(ov.Core().read_model(xml), "CPU", config).create_infer_request()
        return lambda: request.infer({0: x})
    if runtime == "torchscript":
        torch.set_num_threads(threads)
        module = torch.jit.load(path, map_location=device).eval()
        xt = torch.from_numpy(x).to(device)

        def run() -> object:
            with torch.inference_mode():
                return module(xt)

        return run
    if runtime == "tensorrt":
        from ultralytics.nn.autobackend import AutoBackend

        backend = AutoBackend(path, device=torch.device(device))
        xt = torch.from_numpy(x).to(device)
        return lambda: backend(xt)
    raise ValueError(f"unknown runtime '{runtime}', use one of {list(RUNTIMES)}")


def _time_spec(spec: dict[str, Any]) -> dict[str, float]:
    """Child-process side of `exported_latency_ms`."""
    threads = spec["threads"] or allowed_cpus()
    fns = {name: _runner(spec["runtime"], path, spec["shape"], spec["device"], threads) for name, path in spec["files"].items()}
    sync = torch.cuda.synchronize if spec["device"].startswith("cuda") and spec["runtime"] in {"torchscript", "tensorrt"} else None
    return interleaved_median_ms(fns, spec["runs"], spec["warmup"], sync)


def exported_latency_ms(
    files: dict[str, str | Path],
    runtime: str = "onnxruntime",
    imgsz: int | tuple[int, int] = 640,
    batch: int = 1,
    device: str = "cpu",
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
) -> dict[str, float]:
    """Median latency (ms) of each exported model, all of one runtime, timed interleaved in a fresh child process.

    The child holds no other runtime's threads, and ONNX Runtime's spinning is off there, so models timed together
    see the same machine and models timed in different calls never slow each other down.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime '{runtime}', use one of {list(RUNTIMES)}")
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    spec = {"runtime": runtime, "files": {k: str(v) for k, v in files.items()}, "shape": [batch, 3, h, w],
            "device": device, "runs": runs, "warmup": warmup, "threads": threads}  # fmt: skip
    child = subprocess.run(
        [sys.executable, "-m", __name__, json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if child.returncode:
        tail = " ".join(child.stderr.strip().splitlines()[-1:]) or f"exit status {child.returncode}"
        raise RuntimeError(f"timing {runtime} models failed: {tail}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def paired_latency(
    files: dict[str, str | Path],
    reference: str | None,
    runtime: str = "onnxruntime",
    imgsz: int | tuple[int, int] = 640,
    repeats: int = 3,
    **kwargs: Any,
) -> dict[str, tuple[float, float | None]]:
    """(median ms, median ratio to `reference`) of each model in `files`, `reference` being one of its keys.

    Each other model is timed beside the reference alone, in interleaved rounds, in `repeats` fresh child processes
    (see `exported_latency_ms`, which takes the remaining arguments); the reference's figures pool all its pairs.
    Without a reference (None: e.g. the dense model failed to export) the models are timed together, with no ratio.
    """
    if reference is None:
        return {name: (ms, None) for name, ms in exported_latency_ms(files, runtime, imgsz, **kwargs).items()}
    if reference not in files:
        raise ValueError(f"reference '{reference}' is not one of the models to time: {list(files)}")
    others = [name for name in files if name != reference] or [reference]
    ms: dict[str, list[float]] = {name: [] for name in files}
    ratios: dict[str, list[float]] = {name: [] for name in files}
    for _ in range(repeats):
        for name in others:
            pair = exported_latency_ms({reference: files[reference], name: files[name]}, runtime, imgsz, **kwargs)
            for key in {reference, name}:
                ms[key].append(pair[key])
            ratios[name].append(pair[name] / pair[reference])
    ratios[reference] = [1.0]
    return {name: (statistics.median(ms[name]), statistics.median(ratios[name])) for name in files}


if __name__ == "__main__":
    print(json.dumps(_time_spec(json.loads(sys.argv[1]))))

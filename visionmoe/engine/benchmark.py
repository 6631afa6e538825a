"""`visionmoe benchmark`: one MoE model and the dense YOLO11 it replaces, in every deployable format, side by side.

In the spirit of `yolo benchmark`: each model is exported to every format available here (PyTorch, ONNX in each
sparse MoE form, OpenVINO, TorchScript, TensorRT where a GPU and tensorrt are present), then every export is
validated on the same data and timed at batch 1. Each export is timed beside the dense export of its runtime alone,
in interleaved rounds in fresh child processes (utils.latency), so the MoE / YOLO11 ratio of each format is clean.
Results: a table in the log and benchmark.csv in runs/detect/benchmark (project=/name= as for val).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ultralytics import YOLO
from ultralytics.utils import LOGGER, RUNS_DIR
from ultralytics.utils.files import file_size, increment_path

from ..data import find_data_yaml
from ..models.yolo.model import DEFAULT_MODEL, VisionMoE
from ..nn.tasks import find_model_yaml
from ..utils.latency import paired_latency, torch_latency_ms
from .compare import SCALES

DEFAULT_DATA = "synth-shapes.yaml"
# The arguments `visionmoe benchmark` takes (besides MoE settings), with their defaults
BENCHMARK_ARGS = {"model": DEFAULT_MODEL, "data": DEFAULT_DATA, "imgsz": 640, "baseline": "yolo11<scale>.yaml",
                  "device": "cpu", "project": "runs/detect", "name": "benchmark"}  # fmt: skip
# (format, MoE export form, runtime that times it); PyTorch is timed in-process
FORMATS = (
    ("onnx", "branch", "onnxruntime"),
    ("onnx", "gather", "onnxruntime"),
    ("openvino", None, "openvino"),
    ("torchscript", None, "torchscript"),
    ("engine", None, "tensorrt"),
)
COLUMNS = ("model", "family", "format", "moe_form", "size_MB", "mAP50-95", "latency_ms", "latency_vs_dense")


def dense_baseline(model: VisionMoE, name: str) -> str:
    """The dense YOLO11 of the MoE model's scale (same active FLOPs at top_k=1)."""
    scale = model.model.yaml.get("scale")
    if scale is None and str(name).endswith((".yaml", ".yml")):
        scale = find_model_yaml(name)[1]
    if "vit" in model.model.yaml or scale not in tuple(SCALES):  # ViT scales are no YOLO11 scales
        raise ValueError(f"'{name}' has no YOLO11 of its scale to compare with; pass the dense model as baseline=...")
    return f"yolo11{scale}.yaml"


def _export(model: VisionMoE | YOLO, folder: Path, fmt: str, imgsz: int, device: str, form: str) -> str:
    """Export into its own folder, so forms and formats never overwrite each other."""
    folder.mkdir(parents=True, exist_ok=True)
    model.model.pt_path = str(folder / f"{folder.name}.pt")  # exporters write next to the model's .pt path
    args: dict[str, Any] = {"format": fmt, "imgsz": imgsz, "batch": 1, "device": device}
    if isinstance(model, VisionMoE):
        args["moe_dispatch"] = form
    elif fmt in {"onnx", "engine"}:
        args["simplify"] = False  # as the MoE exports: onnxslim is an optional extra, often absent
    return model.export(**args)


def benchmark(
    model: str = DEFAULT_MODEL,
    data: str = DEFAULT_DATA,
    imgsz: int = 640,
    baseline: str | None = None,
    device: str = "cpu",
    project: str | None = None,
    name: str | None = None,
    **moe: Any,
) -> list[dict[str, Any]]:
    """Export, validate and time `model` and its dense baseline in every available format; returns the table rows.

    Args:
        model: MoE model YAML or weights.
        data: Dataset whose val split gives mAP50-95 (default: the packaged synth set).
        imgsz: Square image size of every export and of validation.
        baseline: Dense model YAML or weights (default: the YOLO11 of the MoE model's scale).
        device: 'cpu', or a GPU index for GPU runtimes (TensorRT).
        project, name: Where the run folder goes (default runs/detect/benchmark, incremented).
        **moe: MoE settings (experts=8, ...) applied when `model` is a YAML.
    """
    from ..export import default_dispatch, tensorrt_available  # export tooling loads only when used

    data = str(find_data_yaml(data))
    moe_model = VisionMoE(model, **moe)
    dense_name = baseline or dense_baseline(moe_model, model)
    dense_model = YOLO(dense_name)
    save_dir = increment_path(Path(project or RUNS_DIR / "detect") / (name or "benchmark"), mkdir=True)
    labels = {"moe": Path(model).stem, "dense": Path(dense_name).stem}
    gpu = str(device) not in {"cpu", "mps"}
    LOGGER.info(f"benchmark: {labels['moe']} against {labels['dense']}, imgsz {imgsz}, data {data} -> {save_dir}")

    rows: list[dict[str, Any]] = []
    for family, m in (("moe", moe_model), ("dense", dense_model)):
        rows.append({"model": labels[family], "family": family, "format": "pytorch", "moe_form": "", "obj": m,
                     "size_MB": file_size(m.ckpt_path) if getattr(m, "ckpt_path", None) else ""})  # fmt: skip
    for fmt, form, runtime in FORMATS:
        if runtime == "tensorrt" and not (gpu and tensorrt_available()):
            LOGGER.info("benchmark: skipping TensorRT (needs a CUDA GPU, device=0, and the tensorrt package)")
            continue
        for family, m in (("moe", moe_model), ("dense", dense_model)):
            if family == "dense" and form == "gather":
                continue  # one ONNX row for the dense model
            moe_form = (form or default_dispatch(1, fmt)) if family == "moe" else ""
            row = {"model": labels[family], "family": family, "format": fmt, "moe_form": moe_form, "runtime": runtime}
            folder = save_dir / "exports" / "-".join(filter(None, (labels[family], fmt, moe_form)))
            try:
                row["path"] = _export(m, folder, fmt, imgsz, device, moe_form)
                row["size_MB"] = round(file_size(row["path"]), 2)
            except Exception as e:  # a format that fails for one model is recorded, the others go on
                row["status"] = f"export failed: {' '.join(str(e).split())[:160]}"
            rows.append(row)

    for row in rows:
        if row.get("status"):
            continue
        loaded = row.get("obj") or (VisionMoE(row["path"]) if row["family"] == "moe" else YOLO(row["path"], task="detect"))
        metrics = loaded.val(data=data, imgsz=imgsz, batch=1, device=device, plots=False, verbose=False,
                             project=str(save_dir / "val"), name="-".join(filter(None, (row["model"], row["format"], row["moe_form"]))))  # fmt: skip
        row["mAP50-95"] = round(float(metrics.box.map), 4)

    _time(rows, imgsz, device, gpu)
    _write(rows, save_dir)
    return [{c: r.get(c, "") for c in (*COLUMNS, "status")} for r in rows]


def _time(rows: list[dict[str, Any]], imgsz: int, device: str, gpu: bool) -> None:
    """Batch-1 latency of every row and its ratio to the dense model in the same format: PyTorch models here,
    interleaved; each export beside the dense export of its runtime alone, in child processes (utils.latency)."""
    torch_device = f"cuda:{device}" if gpu and str(device).isdigit() else ("cuda" if gpu else "cpu")
    eager = [r for r in rows if r["format"] == "pytorch"]
    ms = torch_latency_ms({r["family"]: r["obj"].model for r in eager}, imgsz, torch_device)
    for r in eager:
        r["latency_ms"] = round(ms[r["family"]], 2)
        r["latency_vs_dense"] = round(ms[r["family"]] / ms["dense"], 3)
    by_runtime: dict[str, list[dict]] = {}
    for r in rows:
        if "path" in r:
            by_runtime.setdefault(r["runtime"], []).append(r)
    for runtime, group in by_runtime.items():
        dev = torch_device if runtime in {"tensorrt", "onnxruntime"} and gpu else "cpu"
        files = {str(i): r["path"] for i, r in enumerate(group)}
        dense = next((str(i) for i, r in enumerate(group) if r["family"] == "dense"), None)  # None: it failed
        timed = paired_latency(files, dense, runtime, imgsz, device=dev)
        for i, r in enumerate(group):
            t, ratio = timed[str(i)]
            r["latency_ms"] = round(t, 2)
            if ratio is not None:
                r["latency_vs_dense"] = round(ratio, 3)


def _write(rows: list[dict[str, Any]], save_dir: Path) -> None:
    """benchmark.csv in the run folder, and the same table in the log."""
    cols = (*COLUMNS, "status")
    with open(save_dir / "benchmark.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    LOGGER.info("\n" + "\n".join(lines) + f"\nbenchmark: results saved to {save_dir / 'benchmark.csv'}")

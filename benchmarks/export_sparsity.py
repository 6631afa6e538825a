"""Does the gathered-weight ONNX export keep the sparsity? ONNX Runtime CPU latency, measured side by side in one run.

    python benchmarks/export_sparsity.py [--imgsz 640] [--runs 20] [--warmup 3] [--scale n]

Prints, for batch 1 and top_k=1:
  - 16 experts over 4 experts, both gather exports (sparse: should stay near 1, target <= 1.15);
  - gather over dense-fallback export of an 8-expert model (should be well under 1).
Models are built from the packaged YAML with random weights (latency does not depend on them).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from visionmoe import VisionMoE
from visionmoe.utils.latency import interleaved_median_ms


def export(folder: Path, name: str, experts: int, dispatch: str, imgsz: int, scale: str) -> Path:
    model = VisionMoE(f"visionmoe-yolo-{scale}.yaml", experts=experts, top_k=1)
    model.model.pt_path = str(folder / f"{name}.pt")  # the export lands next to it
    return Path(model.export(format="onnx", imgsz=imgsz, batch=1, moe_dispatch=dispatch))


def session_run(path: Path, imgsz: int):
    """A batch-1 inference of the ONNX file on the CPU provider, as a zero-argument callable."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = {"images": np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)}
    return lambda: session.run(None, x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--scale", default="n", help="model scale of visionmoe-yolo.yaml")
    args = parser.parse_args()

    variants = {  # name: (experts, dispatch)
        "e4-gather": (4, "gather"),
        "e16-gather": (16, "gather"),
        "e8-gather": (8, "gather"),
        "e8-dense": (8, "dense"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = {n: export(Path(tmp), n, e, d, args.imgsz, args.scale) for n, (e, d) in variants.items()}
        ms = interleaved_median_ms({n: session_run(p, args.imgsz) for n, p in paths.items()}, args.runs, args.warmup)

    print(f"\nONNX Runtime {ort.__version__} CPU, visionmoe-yolo-{args.scale}, imgsz {args.imgsz}, batch 1, top_k=1, "
          f"median of {args.runs} interleaved rounds after {args.warmup} warmup")  # fmt: skip
    for name, t in ms.items():
        print(f"  {name:<11} {t:8.1f} ms")
    print(f"  16 / 4 experts (gather):   {ms['e16-gather'] / ms['e4-gather']:.3f}  (target <= 1.15)")
    print(f"  gather / dense (8 experts): {ms['e8-gather'] / ms['e8-dense']:.3f}  (should be well under 1)")


if __name__ == "__main__":
    main()

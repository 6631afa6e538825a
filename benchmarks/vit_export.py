"""Does eval capacity calibration bring the ViT-MoE export within 10% of the dense-MLP ViT? ONNX Runtime, CPU.

    python benchmarks/vit_export.py [--scale s] [--imgsz 640] [--images 16] [--rounds 20] [--warmup 3] [--repeats 3]
                                    [--factors 1.25] [--weights E4.pt E16.pt --data data.yaml]

Exports, at batch 1, the dense-MLP ViT (`visionmoe.nn.vit.dense_baseline`) and ViT-MoE (top_k=1) with 4 and 16
experts, each MoE model at its configured eval capacity factor, after `calibrate_capacity` on `--images` images
(one factor per expert, the fewest slots that drop at most 0.5% of each layer's assignments), and at every fixed
factor of `--factors`. Times each file beside the dense ViT alone, in interleaved rounds, in `--repeats` fresh child
processes per pair (ONNX Runtime spinning off; see visionmoe/utils/latency.py) and prints each one's eval factors
(per layer, the mean over its experts: its slots as a multiple of its tokens), drop rate on the calibration images,
median latency and median ratio to the dense ViT (target for the calibrated exports: <= 1.10).

An export's latency depends on its shapes, so on the factors, not on the weights; the calibrated factors depend on
the routing. The default models have random weights, calibrated on the packaged synth-shapes val split (rendered
in-process by visionmoe.data.synth, resized to imgsz). Random routers send most of an image's tokens to one or two
experts, the same ones in most images, which per-expert factors follow; trained checkpoints (--weights, with their
dataset's val split via --data) show what calibration saves on learned routing, and --factors what a given uniform
factor costs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from itertools import islice
from pathlib import Path

import cv2
import torch
from ultralytics.cfg import get_cfg
from ultralytics.data.utils import check_det_dataset

from visionmoe import VisionMoE
from visionmoe.data import find_data_yaml
from visionmoe.data.synth import DEFAULT_IMAGES, DEFAULT_IMGSZ, VAL_FRACTION, render
from visionmoe.models.yolo.calibrate import SplitImages
from visionmoe.nn.capacity import calibrate_capacity, token_routed_layers
from visionmoe.nn.routing import TARGET_DROP
from visionmoe.nn.vit import dense_baseline
from visionmoe.utils import allowed_cpus
from visionmoe.utils.latency import paired_latency

TARGET_RATIO = 1.10


def synth_val_images(count: int, imgsz: int) -> list[torch.Tensor]:
    """The first `count` images of the packaged synth-shapes val split (seed 0), RGB [1, 3, imgsz, imgsz] in [0, 1]."""
    first = DEFAULT_IMAGES - round(DEFAULT_IMAGES * VAL_FRACTION)
    images = []
    for i in range(first, first + count):
        bgr = cv2.resize(render(i, 0, DEFAULT_IMGSZ)[0], (imgsz, imgsz), interpolation=cv2.INTER_LINEAR)
        images.append(torch.from_numpy(bgr[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255)
    return images


def split_images(data: str, count: int, imgsz: int) -> list[torch.Tensor]:
    """The first `count` val images of a dataset, letterboxed square to imgsz as the static export sees them."""
    args = get_cfg(overrides={"imgsz": imgsz, "batch": 1, "workers": 0})
    data_dict = check_det_dataset(find_data_yaml(data))
    images = SplitImages(args, data_dict, "val", 32, torch.device("cpu"), as_validated=False)
    return list(islice(images, count))


def drop_rate(model: torch.nn.Module, images: list[torch.Tensor]) -> float:
    """Share of all token-routed assignments that `model` drops on `images` (batches of any size)."""
    kept = total = 0
    model.eval()
    with torch.no_grad():
        for x in images:
            model(x)
            for _, layer in token_routed_layers(model):
                kept += int(layer.kept.sum())
                total += layer.kept.numel()
    return 1 - kept / max(total, 1)


def set_factors(model: torch.nn.Module, factors: list[float | tuple[float, ...]]) -> None:
    """Set the eval capacity factors of each token-routed layer, in forward order: one for all its experts or one
    per expert."""
    for (_, layer), layer_factors in zip(token_routed_layers(model), factors):
        layer.eval_capacity_factors = layer_factors


def mean_factor(factors: float | tuple[float, ...]) -> float:
    """A layer's buffer slots as a multiple of its tokens (top_k=1): the mean of its experts' factors."""
    return factors if isinstance(factors, float) else sum(factors) / len(factors)


def export(model: VisionMoE, folder: Path, name: str, imgsz: int) -> str:
    model.model.pt_path = str(folder / f"{name}.pt")  # the export lands next to it
    return model.export(format="onnx", imgsz=imgsz, batch=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="s", help="model scale of visionmoe-vit.yaml (random weights)")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--images", type=int, default=16, help="calibration images")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="child processes per (model, dense ViT) pair")
    parser.add_argument("--factors", type=float, nargs="*", default=[1.25], help="fixed eval factors to time too")
    parser.add_argument("--weights", nargs="*", default=[], help="trained ViT-MoE checkpoints instead of E=4 and E=16")
    parser.add_argument("--data", help="calibrate on this dataset's val split instead of synth-shapes")
    args = parser.parse_args(argv)
    cfg = f"visionmoe-vit-{args.scale}.yaml"

    def build(**moe) -> VisionMoE:
        torch.manual_seed(0)
        return VisionMoE(cfg, top_k=1, **moe)

    moes = [VisionMoE(w) for w in args.weights] or [build(experts=4), build(experts=16)]
    dense = VisionMoE(args.weights[0]) if args.weights else build()
    dense_baseline(dense.model)
    if args.data:
        images, source = split_images(args.data, args.images, args.imgsz), f"the val split of {args.data}"
    else:
        images, source = synth_val_images(args.images, args.imgsz), "the synth-shapes val split"

    rows = [("dense", "dense", [], None)]  # (label, file key, eval factors, drop rate)
    with tempfile.TemporaryDirectory() as tmp:
        files = {"dense": export(dense, Path(tmp), "dense", args.imgsz)}
        for model in moes:
            net, e = model.model, model.model.moe_settings.experts
            calibration = calibrate_capacity(net, images, TARGET_DROP)  # starts from the configured factors
            configured = [layer.capacity_factor[1] for _, layer in token_routed_layers(net)]
            variants = [(f"E={e}", configured, calibration.configured_drop_rate)]
            variants += [(f"E={e} cf={f:g}", [f] * len(configured), None) for f in args.factors]
            calibrated = [fit.factors for fit in calibration.layers.values()]
            variants += [(f"E={e} calibrated", calibrated, calibration.drop_rate)]
            graphs: dict[tuple, str] = {}  # equal factors export the same graph: time it once
            for i, (label, factors, drops) in enumerate(variants):
                set_factors(net, factors)
                if tuple(factors) not in graphs:
                    graphs[tuple(factors)] = label
                    files[label] = export(model, Path(tmp), f"e{e}-{i}", args.imgsz)
                drops = drop_rate(net, images) if drops is None else drops
                rows.append((label, graphs[tuple(factors)], factors, drops))
        timed = paired_latency(files, "dense", "onnxruntime", args.imgsz, args.repeats, runs=args.rounds,
                               warmup=args.warmup)  # fmt: skip

    weights = "trained weights" if args.weights else f"{cfg}, random weights"
    print(f"\nViT-MoE top_k=1 ({weights}) and its dense-MLP ViT, imgsz {args.imgsz}, batch 1, ONNX Runtime CPU "
          f"({allowed_cpus()} threads); each model beside the dense ViT alone, median of {args.rounds} interleaved "
          f"rounds after {args.warmup} warmup, in {args.repeats} child processes per pair")
    print(f"calibration: {len(images)} images of {source}, target drop rate <= {TARGET_DROP:.1%} per layer")
    print(f"{'model':<16} {'mean factors':<18} {'drop rate':>9} {'latency ms':>11} {'/ dense':>8}")
    for label, key, factors, drops in rows:
        factors_text = " ".join(f"{mean_factor(f):.3g}" for f in factors) or "-"
        drops_text = "-" if drops is None else f"{drops:.2%}"
        print(f"{label:<16} {factors_text:<18} {drops_text:>9} {timed[key][0]:11.1f} {timed[key][1]:8.3f}")
    missed = 0
    for label, key, _, _ in rows:
        if label.endswith("calibrated"):
            ratio = timed[key][1]
            missed += ratio > TARGET_RATIO
            verdict = "ok" if ratio <= TARGET_RATIO else "MISSED"
            print(f"{label} / dense: {ratio:.3f} (target <= {TARGET_RATIO}) {verdict}")
    return int(missed > 0)


if __name__ == "__main__":
    sys.exit(main())

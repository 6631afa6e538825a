"""Routing report: per-layer summary of a RoutingRecorder, written as analysis.json, analysis.md and PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from ultralytics.utils import LOGGER, colorstr

from .metrics import entropy, normalized_mutual_information
from .plots import plot_image_routing, plot_routing_matrix, plot_token_routing, plot_utilisation
from .recorder import SIZE_THRESHOLDS, RoutingRecorder
from .utilisation import dead_experts, dominant_experts

NMI_DEFINITION = "I(X;Y) / sqrt(H(X) H(Y)) over the routing matrix (expert choice X, class/size/domain Y)"


def layer_summary(recorder: RoutingRecorder) -> dict[str, dict[str, Any]]:
    """Per layer: utilisation, entropies, dead/dominant experts, drop rate, routing matrices and their NMI."""
    tracker = recorder.utilisation
    summary = {}
    for name, layer in recorder.layers.items():
        counts = tracker.counts[name]
        shares = tracker.shares()[name].tolist()
        kept = tracker.kept.get(name)
        summary[name] = {
            "routing": "token" if layer.tokens else "image",
            "experts": layer.num_experts,
            "top_k": layer.top_k,
            "items": layer.items,
            "counts": counts.tolist(),
            "utilisation": shares,
            "entropy": float(entropy(counts.numpy())),  # of the utilisation, nats; log(E) when balanced
            "max_entropy": math.log(layer.num_experts),
            "router_entropy": layer.entropy_sum / max(layer.items, 1),  # mean per-item confidence, nats
            "dead_experts": dead_experts(shares),
            "dominant_experts": dominant_experts(shares),
            "drop_rate": None if kept is None else 1 - int(kept.sum()) / max(int(counts.sum()), 1),
            "routing_matrices": {
                factor: {"rows": recorder.rows[factor], "counts": matrix.tolist()}
                for factor, matrix in layer.matrices.items()
            },
            "nmi": {factor: normalized_mutual_information(matrix) for factor, matrix in layer.matrices.items()},
        }
    return summary


def run_info(args: Any, metrics: dict[str, Any] | None, model: Any = None) -> dict[str, Any]:
    """Facts of a run recorded beside the layers: model (default `args.model`), data, split, imgsz, val metrics."""
    return {
        "model": str(model or args.model),
        "data": str(args.data),
        "split": args.split,
        "imgsz": args.imgsz,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
    }


def write_analysis(
    recorder: RoutingRecorder, save_dir: Path, info: dict[str, Any] | None = None, plots: bool = True
) -> dict[str, Any]:
    """Write analysis.json and analysis.md (and with `plots` the PNGs) to save_dir; return the JSON contents.

    info: run facts to record beside the layers (model, data, split, imgsz, validation metrics, ...).
    """
    save_dir = Path(save_dir)
    layers = layer_summary(recorder)
    result = {
        **(info or {}),
        "images": recorder.images,
        "domains": "domain" in recorder.rows,
        "size_thresholds": {"small_below": SIZE_THRESHOLDS[0], "large_from": SIZE_THRESHOLDS[1]},
        "nmi_definition": NMI_DEFINITION,
        "layers": layers,
        "plots": write_plots(recorder, layers, save_dir) if plots and layers else [],
    }
    (save_dir / "analysis.json").write_text(json.dumps(result, indent=2))
    (save_dir / "analysis.md").write_text(markdown(result))
    for line in summary_lines(layers):
        LOGGER.info(line)
    LOGGER.info(f"Routing analysis saved to {colorstr('bold', save_dir)}")
    return result


def write_plots(recorder: RoutingRecorder, layers: dict[str, dict], save_dir: Path) -> list[str]:
    """Utilisation bars, one routing-matrix figure per factor and one routing map per layer; returns the file names."""
    files = ["utilisation.png"]
    plot_utilisation(layers, save_dir / files[0])
    for factor in recorder.rows:
        files.append(f"routing_{factor}.png")
        plot_routing_matrix(layers, factor, save_dir / files[-1])
    if recorder.examples:
        for name, layer in recorder.layers.items():
            files.append(f"routing_map_{name}.png")
            plot = plot_token_routing if layer.tokens else plot_image_routing
            plot(name, layer, recorder.thumbnails, save_dir / files[-1])
    return files


def summary_lines(layers: dict[str, dict]) -> list[str]:
    """One log line per layer: utilisation, entropy, dead/dominant experts, drop rate and NMI."""
    lines = []
    for name, s in layers.items():
        nmi = ", ".join(f"{f} {v:.3f}" for f, v in s["nmi"].items())
        drop = "" if s["drop_rate"] is None else f", drop {s['drop_rate']:.3f}"
        flags = "".join(
            f", {kind} {s[f'{kind}_experts']}" for kind in ("dead", "dominant") if s[f"{kind}_experts"]
        )
        shares = " ".join(f"{u:.2f}" for u in s["utilisation"])
        lines.append(
            f"MoE routing {name}: shares [{shares}], entropy {s['entropy']:.3f}/{s['max_entropy']:.3f}{flags}{drop}; "
            f"NMI {nmi}"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    """Short human-readable summary of an analysis result."""
    layers = result["layers"]
    factors = list(next(iter(layers.values()))["nmi"]) if layers else []
    facts = [f"- {k}: {result[k]}" for k in ("model", "data", "split", "imgsz") if k in result]
    metrics = result.get("metrics") or {}
    facts += [f"- {k}: {v:.4f}" for k, v in metrics.items() if isinstance(v, float)]
    lines = [
        "# MoE routing analysis",
        "",
        *facts,
        f"- images: {result['images']}",
        "",
        "| layer | routing | E / k | utilisation | entropy / max | dead | dominant | drop rate | "
        + " | ".join(f"NMI {f}" for f in factors)
        + " |",
        "|---" * (8 + len(factors)) + "|",
    ]
    for name, s in layers.items():
        shares = " ".join(f"{u:.2f}" for u in s["utilisation"])
        drop = "-" if s["drop_rate"] is None else f"{s['drop_rate']:.3f}"
        nmi = " | ".join(f"{s['nmi'][f]:.3f}" for f in factors)
        lines.append(
            f"| {name} | {s['routing']} | {s['experts']} / {s['top_k']} | {shares} | "
            f"{s['entropy']:.3f} / {s['max_entropy']:.3f} | {s['dead_experts'] or '-'} | "
            f"{s['dominant_experts'] or '-'} | {drop} | {nmi} |"
        )
    lines += [
        "",
        "Utilisation: share of all top-k assignments per expert. Dead: under a quarter of the fair share 1/E; "
        "dominant: over twice it (at most 0.9). Entropy of the utilisation in nats (max log E).",
        f"NMI = {result['nmi_definition']}. Per-image routing counts an image once for every class and size in it "
        "(images without objects: 'background'); token routing counts a token for the boxes its centre lies in "
        "(else 'background'; letterbox padding not counted). Sizes: box area under "
        f"{SIZE_THRESHOLDS[0]:.4f} of the image is small, from {SIZE_THRESHOLDS[1]:.4f} large (COCO's 32^2 and 96^2 "
        "px on a 640x640 image).",
    ]
    if not result["domains"]:
        lines.append("The dataset has no domain tags (domains.csv or a 'domains:' key in the data YAML).")
    if result["plots"]:
        lines += ["", "Figures: " + ", ".join(f"[{f}]({f})" for f in result["plots"])]
    return "\n".join(lines) + "\n"

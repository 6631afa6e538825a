"""Sparse upcycling (Komatsuzaki et al. 2022): start an MoE model from the dense YOLO checkpoint it extends.

Layers shared with the dense model are copied; in every MoEC3k2 the input/output convs are copied and each expert
starts as a copy of the dense C3k2's bottleneck chain `m`; routers start fresh. Routed experts that are all equal
give the dense block's output exactly when the chosen gates sum to 1, so upcycling sets `renormalize=True` (at k=1
the gate is then 1 in value while its gradient still trains the router, see `routing.route`), and refuses a shared
expert, which would add the dense output a second time. At initialisation the MoE model then predicts what the dense
model predicts. Tensors of another shape (a Detect head for another class count) stay as built, and are reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from ultralytics.nn.tasks import load_checkpoint
from ultralytics.utils import LOGGER

from .tasks import MoEModel

# An MoEC3k2 expert (or shared expert) holds the dense C3k2's `m` chain under `experts.<j>.m.` / `shared.m.`
EXPERT_KEY = re.compile(r"\.(?:experts\.\d+|shared)\.m\.")


@dataclass
class UpcycleSummary:
    """What upcycling copied: state-dict names of the MoE model, grouped by where their values came from."""

    source: str
    copied: list[str] = field(default_factory=list)  # from the dense tensor of the same name (shared layers)
    experts: list[str] = field(default_factory=list)  # expert tensors, copied from the dense block they replace
    fresh: list[str] = field(default_factory=list)  # no dense counterpart (routers): kept as initialised
    mismatched: list[str] = field(default_factory=list)  # dense counterpart of another shape: kept as initialised
    unused: list[str] = field(default_factory=list)  # dense tensors nothing was copied from
    settings: dict = field(default_factory=dict)  # MoE settings upcycling changed, {name: new value}

    def lines(self) -> list[str]:
        """Human-readable report, one line per group (module names, not every tensor)."""
        groups = {
            "copied": self.copied,
            "experts from dense blocks": self.experts,
            "fresh": self.fresh,
            "not copied (shape differs)": self.mismatched,
            "unused dense": self.unused,
        }
        out = [f"upcycled from {self.source}"]
        for label, names in groups.items():
            if names:
                modules = sorted({_module_of(n) for n in names}, key=_natural)
                shown = ", ".join(modules[:8]) + (f", ... ({len(modules)} modules)" if len(modules) > 8 else "")
                out.append(f"  {label}: {len(names)} tensors in {shown}")
        out += [f"  set {k}={v} so that the chosen gates sum to 1" for k, v in self.settings.items()]
        return out


def _module_of(name: str) -> str:
    """'model.6.experts.2.m.0.cv1.conv.weight' -> 'model.6.experts' ; 'model.23.cv3.0.2.bias' -> 'model.23.cv3'."""
    parts = name.split(".")
    return ".".join(parts[:3])


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def dense_source(name: str) -> str:
    """Name of the dense tensor that MoE tensor `name` starts from (routers have none in the dense model)."""
    return EXPERT_KEY.sub(".m.", name)


def check_alignment(moe: MoEModel, dense: nn.Module) -> None:
    """Raise unless the two models have the same layers, where an MoE block stands for the dense block it replaces."""
    moe_layers, dense_layers = list(getattr(moe, "model", [])), list(getattr(dense, "model", []))
    problem = None
    if len(moe_layers) != len(dense_layers):
        problem = f"{len(moe_layers)} layers against {len(dense_layers)}"
    else:
        for i, (m, d) in enumerate(zip(moe_layers, dense_layers)):
            expected = getattr(m, "dense", type(m))
            if type(d) is not expected:
                problem = f"layer {i} is {type(m).__name__} but the dense model's is {type(d).__name__}"
                break
    if problem:
        raise ValueError(
            f"cannot upcycle: the dense model does not match this MoE model ({problem}); use the YOLO11 checkpoint "
            f"of the same family, e.g. yolo11n.pt for visionmoe-yolo-n.yaml"
        )


def upcycle(
    moe: MoEModel, dense: nn.Module | str | Path, verbose: bool = True, source: str | None = None
) -> UpcycleSummary:
    """Initialise `moe` in place from a dense detection model (or checkpoint path) and report what was copied;
    `source` names a dense module in the report (e.g. the file it came from)."""
    source = source or (str(dense) if isinstance(dense, (str, Path)) else type(dense).__name__)
    if isinstance(dense, (str, Path)):
        dense, _ = load_checkpoint(dense)
    if isinstance(dense, MoEModel):
        raise ValueError(f"cannot upcycle from {source}: it is already an MoE model; load it with VisionMoE(path)")
    check_alignment(moe, dense)
    if moe.moe_settings.shared_expert:
        raise ValueError(
            "cannot upcycle with shared_expert=True: the shared and routed experts would both start as the dense "
            "block and add its output twice; upcycle with shared_expert=False"
        )
    summary = UpcycleSummary(source)
    dense_state = dense.float().state_dict()
    state = moe.state_dict()
    sources = {name: dense_source(name) for name in state}
    for name, src in sources.items():
        if src not in dense_state:
            summary.fresh.append(name)
        elif dense_state[src].shape != state[name].shape:
            summary.mismatched.append(name)
        else:
            (summary.experts if src != name else summary.copied).append(name)
    head = f"model.{len(moe.model) - 1}."
    wrong = [name for name in summary.mismatched if not name.startswith(head)]  # only the head may differ (nc)
    if wrong:
        raise ValueError(
            f"cannot upcycle from {source}: its layers have other widths ({wrong[0]} differs), "
            f"so it is another scale; use the YOLO11 checkpoint of this model's scale"
        )
    if not moe.moe_settings.renormalize:
        moe.yaml["moe"] = moe.moe_settings.replace(renormalize=True).to_dict()
        for block in moe.moe_blocks():
            block.router.renormalize = True
        summary.settings["renormalize"] = True
    with torch.no_grad():
        for name in summary.copied + summary.experts:
            state[name].copy_(dense_state[sources[name]])
    used = {sources[name] for name in summary.copied + summary.experts}
    summary.unused = [name for name in dense_state if name not in used]
    if verbose:
        for line in summary.lines():
            LOGGER.info(line)
    return summary

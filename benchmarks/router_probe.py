"""Diagnostic: which features can tell a data set's domain groups apart? Linear probes on pooled activations.

    python benchmarks/router_probe.py --weights best.pt --data /tmp/exp/datasets/synth-shapes [--imgsz 128]

Under `domain_loss` the routers never send an image to the blurred group's expert (benchmarks/results/recipe.md,
stop 25). This asks whether the features a router reads hold the group at all: for each MoE block's router input,
and for the outputs of the early layers, it pools the un-augmented train and val images' activations (channel
means, and means with standard deviations), fits a linear softmax probe (the router's own form) to the domain
groups of `domain_experts` on train, and prints val accuracy per group beside the trained router's own. A probe that
separates a group the router merges means the router's training is short of the signal; a probe that cannot means
the features lack it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch
from ultralytics.data.augment import LetterBox
from ultralytics.utils import YAML

from visionmoe.analysis.domains import domain_experts, load_domains
from visionmoe.nn.blocks import MoEBlock


def load_images(folder: Path, imgsz: int) -> tuple[list[str], torch.Tensor]:
    """Stems and [N, 3, imgsz, imgsz] letterboxed RGB images in [0, 1], as the validator prepares them."""
    files = sorted(folder.glob("*.jpg"))
    letterbox = LetterBox((imgsz, imgsz), auto=False)
    images = [letterbox(image=cv2.imread(str(f)))[..., ::-1] for f in files]
    batch = torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2).float() / 255
    return [f.stem for f in files], batch


def pooled(x: torch.Tensor) -> dict[str, torch.Tensor]:
    mean = x.mean((2, 3))
    return {"mean": mean, "mean_std": torch.cat((mean, x.std((2, 3))), 1)}


def collect(model: torch.nn.Module, images: torch.Tensor, early: list[int]) -> tuple[dict, dict]:
    """Pooled features per source, and each MoE router's top-1 choice, over `images`."""
    feats: dict[str, list[torch.Tensor]] = {}
    choices: dict[str, list[torch.Tensor]] = {}
    hooks = []

    def keep(name: str, x: torch.Tensor) -> None:
        for kind, v in pooled(x.float()).items():
            feats.setdefault(f"{name} {kind}", []).append(v)

    def keep_router(name: str):
        def hook(router, inputs, routing):
            keep(f"{name} router", inputs[0])  # the block's own features, without any router_context map
            choices.setdefault(f"{name} router", []).append(routing.indices[:, 0])

        return hook

    for i in early:
        hooks.append(model.model[i].register_forward_hook(lambda m, a, out, i=i: keep(f"model.{i}", out)))
    hooks.append(model.model[0].register_forward_pre_hook(lambda m, a: keep("image", a[0])))
    for name, block in model.named_modules():
        if isinstance(block, MoEBlock):
            hooks.append(block.router.register_forward_hook(keep_router(name)))
    with torch.no_grad():
        for chunk in images.split(32):
            model(chunk)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in feats.items()}, {k: torch.cat(v) for k, v in choices.items()}


def probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, groups: int) -> torch.Tensor:
    """Val predictions of a linear softmax probe fitted on standardised train features."""
    mu, sd = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    xt, xv = (train_x - mu) / sd, (val_x - mu) / sd
    torch.manual_seed(0)
    linear = torch.nn.Linear(xt.shape[1], groups)
    opt = torch.optim.Adam(linear.parameters(), lr=0.01, weight_decay=1e-4)
    for _ in range(500):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(linear(xt), train_y).backward()
        opt.step()
    return linear(xv).argmax(1)


def per_group(pred: torch.Tensor, target: torch.Tensor, groups: int) -> str:
    cells = [f"{(pred[target == g] == g).float().mean():.2f}" for g in range(groups)]
    return f"{(pred == target).float().mean():.2f}  " + " ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="a synth set's folder (images/, domains.csv, YAML)")
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--early", type=int, nargs="+", default=[0, 1, 2, 4])
    args = parser.parse_args()
    model = torch.load(args.weights, map_location="cpu", weights_only=False)["model"].float().eval()
    data = {**YAML.load(next(args.data.glob("*.yaml"))), "path": str(args.data)}
    tags = load_domains(data)
    experts = domain_experts(data, tags, model.moe_settings.experts)
    groups = max(experts.values()) + 1
    splits = {}
    for split in ("train", "val"):
        stems, images = load_images(args.data / "images" / split, args.imgsz)
        target = torch.tensor([experts[tags[s]] for s in stems])
        splits[split] = (target, *collect(model, images, args.early))
    (train_y, train_f, _), (val_y, val_f, val_choice) = splits["train"], splits["val"]
    print(f"val accuracy over the {groups} domain groups: all, then per group 0..{groups - 1}")
    for name, choice in val_choice.items():
        print(f"  {name + ' (trained, top-1)':<40} {per_group(choice, val_y, groups)}")
    for name in train_f:
        print(f"  {name + ' probe':<40} {per_group(probe(train_f[name], train_y, val_f[name], groups), val_y, groups)}")


if __name__ == "__main__":
    main()

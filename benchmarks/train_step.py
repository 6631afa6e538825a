"""Training-step cost of the YOLO-MoE against dense YOLO11 at the same active FLOPs, per MoE training dispatch.

One step is forward, the detection loss (plus the MoE aux loss, which `MoEModel.loss` adds) and backward, on a batch of
synth-shapes images with their labels, fresh weights in train mode. Steps are timed in interleaved rounds (one step of
every model per round), so load from other processes hits all alike. Target (issue 10): MoE / dense <= 1.2.

    python benchmarks/train_step.py [--scale n] [--experts 4] [--top-k 1] [--imgsz 128] [--batch 16] [--rounds 15]
    python benchmarks/train_step.py --threads 1        # one thread: no OpenMP barriers stalled by other load
    python benchmarks/train_step.py --profile batched   # torch.profiler table of one dispatch's step and the dense one
    python benchmarks/train_step.py --weights best.pt   # a trained MoE: balanced routing, as in training
    python benchmarks/train_step.py --weights best.pt --blocks   # each MoE block's forward + backward on its inputs
    python benchmarks/train_step.py --tied --domain   # a dense-warmup step whose routers learn the images' domains
    python benchmarks/train_step.py --tied --domain --detach-router warmup   # ... with the routers detached
    python benchmarks/train_step.py --split residual --domain   # a routed step after a residual split

`--tied` times the MoE during its dense warmup (one expert per block, as the default recipe's first half of the epochs);
`--domain` gives the batch each image's domain expert (image i -> expert i mod E), so that the routers train under
`domain_loss` as they do on data that tags domains (the default on synth-shapes). `--split copy|residual` times a
routed step just after the dense warmup ends, with the experts split as copies or as residual experts (deltas on
expert 0, `residual_experts`); with `--domain` the images spread over the experts as in training.

`--blocks` times every MoE block alone: tied (expert 0 on every image, the dense block's cost), each dispatch, and
`segmented`, a prototype that sorts the images by expert and runs each pointwise or small-map conv as one ragged
`torch.nn.functional.grouped_mm` over the experts' stacked weights (larger maps: one conv per expert), with BatchNorm
by segment statistics as in `batched`.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Sequence
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel, load_checkpoint

from visionmoe.data.synth import CLASSES, render
from visionmoe.nn.batched import BatchedRun, conv_output_size, matmul_columns
from visionmoe.nn.blocks import STATIC_DISPATCHES, Dispatch, MoEBlock
from visionmoe.nn.dispatch import _expand_gates, used_experts
from visionmoe.nn.routing import Routing
from visionmoe.nn.tasks import build_model
from visionmoe.utils import allowed_cpus
from visionmoe.utils.latency import interleaved_median_ms

TRAIN_DISPATCHES = tuple(d for d in get_args(Dispatch) if d not in STATIC_DISPATCHES)


def synth_batch(n: int, imgsz: int) -> dict[str, torch.Tensor]:
    """n synth-shapes images with their labels, collated as Ultralytics' trainer hands them to the loss."""
    imgs, cls, boxes, idx = [], [], [], []
    for i in range(n):
        img, labels, _ = render(i, imgsz=imgsz)
        imgs.append(torch.from_numpy(np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))).float() / 255)
        cls.append(torch.from_numpy(labels[:, :1]).float())
        boxes.append(torch.from_numpy(labels[:, 1:]).float())
        idx.append(torch.full((len(labels),), i, dtype=torch.float))
    return {"img": torch.stack(imgs), "cls": torch.cat(cls), "bboxes": torch.cat(boxes), "batch_idx": torch.cat(idx)}


def train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], dispatch: str | None = None) -> None:
    """One forward, loss and backward; `dispatch` sets every MoE block's dispatch first."""
    for block in model.moe_blocks() if dispatch else ():
        block.dispatch = dispatch
    model.zero_grad(set_to_none=True)
    loss, _ = model.loss(batch)
    loss.sum().backward()


class SegmentedRun(BatchedRun):
    """BatchedRun over pairs sorted by expert (`index` non-decreasing), whose convs run per expert segment."""

    def conv(self, convs: Sequence[torch.nn.Conv2d], x: torch.Tensor) -> torch.Tensor:
        c = convs[0]
        m, _, h, w = x.shape
        cols = matmul_columns(c, x)  # [M, c1*kh*kw, L], L output pixels per image
        if cols is None:
            return torch.cat([conv(xs) for conv, xs in zip(convs, x.split(self.counts))])
        pixels = cols.shape[2]
        weight = torch.stack([conv.weight.flatten(1).t() for conv in convs])  # [U, c1*kh*kw, c2]
        offsets = (torch.tensor(self.counts).cumsum(0) * pixels).to(torch.int32)
        y = F.grouped_mm(cols.transpose(1, 2).reshape(m * pixels, -1), weight, offs=offsets)  # [M*L, c2]
        if c.bias is not None:
            y = y + torch.stack([conv.bias for conv in convs]).index_select(0, self.index.repeat_interleave(pixels))
        return y.view(m, pixels, -1).transpose(1, 2).reshape(m, -1, *conv_output_size(c, h, w))


def segmented_mixture(block: MoEBlock, x: torch.Tensor, experts: Sequence[torch.nn.Module], routing: Routing):
    """`sparse_mixture` through `SegmentedRun` (the prototype `--blocks` times as 'segmented')."""
    n, k = routing.indices.shape
    flat = routing.indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts, used, position = used_experts(flat, len(experts))
    run = SegmentedRun(position[flat[order]], [counts[e] for e in used])
    y = run([experts[e] for e in used], x[order // k])
    y = y * _expand_gates(routing.gates.reshape(-1)[order], y)
    return y.new_zeros((n, *y.shape[1:])).index_add(0, order // k, y)


def _detached(x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """A block input (a map, or [map, router context]) cut from the graph that made it."""
    return [t.detach() for t in x] if isinstance(x, list) else x.detach()


def time_blocks(moe: torch.nn.Module, img: torch.Tensor, dispatches: list[str], rounds: int) -> None:
    """Median forward + backward of each MoE block on its own inputs: tied, each dispatch, and 'segmented'."""
    blocks = list(moe.moe_blocks())
    inputs: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda _, args: inputs.append(_detached(args[0]))) for b in blocks]
    with torch.no_grad():
        moe(img)
    for hook in hooks:
        hook.remove()

    def step(block: MoEBlock, x: torch.Tensor, mode: str) -> None:
        block.tied = mode == "tied"
        block.dispatch = "sparse" if mode in ("tied", "segmented") else mode
        if mode == "segmented":
            block.mixture = types.MethodType(segmented_mixture, block)
        y = block(x)
        y.backward(torch.ones_like(y))
        block.tied = False
        block.__dict__.pop("mixture", None)

    modes = ["tied", *dispatches] + (["segmented"] if hasattr(F, "grouped_mm") else [])  # torch >= 2.9
    totals = dict.fromkeys(modes, 0.0)
    for i, (block, x) in enumerate(zip(blocks, inputs)):
        for t in x if isinstance(x, list) else [x]:
            t.requires_grad_(True)
        ms = interleaved_median_ms({mode: (lambda mode=mode: step(block, x, mode)) for mode in modes}, rounds)
        counts = torch.bincount(block.routing.indices.flatten(), minlength=len(block.experts)).tolist()
        shape = list((x[0] if isinstance(x, list) else x).shape)
        print(f"{block.router.label:>9} {str(shape):>18} images per expert {counts}: "
              + "  ".join(f"{mode} {value:6.2f}" for mode, value in ms.items()))  # fmt: skip
        for mode, value in ms.items():
            totals[mode] += value
    print("all blocks, ms (x tied): " + "  ".join(f"{m} {v:.1f} ({v / totals['tied']:.2f})" for m, v in totals.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="n")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=allowed_cpus(), help="torch threads (default: all allowed)")
    parser.add_argument("--dispatches", nargs="+", default=[d for d in TRAIN_DISPATCHES if d != "dense"],
                        choices=TRAIN_DISPATCHES, help="MoE training dispatches to time ('dense' runs every expert)")
    parser.add_argument("--profile", choices=TRAIN_DISPATCHES, help="profile this dispatch and the dense model")
    parser.add_argument("--blocks", action="store_true", help="time each MoE block alone (see above)")
    parser.add_argument("--tied", action="store_true", help="tie every per-image MoE block (dense warmup)")
    parser.add_argument("--domain", action="store_true", help="route and teach the routers by a domain per image")
    parser.add_argument("--split", choices=("copy", "residual"), help="tie, then split every per-image MoE block")
    parser.add_argument("--detach-router", choices=("false", "true", "warmup"),
                        help="MoE setting detach_router of a fresh MoE (default: the model YAML's)")
    parser.add_argument("--weights", help="a trained MoE checkpoint, whose routers spread images as training does "
                        "(fresh routers send most images to one or two experts)")
    args = parser.parse_args(argv)  # fmt: skip
    torch.set_num_threads(args.threads)
    hyp = get_cfg()  # the default loss gains (box, cls, dfl), as the trainer passes them
    torch.manual_seed(0)
    dense = DetectionModel(f"yolo11{args.scale}.yaml", nc=len(CLASSES), verbose=False).train()
    torch.manual_seed(0)
    if args.weights:
        moe = load_checkpoint(args.weights)[0].float().train().requires_grad_(True)
        for block in moe.moe_blocks():
            if block.tied:  # a checkpoint saved during the dense warmup
                block.split()
    else:
        settings = {"experts": args.experts, "top_k": args.top_k}
        if args.detach_router:
            settings["detach_router"] = {"false": False, "true": True}.get(args.detach_router, args.detach_router)
        moe = build_model(f"visionmoe-yolo-{args.scale}.yaml", nc=len(CLASSES), verbose=False, **settings).train()
    dense.args = moe.args = hyp
    batch = synth_batch(args.batch, args.imgsz)
    if args.domain:
        batch["domain_expert"] = torch.arange(args.batch) % moe.moe_settings.experts
    if args.tied or args.split:
        for block in moe.moe_blocks():
            block.tie()
            if args.split:
                block.split(residual=args.split == "residual")

    if args.blocks:
        print(f"forward + backward per MoE block, ms, median of {args.rounds} interleaved rounds, "
              f"{torch.get_num_threads()} threads")  # fmt: skip
        time_blocks(moe, batch["img"], args.dispatches, args.rounds)
        return

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        profiled = {args.profile: lambda: train_step(moe, batch, args.profile)}
        profiled["dense"] = lambda: train_step(dense, batch)
        for name, step in profiled.items():
            for _ in range(3):
                step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    step()
            print(f"\n== {name} (5 steps) ==")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return

    steps = {"dense": lambda: train_step(dense, batch)}
    steps.update({f"moe {d}": (lambda d=d: train_step(moe, batch, d)) for d in args.dispatches})
    ms = interleaved_median_ms(steps, args.rounds)
    if args.tied:
        print("MoE blocks tied (dense warmup): one expert computes per block"
              + (", the routers learn the domains" if args.domain else ", the routers idle"))  # fmt: skip
    else:
        used = [len(block.routing.indices.unique()) for block in moe.moe_blocks()]
        print(f"experts used per MoE block on this batch: {used}")
    print(f"train step: forward + loss + backward, visionmoe-yolo-{args.scale} (E={args.experts}, k={args.top_k}) vs "
          f"yolo11{args.scale}, imgsz {args.imgsz}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds")  # fmt: skip
    for name, value in ms.items():
        ratio = "" if name == "dense" else f"   MoE/dense {value / ms['dense']:.3f} (target <= 1.2)"
        print(f"{name:>14}: {value:8.1f} ms{ratio}")


if __name__ == "__main__":
    main()

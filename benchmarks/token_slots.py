"""What Batch Prioritized Routing costs in an exported token-routed layer: `token_slots` alone, ONNX Runtime CPU.

    python benchmarks/token_slots.py [--imgsz 640] [--experts 4 16] [--factor 2.0] [--rounds 30] [--batch 16]

Exports `visionmoe.nn.routing.token_slots` for one image's tokens (T = (imgsz/16)^2 at the ViT's patch stride, top-1)
with tokens queued in raster order and with BPR (queued by descending gate), and times both in one process, in
interleaved rounds, with ONNX Runtime spinning off (visionmoe/utils/latency.py). BPR adds one sort over T tokens
(ONNX TopK); the MoE layer around it (expert matmuls over E x C x D buffers) costs tens of milliseconds at 640 px.
Then times the same in eager PyTorch for a training batch of `--batch` images, where BPR runs in every forward.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

from visionmoe.nn.routing import expert_capacity, token_slots
from visionmoe.utils import allowed_cpus
from visionmoe.utils.latency import interleaved_median_ms, ort_session

PATCH = 16  # the ViT's token stride


class Slots(nn.Module):
    """`token_slots` as a module with fixed E, capacity and queue order, so that it exports."""

    def __init__(self, num_experts: int, capacity: int, bpr: bool):
        super().__init__()
        self.num_experts, self.capacity, self.bpr = num_experts, capacity, bpr

    def forward(self, indices: torch.Tensor, gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return token_slots(indices, gates, self.num_experts, self.capacity, self.bpr)


def print_table(title: str, times: dict[str, float], experts: list[int]) -> None:
    """One row per E: raster-order and BPR milliseconds (keys "E-False", "E-True") and their difference."""
    print(title)
    print(f"{'experts':>7} {'raster ms':>10} {'BPR ms':>8} {'BPR - raster':>13}")
    for e in experts:
        raster, bpr = times[f"{e}-False"], times[f"{e}-True"]
        print(f"{e:>7} {raster:10.3f} {bpr:8.3f} {bpr - raster:13.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--factor", type=float, default=2.0, help="eval capacity factor")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16, help="images per eager call (a training batch)")
    args = parser.parse_args()
    tokens = (args.imgsz // PATCH) ** 2
    gates = torch.rand(1, tokens, 1)
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for e in args.experts:
            indices = torch.randint(0, e, (1, tokens, 1))
            feed = {"indices": indices.numpy(), "gates": gates.numpy()}
            capacity = expert_capacity(tokens, e, 1, args.factor)
            for bpr in (False, True):
                path = Path(tmp) / f"slots_e{e}_bpr{int(bpr)}.onnx"
                torch.onnx.export(Slots(e, capacity, bpr), (indices, gates), path, input_names=list(feed),
                                  opset_version=17, dynamo=False)  # fmt: skip
                session = ort_session(path)
                used = {i.name: feed[i.name] for i in session.get_inputs()}  # raster order never reads the gates
                runners[f"{e}-{bpr}"] = lambda s=session, f=used: s.run(None, f)
        times = interleaved_median_ms(runners, runs=args.rounds, warmup=3)
    runners.clear()  # no ONNX Runtime session stays alive beside the eager timing
    eager = {}
    for e in args.experts:
        indices, batch_gates = torch.randint(0, e, (args.batch, tokens, 1)), torch.rand(args.batch, tokens, 1)
        capacity = expert_capacity(tokens, e, 1, args.factor)
        for bpr in (False, True):
            eager[f"{e}-{bpr}"] = lambda i=indices, g=batch_gates, e=e, c=capacity, b=bpr: token_slots(i, g, e, c, b)
    torch.set_num_threads(allowed_cpus())
    with torch.no_grad():
        eager_times = interleaved_median_ms(eager, runs=args.rounds, warmup=3)
    print_table(
        f"token_slots for one image, T={tokens} tokens (imgsz {args.imgsz}), top-1, capacity factor {args.factor:g}, "
        f"ONNX Runtime CPU ({allowed_cpus()} threads), median of {args.rounds} interleaved rounds",
        times,
        args.experts,
    )
    print_table(f"the same in eager PyTorch ({torch.get_num_threads()} threads) for a batch of {args.batch} images",
                eager_times, args.experts)  # fmt: skip


if __name__ == "__main__":
    main()

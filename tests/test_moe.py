"""Sparse MoE blocks: equal to the dense reference, batch invariant, sparse, trainable, DDP-safe."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from ultralytics.nn.modules import C3k2

from visionmoe.nn import MoEC3k2, MoESettings


def make_block(seed: int = 0, **settings) -> MoEC3k2:
    torch.manual_seed(seed)
    block = MoEC3k2.from_dense(C3k2(16, 24, n=2, c3k=True), MoESettings(**settings))
    # spread router logits so that different images pick different experts
    torch.nn.init.normal_(block.router.gate[-1].weight, std=3.0)
    return block


def images(n: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, 8, 8, generator=g) + 3 * torch.randn(n, 16, 1, 1, generator=g)  # per-image channel offsets


@pytest.mark.parametrize(
    "settings",
    [{"top_k": 1}, {"top_k": 2}, {"top_k": 2, "renormalize": True}, {"top_k": 1, "shared_expert": True},
     {"top_k": 3, "experts": 6, "router": "mlp"}, {"router_input": "mean_std"}, {"router_input": "max"}],
)  # fmt: skip
def test_sparse_equals_dense_reference(settings):
    block = make_block(**settings).eval()
    x = images()
    with torch.no_grad():
        sparse = block(x)
        chosen = block.routing.indices
        block.dispatch = "dense"
        dense = block(x)
    assert torch.equal(block.routing.indices, chosen)
    assert len(chosen.unique()) > 1, "inputs must reach several experts for the comparison to mean anything"
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=0)


def test_output_of_a_sample_does_not_depend_on_the_batch():
    block = make_block(top_k=2).eval()
    x = images()
    with torch.no_grad():
        batched = block(x)
        single = torch.cat([block(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_only_chosen_experts_run_on_only_their_samples():
    block = make_block(top_k=1, experts=4).eval()
    seen = [0] * 4
    for j, expert in enumerate(block.experts):
        expert.register_forward_hook(lambda m, inp, out, j=j: seen.__setitem__(j, seen[j] + inp[0].shape[0]))
    with torch.no_grad():
        block(images())
    counts = torch.bincount(block.routing.indices.flatten(), minlength=4).tolist()
    assert seen == counts  # an unchosen expert never runs, a chosen one sees exactly its samples
    assert 0 in counts or sum(counts) == 8


def test_gradients_reach_router_and_chosen_experts_only():
    block = make_block(top_k=2, experts=6).train()
    x = images(2)  # 4 assignments over 6 experts: at least 2 stay idle
    block(x).square().mean().backward()
    chosen = set(block.routing.indices.flatten().tolist())
    assert block.router.gate[-1].weight.grad is not None and block.router.gate[-1].weight.grad.abs().sum() > 0
    for j, expert in enumerate(block.experts):
        grads = [p.grad for p in expert.parameters()]
        if j in chosen:
            assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
        else:
            assert all(g is None for g in grads)
    assert 1 < len(chosen) < 6


def test_top1_gate_scales_output_so_router_learns():
    block = make_block(top_k=1).train()
    block(images(4)).sum().backward()
    assert block.router.gate[-1].weight.grad.abs().sum() > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        block = make_block(top_k=1, experts=4)
        torch.nn.init.zeros_(block.router.gate[-1].weight)  # equal logits: every image picks expert 0 ...
        with torch.no_grad():
            block.router.gate[-1].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # ... so experts 1-3 sit idle
        model = DistributedDataParallel(block, find_unused_parameters=False)
        x = images(2, seed=10 + rank)  # each rank its own data
        for _ in range(3):  # DDP reports unused parameters on the iteration after they happen
            model.zero_grad()
            model(x).square().mean().backward()
        idle = set(range(4)) - set(block.routing.indices.flatten().tolist())
        grad = block.cv1.conv.weight.grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.MAX)
        queue.put((rank, sorted(idle), torch.equal(grad, block.cv1.conv.weight.grad)))
    finally:
        dist.destroy_process_group()


def test_ddp_with_idle_experts_gloo_two_processes():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(_free_port(), queue), nprocs=2, start_method="spawn", join=True)
    results = sorted(queue.get(timeout=60) for _ in range(2))
    for rank, idle, synced in results:
        assert idle == [1, 2, 3], f"rank {rank}: the test needs idle experts, got idle {idle}"
        assert synced, f"rank {rank}: gradients were not all-reduced"


def test_tied_block_runs_one_expert_and_splits_without_changing_its_output():
    block = make_block(top_k=2, experts=4, renormalize=True).train()
    x = images()
    calls = [0] * 4
    for j, expert in enumerate(block.experts):
        expert.register_forward_hook(lambda *_, j=j: calls.__setitem__(j, calls[j] + 1))
    block.tie()
    tied = block(x)
    assert block.routing is None and calls == [1, 0, 0, 0]  # one expert for the whole batch, no router
    tied.sum().backward()
    assert block.router.gate[-1].weight.grad is None and block.experts[1].m[0].cv1.conv.weight.grad is None
    block.eval()
    with torch.no_grad():
        tied_eval = block(x)
        pairs = block.split()
        split = block(x)
    assert not block.tied and len(pairs) == 3 * len(list(block.experts[0].parameters()))
    assert len(block.routing.indices.unique()) > 1, "split experts must be reached through the router"
    for a, b in zip(block.experts[0].state_dict().values(), block.experts[3].state_dict().values()):
        assert torch.equal(a, b)  # weights and BatchNorm statistics alike
    torch.testing.assert_close(split, tied_eval, atol=1e-5, rtol=0)


def test_residual_split_keeps_the_output_trains_the_base_on_every_image_and_folds_for_inference():
    block = make_block(experts=4, renormalize=True).eval()
    block.tie()
    x = images()
    with torch.no_grad():
        tied = block(x)
        assert block.split(residual=True) == []  # the deltas start with fresh optimizer state
        split = block(x)
    torch.testing.assert_close(split, tied, atol=1e-5, rtol=0)
    assert block.residual and all(p.abs().sum() == 0 for e in block.experts[1:] for p in e.parameters())
    assert len(block.routing.indices.unique()) > 1, "the test needs images routed to delta experts"
    with torch.no_grad():  # deltas with values, as training gives them
        for expert in block.experts[1:]:
            for p in expert.parameters():
                p.normal_(0, 0.01)
    block.train()
    bias = block.router.gate[-1].bias
    bias.data, kept_bias = torch.tensor([0.0, 1e3, 0.0, 0.0]), bias.data  # every image to expert 1
    block(x).sum().backward()
    bias.data = kept_bias
    assert block.routing.indices.unique().tolist() == [1]
    grads = [expert.m[0].cv1.conv.weight.grad for expert in block.experts]
    assert grads[0] is not None and grads[0].abs().sum() > 0  # the base learns from expert 1's images too
    assert grads[1] is not None and grads[1].abs().sum() > 0 and grads[2] is None and grads[3] is None
    with pytest.raises(ValueError, match="residual experts run with 'sparse'"):
        block.set_dispatch("batched")(x)
    block.set_dispatch("sparse").eval()
    with torch.no_grad():
        residual = block(x)
        reference = block.set_dispatch("dense")(x)
        base, delta = [p.clone() for p in block.experts[0].parameters()], list(block.experts[2].parameters())
        summed = [b + d for b, d in zip(base, delta)]
        static = block.set_dispatch("gather")(x)  # export forms fold the experts first
    torch.testing.assert_close(reference, residual, atol=1e-5, rtol=0)
    torch.testing.assert_close(static, residual, atol=1e-4, rtol=0)
    assert not block.residual
    for folded, expected in zip(block.experts[2].parameters(), summed):
        torch.testing.assert_close(folded, expected)


def test_fusing_a_model_folds_its_residual_experts_first():
    from visionmoe.nn.tasks import build_model

    model = build_model("visionmoe-yolo-n.yaml", verbose=False, residual_experts=True, router_context=None)
    model.eval()
    for block in model.moe_blocks():
        block.tie()
        block.split(residual=True)
        with torch.no_grad():
            for expert in block.experts[1:]:
                for p in expert.parameters():
                    p.normal_(0, 0.02)
            torch.nn.init.normal_(block.router.gate[-1].weight, std=3.0)
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unfused = model(x)[0]
        fused = model.fuse(verbose=False)(x)[0]
    assert not any(block.residual for block in model.moe_blocks())
    torch.testing.assert_close(fused, unfused, atol=1e-3, rtol=1e-3)


def test_tied_experts_need_renormalized_gates():
    with pytest.raises(ValueError, match="renormalize=True"):
        MoESettings(dense_warmup=0.3)
    with pytest.raises(ValueError, match="0 <= dense_warmup < 1"):
        MoESettings(dense_warmup=1.0, renormalize=True)
    with pytest.raises(ValueError, match="renormalize=True"):
        make_block().tie()


def test_static_form_of_a_tied_block_splits_it_first():
    block = make_block(renormalize=True).eval()
    block.tie()
    x = images()
    with torch.no_grad():
        tied = block(x)
        block.set_dispatch("gather")
        static = block(x)
    assert not block.tied and len(block.routing.indices.unique()) > 1
    torch.testing.assert_close(static, tied, atol=1e-4, rtol=0)


def test_frozen_expert_norm_uses_running_statistics_in_training():
    block = make_block(renormalize=True).train()
    x = images()
    block.freeze_norm()
    block.train()  # what the trainer calls every epoch
    norms = [m for m in block.experts.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms) and block.cv1.bn.training
    stats = [m.running_mean.clone() for m in norms]
    trained = block(x)
    assert all(torch.equal(m.running_mean, s) for m, s in zip(norms, stats))
    trained.sum().backward()
    chosen = block.experts[int(block.routing.indices.flatten()[0])]
    chosen_norms = [m for m in chosen.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.weight.grad is not None for m in chosen_norms)  # scale and shift still learn
    with pytest.raises(ValueError, match="needs dense_warmup > 0"):
        MoESettings(freeze_expert_norm=True, renormalize=True)


def test_domain_loss_auto_routes_by_domain_only_where_the_data_and_the_model_allow():
    from visionmoe.nn.routing import domain_loss
    from visionmoe.nn.settings import AUTO_DOMAIN_LOSS, resolve_domain_loss
    from visionmoe.nn.tasks import build_model

    assert MoESettings().domain_loss == "auto"
    assert build_model("visionmoe-yolo-n.yaml", verbose=False, top_k=2).moe_settings.domain_loss == "auto"
    model = build_model("visionmoe-yolo-n.yaml", verbose=False).train()  # auto: the trainer passes domain experts
    model(torch.rand(2, 3, 64, 64))  # only where the data tags domains, and the routers then learn them
    experts = torch.tensor([1, 3])
    ce = sum(domain_loss(block.routing.logits, experts) for block in model.moe_blocks())
    torch.testing.assert_close(model.aux_loss(experts) - model.aux_loss(), AUTO_DOMAIN_LOSS * ce)
    fits = MoESettings(renormalize=True)
    assert resolve_domain_loss(fits, tagged=True).domain_loss == AUTO_DOMAIN_LOSS
    assert resolve_domain_loss(fits, tagged=False).domain_loss == 0
    assert resolve_domain_loss(MoESettings(experts=4, top_k=2, renormalize=True), tagged=True).domain_loss == 0
    assert resolve_domain_loss(MoESettings(renormalize=False), tagged=True).domain_loss == 0
    # a number stays: on untagged data the trainer refuses it (tests/test_trainer.py)
    assert resolve_domain_loss(MoESettings(domain_loss=0.3, renormalize=True), tagged=False).domain_loss == 0.3
    assert build_model("visionmoe-vit-t.yaml", verbose=False).moe_settings.domain_loss == 0  # routes tokens only
    with pytest.raises(ValueError, match="domain_loss='always', use a number >= 0 or 'auto'"):
        MoESettings(domain_loss="always")


def test_domain_routing_sends_tagged_training_images_to_their_expert_and_teaches_the_routers():
    from types import SimpleNamespace

    from ultralytics.cfg import DEFAULT_CFG

    from visionmoe.nn.routing import domain_loss
    from visionmoe.nn.tasks import build_model

    with pytest.raises(ValueError, match="domain_loss=0.1 needs top_k=1 and renormalize=True"):
        MoESettings(domain_loss=0.1, experts=4, top_k=2, renormalize=True)
    with pytest.raises(ValueError, match="domain_loss=0.1 applies to per-image MoE blocks"):
        build_model("visionmoe-vit-t.yaml", verbose=False, domain_loss=0.1, renormalize=True)
    model = build_model("visionmoe-yolo-n.yaml", verbose=False, domain_loss=0.1)
    model.args = SimpleNamespace(**vars(DEFAULT_CFG))  # the loss weights a trainer would attach
    empty = {"img": torch.rand(3, 3, 64, 64), "batch_idx": torch.zeros(0), "cls": torch.zeros(0, 1),
             "bboxes": torch.zeros(0, 4)}  # fmt: skip
    blocks = model.moe_blocks()
    model.train().loss(empty)
    own = blocks[0].routing.indices[1, 0].item()
    experts = torch.tensor([2, -1, 0])
    _, items = model.loss({**empty, "domain_expert": experts})
    for block in blocks:
        assert block.routing.indices[[0, 2], 0].tolist() == [2, 0] and block.assigned is None  # for that forward only
    # the untagged image keeps its router's choice (in the first block; later ones see features that the batch
    # statistics of BatchNorm tie to where the other images went)
    assert blocks[0].routing.indices[1, 0] == own
    ce = sum(domain_loss(block.routing.logits, experts) for block in blocks)
    torch.testing.assert_close(model.aux_loss(experts) - model.aux_loss(), 0.1 * ce)
    torch.testing.assert_close(items["moe"], model.aux_loss(experts))
    chosen = []
    with torch.no_grad():
        for batch in ({**empty, "domain_expert": experts}, empty):  # validation: the routers decide alone
            model.eval().loss(batch)
            chosen.append([block.routing.indices[:, 0].tolist() for block in blocks])
    assert chosen[0] == chosen[1]

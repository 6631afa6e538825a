"""The batched per-image dispatch equals the per-expert loop (train) and the dense reference (eval), gradients too."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn
from ultralytics.nn.modules import C3k2

from visionmoe.nn import MoEC3k2, MoESettings
from visionmoe.nn.dispatch import batched_mixture


def make_block(c3k: bool, seed: int = 0, **settings) -> MoEC3k2:
    torch.manual_seed(seed)
    block = MoEC3k2.from_dense(C3k2(16, 24, n=2, c3k=c3k), MoESettings(**settings))
    torch.nn.init.normal_(block.router.gate[-1].weight, std=3.0)  # spread logits: images pick different experts
    for bn in (m for m in block.experts.modules() if isinstance(m, nn.BatchNorm2d)):
        nn.init.uniform_(bn.weight, 0.5, 1.5)  # non-trivial affine and running statistics
        nn.init.normal_(bn.bias, std=0.1)
        bn.running_mean.normal_(std=0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return block


def images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, size, size, generator=g) + 3 * torch.randn(n, 16, 1, 1, generator=g)


def run(block: MoEC3k2, dispatch: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Output, input gradient and parameter gradients (None where a parameter got none) of one forward/backward."""
    block.dispatch = dispatch
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = block(x)
    y.square().mean().backward()
    return y.detach(), x.grad, {name: p.grad for name, p in block.named_parameters()}


# (settings, batch, map size): 8x8 maps run 3x3 convs as grouped convs, 4x4 ones as a batched matmul
CONFIGS = [
    ({"top_k": 1, "experts": 4}, 8, 8),
    ({"top_k": 2, "experts": 4}, 8, 4),
    ({"top_k": 2, "experts": 6, "renormalize": True}, 2, 8),  # 4 assignments over 6 experts: some sit idle
    ({"top_k": 3, "experts": 6, "router": "mlp", "shared_expert": True}, 4, 4),
]


@pytest.mark.parametrize("c3k", [True, False], ids=["C3k", "Bottleneck"])
@pytest.mark.parametrize("settings,n,size", CONFIGS)
def test_batched_equals_loop_in_training(settings, n, size, c3k):
    """BatchNorm normalises over each expert's own images and updates only the chosen experts' running statistics."""
    sparse, batched = make_block(c3k, **settings).train(), make_block(c3k, **settings).train()
    x = images(n, size)
    y_ref, gx_ref, grads_ref = run(sparse, "sparse", x)
    y, gx, grads = run(batched, "batched", x)
    assert torch.equal(batched.routing.indices, sparse.routing.indices)
    chosen = set(batched.routing.indices.flatten().tolist())
    assert len(chosen) > 1, "inputs must reach several experts for the comparison to mean anything"
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-6, rtol=1e-4)
    for name, g_ref in grads_ref.items():
        if g_ref is None:  # an idle expert: no gradient at all, so optimizers leave it alone (no decay, no momentum)
            assert grads[name] is None, name
        else:
            torch.testing.assert_close(grads[name], g_ref, atol=1e-6, rtol=1e-4, msg=name)
    assert grads["router.gate.0.weight"].abs().sum() > 0
    for j, expert in enumerate(batched.experts):
        assert all((p.grad is not None) == (j in chosen) for p in expert.parameters()), f"expert {j}"
    for (name, buf), buf_ref in zip(batched.named_buffers(), sparse.buffers()):
        torch.testing.assert_close(buf, buf_ref, atol=1e-6, rtol=1e-5, msg=name)  # running stats, batches tracked
    idle = [j for j in range(len(batched.experts)) if j not in chosen]
    for j in idle:
        bn = batched.experts[j].m[0].cv1.bn
        assert int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize("c3k", [True, False], ids=["C3k", "Bottleneck"])
@pytest.mark.parametrize("settings,n,size", CONFIGS)
def test_batched_equals_dense_reference_in_eval(settings, n, size, c3k):
    """With running statistics every expert is per image, so the dense reference (all experts, weight 0) applies."""
    dense, batched = make_block(c3k, **settings).eval(), make_block(c3k, **settings).eval()
    x = images(n, size)
    y_ref, gx_ref, grads_ref = run(dense, "dense", x)
    y, gx, grads = run(batched, "batched", x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-6, rtol=1e-4)
    for name, g_ref in grads_ref.items():
        if grads[name] is None:  # unchosen expert: the dense reference weights it 0, so its gradient is 0 there
            assert name.startswith("experts.") and not g_ref.any(), name
        else:
            torch.testing.assert_close(grads[name], g_ref, atol=1e-6, rtol=1e-4, msg=name)
    assert any(g is None for g in grads.values()) == (len(batched.routing.indices.unique()) < len(batched.experts))


def test_idle_experts_join_with_zero_gradient_under_ddp():
    """DDP needs a gradient for every parameter: idle experts get an exact zero, as with the sparse loop."""
    block = make_block(True, top_k=1, experts=4).train()
    torch.nn.init.zeros_(block.router.gate[-1].weight)
    with torch.no_grad():
        block.router.gate[-1].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # every image picks expert 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        _, _, grads = run(block, "batched", images(4, 4))
    finally:
        dist.destroy_process_group()
    for j, expert in enumerate(block.experts):
        for p in expert.parameters():
            assert p.grad is not None and (p.grad.abs().sum() > 0) == (j == 0)


def test_unknown_expert_module_is_refused():
    experts = [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4)) for _ in range(2)]
    with pytest.raises(TypeError, match="GroupNorm has no batched form"):
        batched_mixture(torch.randn(2, 4, 4, 4), experts, torch.tensor([[0], [1]]), torch.ones(2, 1))

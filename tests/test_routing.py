"""Routing math against hand-computed values."""

import math

import pytest
import torch

from visionmoe.nn.routing import (
    LOGIT_CLAMP,
    assign,
    aux_loss,
    domain_loss,
    expert_capacity,
    expert_shares,
    mutual_information_loss,
    route,
    router_z_loss,
    switch_balance_loss,
)


def test_route_softmax_topk_and_renormalize():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    e = [math.exp(v) for v in (1.0, 2.0, 3.0, 0.0)]
    probs = [v / sum(e) for v in e]
    r = route(logits, top_k=2)
    assert r.indices.tolist() == [[2, 1]]
    assert torch.allclose(r.probs, torch.tensor([probs]))
    assert torch.allclose(r.gates, torch.tensor([[probs[2], probs[1]]]))
    r = route(logits, top_k=2, renormalize=True)
    expected = [probs[2] / (probs[2] + probs[1]), probs[1] / (probs[2] + probs[1])]
    assert torch.allclose(r.gates, torch.tensor([expected]))
    assert r.probs.dtype == torch.float32


def test_route_is_fp32_and_clamped():
    r = route(torch.tensor([[1000.0, -1000.0]], dtype=torch.float16), top_k=1)
    assert r.logits.dtype == torch.float32
    assert r.logits.tolist() == [[LOGIT_CLAMP, -LOGIT_CLAMP]]
    assert torch.isfinite(r.probs).all()


def test_route_noise_is_seeded_and_optional():
    logits = torch.zeros(64, 4)
    assert torch.equal(route(logits, 1).probs, route(logits, 1).probs)
    a = route(logits, 1, noise=1.0, generator=torch.Generator().manual_seed(0))
    b = route(logits, 1, noise=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.indices, b.indices)
    assert len(a.indices.unique()) > 1  # noise broke the ties
    assert torch.equal(a.logits, logits)  # z-loss reads clean logits


def test_switch_balance_loss_hand_values():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    # f = [0.5, 0.5], P = [0.55, 0.45] -> 2 * (0.275 + 0.225) = 1.0
    assert switch_balance_loss(probs, torch.tensor([[0], [1]])).item() == pytest.approx(1.0)
    # f = [1, 0] -> 2 * 0.55 = 1.1
    assert switch_balance_loss(probs, torch.tensor([[0], [0]])).item() == pytest.approx(1.1)
    # top-2 assignments count each slot: f = [0.5, 0.5]
    assert switch_balance_loss(probs, torch.tensor([[0, 1], [1, 0]])).item() == pytest.approx(1.0)


def test_switch_balance_loss_gradient_flows_through_probs_only():
    logits = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]], requires_grad=True)
    r = route(logits, 1)
    switch_balance_loss(r.probs, r.indices).backward()
    # all items pick expert 0, so the loss pushes expert 0's logit down and the others up
    assert (logits.grad[:, 0] > 0).all() and (logits.grad[:, 1:] < 0).all()


def test_router_z_loss_hand_values():
    assert router_z_loss(torch.zeros(3, 2)).item() == pytest.approx(math.log(2) ** 2)
    logits = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    expected = (math.log(math.e + math.e**2) ** 2 + math.log(1 + math.exp(-1)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)
    assert router_z_loss(torch.zeros(2, 5, 4)).item() == pytest.approx(math.log(4) ** 2)  # token shape


def test_aux_loss_weights():
    r = route(torch.tensor([[0.0, 0.0], [0.0, 0.0]]), 1)
    balance, z = switch_balance_loss(r.probs, r.indices), router_z_loss(r.logits)
    assert aux_loss(r, 0.01, 0.001).item() == pytest.approx(0.01 * balance.item() + 0.001 * z.item())


def test_mutual_information_loss_hand_values():
    e = 4
    uniform = torch.full((8, e), 1 / e)
    balanced_sure = torch.eye(e).repeat(2, 1)  # every image certain, every expert used equally
    collapsed = torch.zeros(8, e).index_fill_(1, torch.tensor([0]), 1.0)  # every image certain of expert 0
    assert mutual_information_loss(uniform).item() == pytest.approx(math.log(e))
    assert mutual_information_loss(balanced_sure).item() == pytest.approx(0.0, abs=1e-6)
    assert mutual_information_loss(collapsed).item() == pytest.approx(math.log(e))
    assert mutual_information_loss(balanced_sure.view(2, 4, e)).item() == pytest.approx(0.0, abs=1e-6)  # tokens


def test_mutual_information_loss_sharpens_near_uniform_routers():
    noise = 0.001 * torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    logits = (0.01 * torch.eye(4).repeat(4, 1) + noise).requires_grad_()  # each expert slightly preferred by 4
    r = route(logits, 1)
    mutual_information_loss(r.probs).backward()
    chosen = r.indices[:, 0]
    # descending the loss raises each image's top logit against its others: routers grow confident
    assert (logits.grad.gather(1, chosen[:, None]) < 0).all()
    assert aux_loss(r, 0.0, 0.0, 0.5).item() == pytest.approx(0.5 * mutual_information_loss(r.probs).item())


def test_expert_shares_and_capacity():
    assert expert_shares(torch.tensor([[0, 1], [0, 3]]), 4).tolist() == [0.5, 0.25, 0.0, 0.25]
    assert expert_capacity(tokens=100, num_experts=8, top_k=2, capacity_factor=1.25) == 32  # ceil(31.25)
    assert expert_capacity(tokens=10, num_experts=1, top_k=1, capacity_factor=2.0) == 10  # never above T


def test_nearest_centroid_gate_routes_each_cluster_to_its_own_expert():
    from visionmoe.nn.router_init import TARGET_CONFIDENCE, nearest_centroid_gate

    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 10.0, 100.0, 0.1])  # unequal feature scales: clustering must standardise first
    centres = torch.randn(4, 4, generator=g) * 4 * scales
    points = torch.cat([c + torch.randn(50, 4, generator=g) * scales for c in centres])
    weight, bias = nearest_centroid_gate(points, 4, torch.Generator().manual_seed(1))
    assert weight.shape == (4, 4) and bias.shape == (4,) and weight.dtype == torch.float32
    probs = (points @ weight.T + bias).softmax(1)
    choice = probs.argmax(1).view(4, 50)
    assert all(len(set(row.tolist())) == 1 for row in choice)  # every blob goes to one expert...
    assert len(set(choice[:, 0].tolist())) == 4  # ...and every blob to a different one
    assert probs.max(1).values.mean().item() == pytest.approx(TARGET_CONFIDENCE, abs=1e-3)


def test_kmeans_needs_as_many_points_as_clusters():
    from visionmoe.nn.router_init import kmeans

    with pytest.raises(ValueError, match="at least k=4 points"):
        kmeans(torch.zeros(3, 2), 4, torch.Generator())


def test_max_router_input_ignores_a_flat_border_that_moves_the_mean():
    from visionmoe.nn import MoESettings, Router

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 8, 6, 6, generator=g) + 0.5  # content in [0.5, 1.5]
    bordered = torch.nn.functional.pad(x, (2, 2, 2, 2), value=0.1)  # a letterbox border, flatter and darker
    by_input = {name: Router(8, MoESettings(router_input=name)) for name in ("mean", "max")}
    assert torch.equal(by_input["max"].pool(bordered), by_input["max"].pool(x))
    assert not torch.allclose(by_input["mean"].pool(bordered), by_input["mean"].pool(x), atol=0.1)


def test_router_context_adds_an_earlier_maps_statistics_to_the_router_input():
    from visionmoe.nn import MoESettings, Router

    g = torch.Generator().manual_seed(0)
    features = torch.rand(2, 8, 4, 4, generator=g)
    context = torch.rand(2, 3, 16, 16, generator=g)
    router = Router(8, MoESettings(), context_channels=3)
    pooled = router.pool(features, context)
    assert pooled.shape == (2, 8 + 2 * 3) and router.gate[0].in_features == 14
    torch.testing.assert_close(pooled[:, :8], features.mean((2, 3)))
    torch.testing.assert_close(pooled[:, 8:11], context.mean((2, 3)))
    torch.testing.assert_close(pooled[:, 11:], context.std((2, 3), correction=0), atol=1e-5, rtol=0)
    # a blurred context (same means, less fine detail) changes the logits although the block's features do not
    blurred = context.mean((2, 3), keepdim=True) + 0.1 * (context - context.mean((2, 3), keepdim=True))
    assert not torch.allclose(router.logits(features, context), router.logits(features, blurred))


@pytest.mark.parametrize("detach", [False, True])
def test_detach_router_trains_the_router_but_not_the_features_it_reads(detach):
    from visionmoe.nn import MoESettings, Router
    from visionmoe.nn.routing import domain_loss

    g = torch.Generator().manual_seed(0)
    features = torch.rand(4, 8, 4, 4, generator=g, requires_grad=True)
    context = torch.rand(4, 3, 16, 16, generator=g, requires_grad=True)
    tokens = torch.rand(4, 5, 8, generator=g, requires_grad=True)
    router = Router(8, MoESettings(detach_router=detach), context_channels=3)
    logits = router.logits(features, context)
    domain_loss(logits, torch.tensor([0, 1, 2, 3])).backward()
    assert router.gate[0].weight.grad.abs().sum() > 0  # the router learns either way
    assert (features.grad is None and context.grad is None) == detach  # the features only without detach_router
    token_router = Router(8, MoESettings(detach_router=detach))
    token_router.logits(tokens).square().sum().backward()
    assert token_router.gate[0].weight.grad.abs().sum() > 0 and (tokens.grad is None) == detach


def test_detach_router_warmup_detaches_only_while_tied():
    from ultralytics.nn.modules import C3k2

    from visionmoe.nn import MoESettings
    from visionmoe.nn.blocks import MoEC3k2
    from visionmoe.nn.tasks import build_model

    settings = MoESettings(detach_router="warmup", dense_warmup=0.5, renormalize=True)
    block = MoEC3k2.from_dense(C3k2(8, 8, n=1), settings, context_channels=3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 8, 4, 4, generator=g, requires_grad=True)
    context = torch.rand(2, 3, 16, 16, generator=g, requires_grad=True)

    def router_gradients() -> tuple[bool, bool]:
        """(does the router's loss train the router, does it reach the features and context)"""
        block.zero_grad()
        x.grad = context.grad = None
        routing = block.router(block.cv1(x).split((block.c, block.c), 1)[1], context)
        routing.logits.logsumexp(-1).sum().backward()
        reached = x.grad is not None and x.grad.abs().sum() > 0 and context.grad is not None
        return bool(block.router.gate[0].weight.grad.abs().sum() > 0), reached

    assert router_gradients() == (True, True)  # an untied block (built, or dense_warmup ended) trains the features
    block.tie()
    assert router_gradients() == (True, False)  # the dense warmup: the routers learn alone
    block.split()
    assert router_gradients() == (True, True)
    # the YAML default; without a dense warmup nothing is ever tied, so nothing is detached
    unwarmed = build_model("visionmoe-yolo-n.yaml", verbose=False, dense_warmup=0)
    assert unwarmed.moe_settings.detach_router == "warmup"
    assert not any(b.router.detach_input or b.tied for b in unwarmed.moe_blocks())


def test_letterbox_mask_pools_over_content_cells_only():
    from visionmoe.nn import MoESettings, Router
    from visionmoe.nn.tasks import LETTERBOX_FILL, letterbox_content

    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 16, 16, generator=g)
    image[:, :, :4] = LETTERBOX_FILL / 255  # a letterbox border over the top quarter, in the stride-4 cells of row 0
    image[0, 1, 1, 1] = 0.5  # one content pixel inside it makes its cell content
    features = torch.rand(2, 8, 4, 4, generator=g)
    router = Router(8, MoESettings())
    router.content = letterbox_content(image)
    assert router.content.shape == (2, 1, 16, 16) and router.content[:, 0, :4].sum().item() == 1
    pooled = router.pool(features)
    torch.testing.assert_close(pooled[1], features[1, :, 1:].mean((1, 2)))
    cells = torch.ones(4, 4)
    cells[0, 1:] = 0  # row 0 is border except the cell holding the content pixel
    torch.testing.assert_close(pooled[0], (features[0] * cells).sum((1, 2)) / cells.sum())


def test_assign_sends_tagged_items_to_their_expert_with_gate_one():
    routing = route(torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]), top_k=1, renormalize=True)
    assigned = assign(routing, torch.tensor([2, -1, 0]))
    assert assigned.indices[:, 0].tolist() == [2, 1, 0]  # item 1 is untagged: the router's own choice stays
    assert torch.equal(assigned.gates, torch.ones(3, 1))
    assert assigned.logits is routing.logits and assigned.probs is routing.probs


def test_domain_loss_is_the_cross_entropy_over_tagged_items_only():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 1.0, 3.0]])
    experts = torch.tensor([1, -1, 2])
    p = logits.softmax(-1)
    assert domain_loss(logits, experts).item() == pytest.approx(-(math.log(p[0, 1]) + math.log(p[2, 2])) / 2)
    assert domain_loss(logits, torch.full((3,), -1)).item() == 0.0


def test_domain_loss_weighs_every_expert_present_alike():
    logits = torch.tensor([[2.0, 0.0, -1.0], [1.0, 0.5, 0.0], [0.3, 0.0, 0.0], [0.0, 1.0, 3.0]])
    experts = torch.tensor([0, 0, 0, 2])  # expert 0 has three images, expert 2 one: each half of the loss
    ce = -logits.log_softmax(-1)
    expected = (ce[0, 0] + ce[1, 0] + ce[2, 0]) / 3 / 2 + ce[3, 2] / 2
    assert domain_loss(logits, experts).item() == pytest.approx(expected.item())


def test_tied_logits_go_to_the_lower_expert_as_in_onnx_topk():
    logits = torch.tensor([[40.0, 45.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])  # row 0 ties at the clamp (30)
    assert route(logits, top_k=1).indices[:, 0].tolist() == [0, 1]
    assert route(logits, top_k=2).indices.tolist() == [[0, 1], [1, 2]]

"""Trainer set-up: CPU threads and MoE overrides."""

import csv
import os

import pytest
import torch

from visionmoe import MoEDetectionTrainer
from visionmoe.models.yolo.train import unaugmented_train_loader, use_fast_kernels


def test_trainer_uses_every_allowed_core_and_builds_overrides(tmp_path, coco8):
    trainer = MoEDetectionTrainer(
        overrides={"model": "visionmoe-yolo-n.yaml", "data": "coco8.yaml", "device": "cpu", "experts": 3,
                   "project": str(tmp_path), "imgsz": 64}
    )  # fmt: skip
    assert torch.get_num_threads() == len(os.sched_getaffinity(0))
    assert all(len(block.experts) == 3 for block in trainer.model.moe_blocks())  # built before DDP could need it


def test_dense_warmup_trains_tied_experts_then_splits_with_their_optimizer_state(tmp_path, coco8):
    trainer = MoEDetectionTrainer(
        overrides={"model": "visionmoe-yolo-n.yaml", "data": "coco8.yaml", "device": "cpu", "epochs": 2, "imgsz": 64,
                   "batch": 4, "nbs": 4, "workers": 0, "optimizer": "AdamW", "project": str(tmp_path), "name": "warm",
                   "renormalize": True, "dense_warmup": 0.5, "plots": False}
    )  # fmt: skip
    seen = {}

    def check_epoch(trainer):
        blocks = trainer.model.moe_blocks()
        # the default detach_router='warmup': routers read detached features while tied, attached once split
        seen[trainer.epoch] = [(b.tied, b.router.detach_input) for b in blocks + trainer.ema.ema.moe_blocks()]
        if trainer.epoch == 1:  # just split: every copy equals expert 0, with its Adam moments
            for model in (trainer.model, trainer.ema.ema):
                for block in model.moe_blocks():
                    for a, b in zip(block.experts[0].state_dict().values(), block.experts[-1].state_dict().values()):
                        assert torch.equal(a, b)
            source = blocks[0].experts[0].m[0].cv1.conv.weight
            copy_ = blocks[0].experts[-1].m[0].cv1.conv.weight
            state = trainer.optimizer.state
            assert state[source]["exp_avg"].abs().sum() > 0
            assert torch.equal(state[copy_]["exp_avg"], state[source]["exp_avg"])
            assert state[copy_]["exp_avg"] is not state[source]["exp_avg"]

    trainer.add_callback("on_train_epoch_start", check_epoch)
    trainer.train()
    assert all(group["fused"] for group in trainer.optimizer.param_groups)  # one fused CPU kernel per group
    assert seen == {0: [(True, True)] * 12, 1: [(False, False)] * 12}
    rows = (trainer.save_dir / "expert_utilisation.csv").read_text().splitlines()[1:]
    assert rows and {row.split(",")[0] for row in rows} == {"2"}  # no router ran in the tied epoch


def test_residual_experts_split_into_zero_deltas_train_them_and_checkpoint_for_resume(tmp_path, coco8):
    from ultralytics.nn.tasks import load_checkpoint

    trainer = MoEDetectionTrainer(
        overrides={"model": "visionmoe-yolo-n.yaml", "data": "coco8.yaml", "device": "cpu", "epochs": 2, "imgsz": 64,
                   "batch": 4, "nbs": 4, "workers": 0, "project": str(tmp_path), "name": "residual",
                   "dense_warmup": 0.5, "residual_experts": True, "plots": False}
    )  # fmt: skip
    split = []

    def check_split(trainer):
        if trainer.epoch != 1:
            return
        for model in (trainer.model, trainer.ema.ema):
            for block in model.moe_blocks():
                assert block.residual and not block.tied
                assert all(p.abs().sum() == 0 for expert in block.experts[1:] for p in expert.parameters())
        delta = trainer.model.moe_blocks()[0].experts[1].m[0].cv1.conv.weight
        split.append(delta not in trainer.optimizer.state)  # a delta starts with fresh optimizer state

    trainer.add_callback("on_train_epoch_start", check_split)
    trainer.train()
    assert split == [True]
    deltas = [p for b in trainer.model.moe_blocks() for e in b.experts[1:] for p in e.parameters()]
    assert any(p.abs().sum() > 0 for p in deltas)  # the routed epoch trained them
    model, _ = load_checkpoint(trainer.last)  # kept residual, so that resume trains on as it did
    assert all(block.residual for block in model.moe_blocks())


@pytest.mark.parametrize(
    "optimizer, kernel", [(torch.optim.AdamW, "fused"), (torch.optim.SGD, "fused"), (torch.optim.RMSprop, "foreach")]
)
def test_fast_kernels_fuse_where_torch_can_and_keep_the_update(optimizer, kernel):
    def stepped(fast: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
        groups = [{"params": params[:1], "weight_decay": 0.05}, {"params": params[1:], "weight_decay": 0.0}]
        opt = optimizer(groups, lr=0.01, momentum=0.9) if optimizer is not torch.optim.AdamW else optimizer(groups)
        opt = use_fast_kernels(opt) if fast else opt
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        assert all(bool(group.get(kernel)) == fast for group in opt.param_groups)
        return params

    for fast, slow in zip(stepped(True), stepped(False)):
        torch.testing.assert_close(fast, slow)
    explicit = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], foreach=False)
    assert use_fast_kernels(explicit).param_groups[0]["fused"] is None  # the builder's choice stands


def test_resume_ties_inside_the_warmup_and_refreezes_norms_after_it():
    from types import SimpleNamespace

    from visionmoe.models.yolo.train import _tie_for_dense_warmup
    from visionmoe.nn.tasks import build_model

    for start_epoch, tied, frozen in ((1, True, False), (3, False, True)):  # 4 epochs, dense_warmup 0.5: split at 2
        model = build_model("visionmoe-yolo-n.yaml", verbose=False, dense_warmup=0.5, freeze_expert_norm=True)
        trainer = SimpleNamespace(model=model, ema=None, start_epoch=start_epoch, epochs=4)
        _tie_for_dense_warmup(trainer)
        assert {(b.tied, b.frozen_norm) for b in model.moe_blocks()} == {(tied, frozen)}


def test_the_last_epoch_always_routes():
    from types import SimpleNamespace

    from visionmoe.models.yolo.train import split_epoch
    from visionmoe.nn.tasks import build_model

    for warmup, epochs, split in ((0.7, 20, 14), (0.7, 2, 1), (0.7, 1, 0), (0.9, 4, 3), (0.0, 1, 0)):
        model = build_model("visionmoe-yolo-n.yaml", verbose=False, dense_warmup=warmup)
        assert split_epoch(SimpleNamespace(model=model, epochs=epochs)) == split, (warmup, epochs)


def test_kmeans_router_init_gives_each_clustered_image_its_own_expert(tmp_path, coco8):
    trainer = MoEDetectionTrainer(
        overrides={"model": "visionmoe-yolo-n.yaml", "data": "coco8.yaml", "device": "cpu", "epochs": 2, "imgsz": 64,
                   "batch": 4, "nbs": 4, "workers": 0, "project": str(tmp_path), "name": "kmeans",
                   "dense_warmup": 0.5, "router_init": "kmeans", "plots": False}
    )  # fmt: skip
    routed = {}

    def check_split(trainer):
        if trainer.epoch != 1:  # the split (and the clustering) ran just before, in the trainer's own callback
            return
        model = trainer.model
        for a, b in zip(model.moe_blocks(), trainer.ema.ema.moe_blocks()):
            assert torch.equal(a.router.gate[0].weight, b.router.gate[0].weight)
        loader = unaugmented_train_loader(trainer)  # the images the clusters were fitted on
        model.eval()
        with torch.no_grad():
            for batch in loader:
                model(trainer.preprocess_batch(batch)["img"])
        model.train()
        routed.update({name: block.routing.indices[:, 0].tolist() for name, block in model.named_moe_blocks()})

    trainer.add_callback("on_train_epoch_start", check_split)
    trainer.train()
    # COCO8 has 4 training images and every block 4 experts: 4 clusters of 4 points, one image each
    assert len(routed) == 6 and all(sorted(experts) == [0, 1, 2, 3] for experts in routed.values()), routed


def test_domain_loss_routes_each_training_image_to_its_domain_expert(tmp_path, coco8):
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils import YAML

    with pytest.raises(ValueError, match="domain_loss=0.1 needs per-image domain tags"):
        MoEDetectionTrainer(overrides={"model": "visionmoe-yolo-n.yaml", "data": "coco8.yaml", "domain_loss": 0.1,
                                       "project": str(tmp_path / "untagged")})  # fmt: skip
    assert not (tmp_path / "untagged").exists()  # refused before any run folder
    train = sorted(p.stem for p in (coco8 / "images" / "train").iterdir())
    data = tmp_path / "coco8-domains.yaml"  # the 4 training images in domains a, a, b, c: experts 0, 0, 1, 2
    YAML.save(data, {"path": str(coco8), "train": "images/train", "val": "images/val",
                     "names": check_det_dataset("coco8.yaml")["names"], "domains": dict(zip(train, "aabc"))})  # fmt: skip
    trainer = MoEDetectionTrainer(
        overrides={"model": "visionmoe-yolo-n.yaml", "data": str(data), "device": "cpu", "epochs": 2, "imgsz": 64,
                   "batch": 4, "nbs": 4, "workers": 0, "optimizer": "AdamW", "project": str(tmp_path),
                   "name": "domains", "dense_warmup": 0.5, "domain_loss": 0.1, "plots": False}
    )  # fmt: skip
    # the default, domain_loss=auto, routes by the tags as well, and ignores data without tags
    auto = MoEDetectionTrainer(overrides={"model": "visionmoe-yolo-n.yaml", "data": str(data), "device": "cpu",
                                          "project": str(tmp_path), "name": "auto"})  # fmt: skip
    assert auto.get_model("visionmoe-yolo-n.yaml", verbose=False).moe_settings.domain_loss == "auto"
    assert auto.domain_expert_of == trainer.domain_expert_of and len(trainer.domain_expert_of) == 4
    untagged = MoEDetectionTrainer(overrides={"model": "visionmoe-yolo-n.yaml", "data": "coco8.yaml", "device": "cpu",
                                              "project": str(tmp_path), "name": "plain"})  # fmt: skip
    untagged.get_model("visionmoe-yolo-n.yaml", verbose=False)
    assert untagged.domain_expert_of is None
    routers = []  # the first block's router bias when each epoch starts

    def keep_router(trainer):
        routers.append(trainer.model.moe_blocks()[0].router.gate[0].bias.detach().clone())  # biases warm up from 0.1

    trainer.add_callback("on_train_epoch_start", keep_router)
    trainer.train()
    assert not torch.equal(routers[0], routers[1])  # the routers learn the domains in the tied epoch already
    counts: dict[str, list[int]] = {}
    for row in csv.DictReader(open(trainer.save_dir / "expert_utilisation.csv")):  # the routed epoch only
        counts.setdefault(row["layer"], []).append(int(row["count"]))
    assert len(counts) == 6 and all(c == [2, 1, 1, 0] for c in counts.values()), counts


def test_split_moment_scale_scales_the_experts_second_moments_and_the_meter_sees_the_steps(monkeypatch):
    """`split_moment_scale` (recipe.md, stop 37): at the split every expert gets the tied expert's second moment times
    the scale, and nothing else changes; an optimizer without second moments is told the setting did nothing.
    benchmarks/expert_steps.py's meter divides each group's relative step by the learning rate."""
    from pathlib import Path
    from types import SimpleNamespace

    from visionmoe.models.yolo import train
    from visionmoe.nn.tasks import build_model

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from expert_steps import StepMeter

    def tied_model(optimizer_class: type[torch.optim.Optimizer]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = build_model("visionmoe-yolo-n.yaml", verbose=False, dense_warmup=0.5, split_moment_scale=0.25)
        for block in model.moe_blocks():
            block.tie()
        optimizer = optimizer_class(model.parameters(), lr=0.01)
        optimizer.add_param_group({"params": [], "lr": 0.01})  # Ultralytics' weights group is group 1
        return model, optimizer

    model, optimizer = tied_model(torch.optim.AdamW)
    untied = {p for block in model.moe_blocks() for p in block.experts[1:].parameters()}  # idle while tied
    tied = [p for p in model.parameters() if p not in untied]
    for p in tied:
        moments = {"exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
        optimizer.state[p] = {"step": torch.tensor(5.0), **moments}
    before = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in tied}
    trainer = SimpleNamespace(model=model, ema=None, epochs=4, epoch=1, optimizer=optimizer)
    train._split_after_dense_warmup(trainer)  # still tied: no change
    assert all(torch.equal(optimizer.state[p]["exp_avg_sq"], v["exp_avg_sq"]) for p, v in before.items())
    trainer.epoch = 2
    train._split_after_dense_warmup(trainer)
    for block in model.moe_blocks():
        source = list(block.experts[0].parameters())
        for expert in block.experts:
            for p, s in zip(expert.parameters(), source):
                torch.testing.assert_close(optimizer.state[p]["exp_avg_sq"], 0.25 * before[s]["exp_avg_sq"])
                assert torch.equal(optimizer.state[p]["exp_avg"], before[s]["exp_avg"])
    experts = {p for b in model.moe_blocks() for p in b.experts.parameters()}
    assert all(torch.equal(optimizer.state[p]["exp_avg_sq"], before[p]["exp_avg_sq"]) for p in tied if p not in experts)

    warnings = []
    monkeypatch.setattr(train.LOGGER, "warning", warnings.append)
    sgd_model, sgd = tied_model(torch.optim.SGD)
    for p in sgd_model.parameters():
        sgd.state[p] = {"momentum_buffer": torch.zeros_like(p)}
    train._split_after_dense_warmup(SimpleNamespace(model=sgd_model, ema=None, epochs=4, epoch=2, optimizer=sgd))
    assert len(warnings) == 1 and "split_moment_scale=0.25 had no effect: SGD keeps no second moments" in warnings[0]

    meter = StepMeter()
    meter.start(trainer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(1.02 if ".experts.0." in name else 1.04)
    meter.end(trainer)
    expert, other = meter.steps[2][0]
    assert expert == pytest.approx(0.02 / 0.01, rel=1e-3) and other == pytest.approx(0.04 / 0.01, rel=1e-3)


def test_grad_norm_meter_reads_the_norm_the_trainer_clips_and_still_steps(monkeypatch):
    """benchmarks/grad_norms.py (recipe.md, stop 38): the meter's total is the norm Ultralytics clips, split into the
    routers' part and the rest, read before the trainer's own step, which still runs once per step."""
    from pathlib import Path
    from types import SimpleNamespace

    from visionmoe.nn.tasks import build_model

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from grad_norms import NormMeter

    model = build_model("visionmoe-yolo-n.yaml", verbose=False)
    for name, p in model.named_parameters():
        p.grad = torch.full_like(p, 3.0 if ".router." in name else 0.5)
    routers = sum(p.numel() for n, p in model.named_parameters() if ".router." in n)
    rest = sum(p.numel() for n, p in model.named_parameters() if ".router." not in n)
    steps = []
    trainer = SimpleNamespace(model=model, epoch=3, optimizer_step=lambda: steps.append(1))
    meter = NormMeter()
    meter.wrap(trainer)
    trainer.optimizer_step()
    total, router, other = meter.steps[3][0]
    assert steps == [1]
    assert router == pytest.approx(3.0 * routers**0.5, rel=1e-5) and other == pytest.approx(0.5 * rest**0.5, rel=1e-5)
    clipped = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
    assert total == pytest.approx(float(clipped), rel=1e-5)


def test_routers_gradients_are_clipped_apart_from_the_detectors():
    """Ultralytics clips all gradients together at norm 10; the MoE trainer clips the routers' apart, so that their
    losses cannot scale the detector's step."""
    from types import SimpleNamespace

    from visionmoe.nn.tasks import build_model

    model = build_model("visionmoe-yolo-n.yaml", verbose=False)
    is_router = {name: ".router." in name for name, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = torch.full_like(p, 1e3 if is_router[name] else 0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), ema=None,
                              scaler=torch.amp.GradScaler("cpu", enabled=False))  # fmt: skip
    MoEDetectionTrainer.optimizer_step(trainer)
    steps = {True: [], False: []}
    for name, p in model.named_parameters():
        steps[is_router[name]].append((before[name] - p.detach()).flatten().double())  # fp32 norms of 4M drift
    # each part steps by its own clipped gradient, of norm 10; clipped together the detector would step ~1e-4
    assert torch.cat(steps[False]).norm() == pytest.approx(10.0, rel=1e-4)
    assert torch.cat(steps[True]).norm() == pytest.approx(10.0, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())  # and the step zeroes the gradients, as Ultralytics'


def test_a_tied_moe_trains_exactly_as_the_dense_yolo_of_the_same_seed_until_the_split(tmp_path, coco8):
    """Expert 0 starts as the dense block, routers neither bend the features (detach_router: warmup) nor scale the
    detector's step (clipped apart), and compare gives dense runs the same optimizer kernels: through the dense
    warmup the MoE's detector is the dense model, to the bit, even while its routers learn domains."""
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import YAML

    from visionmoe.engine.compare import _use_allowed_cpus, _use_fast_kernels
    from visionmoe.nn.upcycle import dense_source

    train = sorted(p.stem for p in (coco8 / "images" / "train").iterdir())
    data = tmp_path / "coco8-domains.yaml"  # tagged, so that the routers learn (domain_loss: auto) while tied
    YAML.save(data, {"path": str(coco8), "train": "images/train", "val": "images/val",
                     "names": check_det_dataset("coco8.yaml")["names"], "domains": dict(zip(train, "aabc"))})  # fmt: skip
    args = {"data": str(data), "device": "cpu", "epochs": 3, "imgsz": 64, "batch": 2, "nbs": 2, "workers": 0,
            "seed": 0, "project": str(tmp_path), "plots": False, "val": False}  # fmt: skip
    weights = {}

    def keep_weights_after_the_warmup(trainer):
        if trainer.epoch == 1:  # the second of two tied epochs (dense_warmup 0.67 of 3)
            weights[type(trainer).__name__] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            trainer.stop = True

    start = {}
    moe = MoEDetectionTrainer(overrides={**args, "model": "visionmoe-yolo-n.yaml", "dense_warmup": 0.67, "name": "m"})
    moe.add_callback("on_train_start", lambda t: start.update({k: v.clone() for k, v in t.model.state_dict().items()}))
    moe.add_callback("on_train_epoch_end", keep_weights_after_the_warmup)
    moe.train()
    dense = DetectionTrainer(overrides={**args, "model": "yolo11n.yaml", "name": "d"})
    _use_allowed_cpus(dense)  # as compare does: the thread count changes the rounding of every conv
    dense.add_callback("on_pretrain_routine_end", _use_fast_kernels)
    dense.add_callback("on_train_epoch_end", keep_weights_after_the_warmup)
    dense.train()
    m, d = weights["MoEDetectionTrainer"], weights["DetectionTrainer"]
    routers = [k for k in m if ".router.gate." in k]
    assert routers and all(not torch.equal(m[k], start[k]) for k in routers)  # the routers learned while tied
    shared = {k: dense_source(k) for k in m if dense_source(k) in d and ".experts." not in k}
    shared.update({k: dense_source(k) for k in m if ".experts.0." in k})
    assert len(shared) == len(d)  # every dense tensor has its MoE counterpart
    differ = [k for k, src in shared.items() if not torch.equal(m[k], d[src])]
    assert not differ, differ[:5]

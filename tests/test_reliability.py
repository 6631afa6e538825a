"""Reliability: resume after SIGKILL, reproducible runs, bad data, atomic checkpoints, fp32 routing."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import OFFLINE_ENV, run_cli
from visionmoe import VisionMoE
from visionmoe.nn import Router, MoESettings

TRAIN = ("data=coco8.yaml", "imgsz=64", "batch=4", "nbs=4", "workers=0", "seed=0", "plots=False")


def results(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run / "results.csv")))


def test_sigkill_after_first_epoch_then_resume(tmp_path, coco8):
    run = tmp_path / "train"
    exe = Path(sys.executable).with_name("visionmoe")
    proc = subprocess.Popen(
        [str(exe), "train", *TRAIN, "epochs=4", "noise=0.5", "dense_warmup=0.5", f"project={tmp_path}", "name=train"],
        env={**os.environ, **OFFLINE_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (run / "weights" / "last.pt").exists():  # written after epoch 1's results row
        assert proc.poll() is None and time.time() < deadline, "training ended or stalled before its first save"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(results(run))
    assert 1 <= done < 4, f"the kill came too late to test resume ({done} epochs done)"
    r = run_cli("train", "resume=True", f"model={run / 'weights' / 'last.pt'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [int(row["epoch"]) for row in results(run)] == [1, 2, 3, 4]
    assert len(VisionMoE(run / "weights" / "best.pt").predict(str(coco8 / "images" / "val"), imgsz=64)) == 4
    # the router noise sequence went on from the checkpoint: one step per routed training batch (4 images, batch 4);
    # dense_warmup=0.5 ties the experts for epochs 1-2, and the resumed run ties them again if it starts in them
    steps = {int(b.router.noise_step) for b in VisionMoE(run / "weights" / "last.pt").model.moe_blocks()}
    assert steps == {2}


# `visionmoe train` that SIGKILLs itself when it is about to save epoch 2's checkpoint: Ultralytics has written
# epoch 2's results.csv row by then (save_metrics comes before save_model), so the kill lands in that window.
KILL_BEFORE_SECOND_SAVE = """
import os, signal, sys
from visionmoe.cli import entrypoint
from visionmoe.models.yolo.train import MoEDetectionTrainer

save_model = MoEDetectionTrainer.save_model

def kill_before_second_save(self):
    if self.epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return save_model(self)

MoEDetectionTrainer.save_model = kill_before_second_save
sys.exit(entrypoint(sys.argv[1:]))
"""


def test_sigkill_between_results_row_and_checkpoint_logs_each_epoch_once(tmp_path):
    run = tmp_path / "train"
    args = ("train", *TRAIN, "epochs=4", "dense_warmup=0", f"project={tmp_path}", "name=train")  # routed from epoch 1
    killed = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_SECOND_SAVE, *args], env={**os.environ, **OFFLINE_ENV}, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # in the window: epoch 2 is logged, while last.pt holds epoch 1 (Ultralytics counts checkpoint epochs from 0)
    assert [int(row["epoch"]) for row in results(run)] == [1, 2]
    assert torch.load(run / "weights" / "last.pt", weights_only=False)["epoch"] == 0
    r = run_cli("train", "resume=True", f"model={run / 'weights' / 'last.pt'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [int(row["epoch"]) for row in results(run)] == [1, 2, 3, 4]
    shares = list(csv.DictReader(open(run / "expert_utilisation.csv")))
    assert [int(row["epoch"]) for row in shares] == sorted(e for e in (1, 2, 3, 4) for _ in range(6 * 4))


def test_ctrl_c_during_training_leaves_a_loadable_last_pt(tmp_path, coco8):
    run = tmp_path / "train"
    exe = Path(sys.executable).with_name("visionmoe")
    proc = subprocess.Popen(
        [str(exe), "train", *TRAIN, "epochs=50", f"project={tmp_path}", "name=train"],
        env={**os.environ, **OFFLINE_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (run / "weights" / "last.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended or stalled before its first save"
        time.sleep(0.05)
    time.sleep(1.0)  # let it get into the next epochs, and possibly into a save
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    VisionMoE(run / "weights" / "last.pt").predict(str(coco8 / "images" / "val"), imgsz=64)


def test_same_seed_deterministic_runs_match(tmp_path, coco8):
    for name in ("a", "b"):
        r = run_cli(
            "train", *TRAIN, "epochs=2", "deterministic=True", "noise=0.5", f"project={tmp_path}", f"name={name}"
        )
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = results(tmp_path / "a"), results(tmp_path / "b")
    skip = {"time"}  # wall-clock seconds
    assert [{k: v for k, v in row.items() if k not in skip} for row in a] == [
        {k: v for k, v in row.items() if k not in skip} for row in b
    ]
    assert float(a[-1]["train/box_loss"]) > 0


def _copy_coco8(coco8: Path, dest: Path) -> Path:
    shutil.copytree(coco8, dest)
    (dest.parent / f"{dest.name}.yaml").write_text(
        f"path: {dest}\ntrain: images/train\nval: images/val\nnames:\n" + "".join(f"  {i}: c{i}\n" for i in range(80))
    )
    for cache in dest.rglob("*.cache"):
        cache.unlink()
    return dest.parent / f"{dest.name}.yaml"


def test_bad_images_and_labels_are_skipped_and_counted(tmp_path, coco8):
    data = _copy_coco8(coco8, tmp_path / "dirty")
    train_images = sorted((tmp_path / "dirty" / "images" / "train").glob("*.jpg"))
    train_images[0].write_bytes(b"not an image")  # corrupt image
    label = tmp_path / "dirty" / "labels" / "train" / f"{train_images[1].stem}.txt"
    label.write_text("99 0.5 0.5 0.2 0.2\n")  # class id out of range
    label = tmp_path / "dirty" / "labels" / "train" / f"{train_images[2].stem}.txt"
    label.write_text("0 1.7 0.5 0.2 0.2\n")  # coordinates out of range
    r = run_cli("train", f"data={data}", *TRAIN[1:], "epochs=1", f"project={tmp_path}", "name=run")
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "3 corrupt" in log  # Ultralytics counts the skipped images in its scan line
    assert len(results(tmp_path / "run")) == 1


def test_dataset_without_usable_images_stops_before_training(tmp_path, coco8):
    data = _copy_coco8(coco8, tmp_path / "ruined")
    for image in (tmp_path / "ruined" / "images" / "train").glob("*.jpg"):
        image.write_bytes(b"not an image")
    r = run_cli("train", f"data={data}", *TRAIN[1:], "epochs=1", f"project={tmp_path / 'runs'}")
    assert r.returncode == 2
    assert "no usable image in the 'train' split" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_router_runs_in_fp32_under_autocast():
    router = Router(8, MoESettings(experts=4, top_k=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(torch.randn(2, 8, 4, 4))
    assert routing.logits.dtype == routing.probs.dtype == torch.float32
    half = Router(8, MoESettings()).half()
    assert half(torch.randn(2, 8, 4, 4).half()).logits.dtype == torch.float32


def test_non_finite_router_input_names_the_block():
    model = VisionMoE("visionmoe-yolo-n.yaml").model.eval()
    block = model.moe_blocks()[1]
    with torch.no_grad():
        block.router.gate[0].bias.fill_(float("nan"))
        with pytest.raises(FloatingPointError, match="non-finite router logits in MoE block model.8"):
            model(torch.zeros(1, 3, 64, 64))

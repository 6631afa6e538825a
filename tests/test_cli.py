"""End to end: `visionmoe train` on COCO8 in a subprocess, then predict, reload, val and the CLI's errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image
from ultralytics.engine.results import Results
from ultralytics.utils import ASSETS

from visionmoe import VisionMoE

from conftest import OFFLINE_ENV, run_cli

BUS = ASSETS / "bus.jpg"


def test_train_writes_moe_column_utilisation_and_weights(trained_run):
    log = (trained_run / "stdout.txt").read_text()
    assert "moe" in log and "mAP50-95" in log  # progress bar header and validation table
    rows = list(csv.DictReader(open(trained_run / "results.csv")))
    assert len(rows) == 1 and "train/moe" in rows[0] and "val/moe" in rows[0]
    assert float(rows[0]["train/moe"]) > 0
    shares = list(csv.DictReader(open(trained_run / "expert_utilisation.csv")))
    assert len(shares) == 6 * 4  # 6 MoE blocks x 4 experts, epoch 1
    per_layer = {}
    for row in shares:
        per_layer[row["layer"]] = per_layer.get(row["layer"], 0) + float(row["share"])
    assert all(abs(total - 1) < 1e-3 for total in per_layer.values())
    assert (trained_run / "weights" / "best.pt").is_file()


def test_predict_accepts_every_source_kind(trained_run, tmp_path):
    model = VisionMoE(trained_run / "weights" / "best.pt")
    bgr = cv2.imread(str(BUS))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(folder / name), bgr)
    sources = {
        "path": (str(BUS), 1),
        "numpy": (bgr, 1),
        "pil": (Image.open(BUS), 1),
        "list": ([str(BUS), bgr], 2),
        "folder": (str(folder), 2),
    }
    for kind, (source, n) in sources.items():
        results = model.predict(source, imgsz=64, conf=0.0, verbose=False)
        assert len(results) == n and all(isinstance(r, Results) for r in results), kind
        assert results[0].boxes is not None and results[0].boxes.data.shape[1] == 6, kind


def test_reload_under_safe_load_and_predict(trained_run):
    code = (
        "from visionmoe import VisionMoE; import sys;"
        f"r = VisionMoE(r'{trained_run / 'weights' / 'best.pt'}').predict(r'{BUS}', imgsz=64, conf=0.0, verbose=False);"
        "print('boxes', len(r[0].boxes))"
    )
    env = {**os.environ, **OFFLINE_ENV, "ULTRALYTICS_SAFE_LOAD": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "boxes" in result.stdout


def test_val_from_checkpoint(trained_run):
    metrics = VisionMoE(trained_run / "weights" / "best.pt").val(data="coco8.yaml", imgsz=64, batch=4, plots=False)
    assert 0.0 <= metrics.box.map <= 1.0
    assert len(metrics.box.maps) == 80


def frames(video) -> int:
    capture, n = cv2.VideoCapture(str(video)), 0
    while capture.read()[0]:
        n += 1
    capture.release()
    return n


def test_cli_track_saves_the_video_and_python_track_runs(trained_run, tmp_path):
    video = tmp_path / "walk.mp4"
    scene = cv2.resize(cv2.imread(str(BUS)), (192, 256))
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (128, 128))
    for i in range(10):
        writer.write(np.ascontiguousarray(scene[i * 8 : i * 8 + 128, i * 6 : i * 6 + 128]))  # the camera pans
    writer.release()
    assert frames(video) == 10
    weights = str(trained_run / "weights" / "best.pt")
    r = run_cli("track", f"model={weights}", f"source={video}", "imgsz=64", f"project={tmp_path}", "name=t")
    assert r.returncode == 0, r.stderr[-2000:]
    saved = list((tmp_path / "t").glob("walk.*"))  # saved by default, as `yolo track` does
    assert len(saved) == 1 and frames(saved[0]) == 10
    model = VisionMoE(weights)  # the tracker's `lap` must be installed: tests run with YOLO_AUTOINSTALL=false
    results = model.track(str(video), imgsz=64, save=False, verbose=False)
    assert len(results) == 10 and len(model.predictor.trackers) == 1


def test_cli_predict_val_info(trained_run, tmp_path):
    weights = str(trained_run / "weights" / "best.pt")
    r = run_cli("predict", f"model={weights}", f"source={BUS}", "imgsz=64", f"project={tmp_path}", "name=p")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "p" / "bus.jpg").is_file()
    r = run_cli("val", f"model={weights}", "data=coco8.yaml", "imgsz=64", f"project={tmp_path}", "name=v")
    assert r.returncode == 0 and "mAP50-95" in r.stdout + r.stderr, r.stderr[-2000:]
    r = run_cli("info", "model=visionmoe-yolo-n.yaml", "experts=8")
    assert r.returncode == 0 and "active GFLOPs" in r.stdout + r.stderr and "8 experts" in r.stdout + r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "expertz=4"], "'expertz' is not a valid visionmoe argument. Similar arguments are ['experts=4'"),
        (["train", "top_k=9"], "top_k=9 with experts=4"),
        (["train", "router=hash"], "router='hash'"),
        (["fly"], "unknown mode 'fly'"),
        (["train", "data=missing.yaml"], "'missing.yaml' does not exist"),
        (["train", "model=nope.yaml"], "model 'nope.yaml' not found"),
    ],
)
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, args, message):
    r = run_cli(*args, f"project={tmp_path / 'runs'}", cwd=tmp_path)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("visionmoe error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def test_unreadable_image_is_a_clear_error(trained_run, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        VisionMoE(trained_run / "weights" / "best.pt").predict(str(bad))
    r = run_cli("predict", f"model={trained_run / 'weights' / 'best.pt'}", f"source={bad}", cwd=tmp_path)
    assert r.returncode == 2 and "cannot read image" in r.stderr


def test_missing_dataset_images_fail_before_a_run_folder_exists(tmp_path):
    data = tmp_path / "ghost.yaml"
    data.write_text(f"path: {tmp_path / 'ghost'}\ntrain: images/train\nval: images/val\nnames:\n  0: thing\n")
    r = run_cli("train", f"data={data}", "epochs=1", f"project={tmp_path / 'runs'}", cwd=tmp_path)
    assert r.returncode == 2 and "images not found" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_help():
    r = run_cli("help")
    assert r.returncode == 0 and "visionmoe MODE" in r.stdout + r.stderr

"""`visionmoe compare`: a 1-epoch, 1-seed comparison on COCO8 writes every column; refusals, failures and reruns."""

from __future__ import annotations

import csv
import json

import pytest

from visionmoe.engine.compare import columns, load, matched_baselines, resolve_models

from conftest import run_cli

ARGS = ("data=coco8.yaml", "seeds=1", "epochs=1", "imgsz=64", "batch=4", "nbs=4", "workers=0", "plots=False")
# a dense YAML that resolves (so compare accepts it) but whose model cannot be built (so its run fails)
BROKEN = "nc: 80\nbackbone:\n  - [-1, 1, NoSuchLayer, [16]]\nhead:\n  - [-1, 1, Detect, [nc]]\n"


@pytest.fixture(scope="module")
def models(tmp_root) -> str:
    (tmp_root / "broken.yaml").write_text(BROKEN)
    return f"models=visionmoe-yolo-n.yaml,yolo11n.yaml,{tmp_root / 'broken.yaml'}"


@pytest.fixture(scope="module")
def compared(coco8, tmp_root, models):
    """Folder of one comparison with a model whose run fails, and the CLI's output."""
    project = tmp_root / "runs" / "compare"
    r = run_cli("compare", models, *ARGS, f"project={project}", "name=c", "exist_ok=True")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # the table is written, the failure reported
    errors = [line for line in r.stderr.splitlines() if line.startswith("visionmoe error:")]
    assert len(errors) == 1 and "broken (seed 0 failed" in errors[0] and "NoSuchLayer" in errors[0], r.stderr[-3000:]
    return project / "c", r.stdout + r.stderr


def test_writes_every_column_for_each_model(compared):
    folder, _ = compared
    rows = {r["model"]: r for r in csv.DictReader(open(folder / "compare.csv"))}
    assert list(next(iter(rows.values()))) == columns(gpu=False)
    assert list(rows) == ["visionmoe-yolo-n", "yolo11n", "broken"]
    moe, dense = rows["visionmoe-yolo-n"], rows["yolo11n"]
    single_seed = {"mAP50_std", "mAP50-95_std", "delta_std", "noise_floor"}  # no spread from one seed
    for row in (moe, dense):
        assert row["status"] == "ok" and row["seeds"] == "1"
        assert all(row[c] != "" for c in columns(gpu=False) if c not in single_seed), row
        assert all(row[c] == "" for c in single_seed)
        for c in ("mAP50", "mAP50-95"):
            assert 0 <= float(row[c]) <= 1
        assert float(row["torch_cpu_ms"]) > 0 and float(row["train_s_per_epoch"]) > 0
    assert float(dense["onnx_cpu_ms"]) > 0
    assert moe["onnx_cpu_ms"].startswith("failed:") or float(moe["onnx_cpu_ms"]) > 0  # a failed export is recorded
    assert int(moe["active_params"]) < int(moe["params"]) and dense["active_params"] == dense["params"]
    assert abs(float(moe["active_GFLOPs"]) / float(dense["active_GFLOPs"]) - 1) < 0.01  # same scale, k=1
    assert dense["vs_noise"] == "reference" and float(dense["delta_mAP50-95"]) == 0
    assert moe["vs_noise"] == "n/a (1 seed)"
    md = (folder / "compare.md").read_text()
    assert "visionmoe compare" in md and "Machine:" in md and "| visionmoe-yolo-n | moe |" in md
    assert (folder / "map_vs_gflops.png").stat().st_size > 0 and (folder / "map_vs_latency.png").stat().st_size > 0


def test_failed_run_is_reported_and_the_others_go_on(compared):
    folder, log = compared
    bad = {r["model"]: r for r in csv.DictReader(open(folder / "compare.csv"))}["broken"]
    assert bad["seeds"] == "0" and "failed" in bad["status"] and "NoSuchLayer" in bad["status"]
    assert "broken seed 0 failed" in log
    assert json.loads((folder / "yolo11n" / "seed0.json").read_text())["seed"] == 0


def test_rerun_skips_finished_runs(compared, models):
    folder, _ = compared
    records = {p: p.stat().st_mtime_ns for p in folder.rglob("seed0.json")}
    assert len(records) == 2
    r = run_cli("compare", models, *ARGS, f"project={folder.parent}", "name=c", "exist_ok=True")
    assert r.returncode == 1, r.stderr[-2000:]  # the retried run fails again
    assert "Starting training" not in r.stdout + r.stderr
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("seed0.json")} == records
    assert "broken seed 0 failed" in r.stdout + r.stderr  # failed runs are retried
    assert len(list(csv.DictReader(open(folder / "compare.csv")))) == 3


def test_matched_dense_baselines_are_added_for_moe_only_lists():
    assert matched_baselines(["visionmoe-yolo-n.yaml"]) == ["yolo11n.yaml", "yolo11s.yaml"]
    assert matched_baselines(["visionmoe-yolo-x.yaml"]) == ["yolo11x.yaml"]
    entries = resolve_models("visionmoe-yolo-s.yaml")
    assert [(e.label, e.moe) for e in entries] == [("visionmoe-yolo-s", True), ("yolo11s", False), ("yolo11m", False)]
    assert [e.moe for e in resolve_models("visionmoe-yolo-n.yaml,yolo11n.yaml")] == [True, False]  # no additions


def test_dense_runs_step_with_the_moe_trainers_optimizer_kernels(coco8, tmp_path):
    (entry,) = resolve_models("yolo11n.yaml")
    model = load(entry, entry.name)
    model.train(data="coco8.yaml", epochs=1, imgsz=64, batch=4, nbs=4, workers=0, plots=False, val=False,
                project=str(tmp_path), name="dense")  # fmt: skip
    groups = model.trainer.optimizer.param_groups
    assert groups and all(group["fused"] for group in groups)  # as MoEDetectionTrainer's, so s/epoch is fair


@pytest.mark.parametrize(
    "argv, message",
    [
        (("epochz=1",), "'epochz' is not a valid visionmoe argument"),
        (("seed=1",), "use seeds="),
        (("model=yolo11n.yaml",), "use models="),
        (("seeds=0",), "seeds=0"),
        (("models=foo.yaml", "epochs=1"), "model 'foo.yaml' not found"),
        (("models=visionmoe-yolo-n.yaml,yolo1ln.yaml", "epochs=1"), "model 'yolo1ln.yaml' not found"),
        (("models=yolo11n.yaml,missing.pt",), "model 'missing.pt' not found: no such weights file"),
        (("models=visionmoe-yolo-n.yaml", "top_k=9"), "top_k=9 with experts=4"),
        (("models=yolo11n.yaml", "data=nope.yaml"), "'nope.yaml' does not exist"),
    ],
)
def test_bad_arguments_fail_in_one_line(argv, message, tmp_path):
    r = run_cli("compare", "data=coco8.yaml", *argv, f"project={tmp_path / 'runs'}", cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "runs").exists()  # refused before any run folder exists


def test_dataset_without_images_fails_before_training(tmp_path):
    data = tmp_path / "ghost.yaml"
    data.write_text(f"path: {tmp_path / 'ghost'}\ntrain: images/train\nval: images/val\nnames:\n  0: thing\n")
    r = run_cli("compare", "models=yolo11n.yaml", f"data={data}", f"project={tmp_path / 'runs'}", cwd=tmp_path)
    assert r.returncode == 2 and "images not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "runs").exists()


def test_paired_epochs_finds_where_the_moe_leaves_the_dense_run(tmp_path, monkeypatch):
    """benchmarks/paired_epochs.py: per seed, the first epoch whose mAP differs, and every epoch's delta."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from paired_epochs import paired, report

    maps = {("moe", 0): [0.1, 0.2, 0.35], ("dense", 0): [0.1, 0.2, 0.30], ("moe", 1): [0.1, 0.25, 0.3],
            ("dense", 1): [0.1, 0.2, 0.4], ("moe", 2): [0.5, 0.6, 0.7]}  # fmt: skip
    for (model, seed), values in maps.items():
        run = tmp_path / model / f"seed{seed}"
        run.mkdir(parents=True)
        rows = "".join(f"{e + 1},{m}\n" for e, m in enumerate(values))
        (run / "results.csv").write_text("epoch,  metrics/mAP50-95(B)\n" + rows)  # Ultralytics pads its header
    pairs = paired(tmp_path, "moe", "dense")
    assert sorted(pairs) == [0, 1]  # seed 2 has no dense run
    lines = report(pairs)
    assert lines[:2] == ["seed 0: first differs at epoch 3", "seed 1: first differs at epoch 2"]
    assert lines[-1] == "| 3 | +0.0500 | -0.1000 | -0.0250 |"

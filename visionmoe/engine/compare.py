"""`visionmoe compare`: MoE and dense YOLO models trained alike over several seeds, measured alike, tabled and plotted.

Every model trains on the same data with the same arguments, once per seed (dense YOLO through `ultralytics.YOLO`,
MoE through `VisionMoE`), on the same CPU threads, seed by seed, so that load on the machine hits every model alike.
Each model's size, active GFLOPs (`active_gflops` for both families) and ONNX export come from its first finished
seed; the batch-1 latencies of all models are then measured side by side, each runtime in interleaved rounds with no
other runtime's threads alive (utils.latency). Results go to runs/compare/NAME (project=/name=, incremented as
Ultralytics does): a json per finished run and per model profile, then compare.csv, compare.md and two plots. With
exist_ok=True the folder is reused and finished runs are skipped.
"""

from __future__ import annotations

import csv
import json
import math
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ultralytics import YOLO, __version__ as ultralytics_version
from ultralytics.cfg import DEFAULT_CFG_DICT
from ultralytics.data.utils import check_det_dataset
from ultralytics.nn.tasks import load_checkpoint, yaml_model_load
from ultralytics.utils import LOGGER, RUNS_DIR, TQDM, YAML, plt_settings
from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES
from ultralytics.utils.files import increment_path

from ..data import find_data_yaml
from ..models.yolo.model import VisionMoE
from ..models.yolo.train import check_usable_images, use_fast_kernels
from ..nn.tasks import MOE_BLOCKS, MoEModel, find_model_yaml, load_model_yaml, models_dir
from ..utils import allowed_cpus, use_allowed_cpus
from ..utils.flops import active_gflops
from ..utils.latency import paired_latency, torch_latency_ms

COMPARE_KEYS = ("models", "seeds")  # visionmoe-only keys; all other keys are training arguments
CONTROLLED_KEYS = {"model": "models=", "seed": "seeds="}  # set per run by compare itself
SCALES = "nsmlx"  # YOLO11 scales, smallest first
DEFAULT_MODELS = ("visionmoe-yolo-n.yaml",)
GPU_COLUMNS = ("torch_gpu_ms", "onnx_gpu_ms")


@dataclass(frozen=True)
class Entry:
    """One model of a comparison: as given, its table label (also its folder name) and its family."""

    name: str
    label: str
    moe: bool


def is_moe_model(name: str) -> bool:
    """True for visionmoe YAMLs and checkpoints; anything else (yolo11n.yaml) goes to ultralytics.YOLO."""
    if name.endswith(".pt"):
        return Path(name).is_file() and isinstance(load_checkpoint(name)[0], MoEModel)
    try:
        path, _ = find_model_yaml(name)
    except FileNotFoundError:
        return False
    d = YAML.load(path)
    return "vit" in d or any(row[2] in MOE_BLOCKS for row in d.get("backbone", []) + d.get("head", []))


def check_model(name: str, moe_args: dict[str, Any] | None = None) -> bool:
    """Whether `name` is an MoE model; a spec that no run could train fails here, in one line, before any training.

    Accepted: a YAML that visionmoe or Ultralytics resolves (with MoE settings that fit an MoE YAML), a weights file,
    or the name of official Ultralytics weights (downloaded by the run, as `yolo train` does).
    """
    if name.endswith(".pt"):
        if not Path(name).is_file():
            if Path(name).name in GITHUB_ASSETS_NAMES:
                return False
            raise FileNotFoundError(f"model '{name}' not found: no such weights file")
        try:
            moe = is_moe_model(name)
        except Exception as e:  # pickle, zip and torch errors: any unloadable file
            raise ValueError(f"cannot load weights '{name}': {e}") from e
        if moe and moe_args:
            raise ValueError(f"MoE settings {sorted(moe_args)} apply to models built from a YAML; "
                             f"'{name}' already fixes them")  # fmt: skip
        return moe
    if not name.endswith((".yaml", ".yml")):
        raise ValueError(f"model '{name}' is neither a model YAML nor .pt weights")
    try:
        find_model_yaml(name)  # a YAML file, or a packaged visionmoe model
    except FileNotFoundError:
        try:
            yaml_model_load(name)  # an Ultralytics model such as yolo11n.yaml
        except FileNotFoundError:
            packaged = ", ".join(sorted(p.name for p in models_dir().glob("*.yaml")))
            raise FileNotFoundError(
                f"model '{name}' not found: not a file, a packaged visionmoe model ({packaged}, with a "
                "scale suffix such as -n) or an Ultralytics model YAML (e.g. yolo11n.yaml)"
            ) from None
        return False
    if is_moe_model(name):
        load_model_yaml(name, **(moe_args or {}))  # impossible MoE settings fail now, as in `visionmoe train`
        return True
    return False


def matched_baselines(moe_names: list[str]) -> list[str]:
    """Dense YOLO11 models for MoE models of a YOLO scale: the same scale (same active FLOPs at k=1) and the next
    scale up (similar total parameters)."""
    baselines = []
    for name in moe_names:
        try:
            scale = find_model_yaml(name)[1]
        except FileNotFoundError:
            continue
        if scale in SCALES:
            i = SCALES.index(scale)
            baselines += [f"yolo11{s}.yaml" for s in SCALES[i : i + 2]]
    return list(dict.fromkeys(baselines))


def resolve_models(models: str | list[str] | None, moe_args: dict[str, Any] | None = None) -> list[Entry]:
    """Entries for the models to compare, each checked by `check_model`; with no dense model among them, the matched
    YOLO11 baselines are added."""
    names = [m.strip() for m in models.split(",")] if isinstance(models, str) else list(models or DEFAULT_MODELS)
    names = [n for n in names if n]
    moe = {n: check_model(n, moe_args) for n in names}
    if all(moe.values()):
        added = matched_baselines(names)
        if added:
            LOGGER.info(f"compare: adding matched dense baselines {', '.join(added)} (pass dense models to choose)")
        else:
            LOGGER.warning("compare: no dense baseline for these models; pass one in models= to get deltas")
        names += added
        moe |= dict.fromkeys(added, False)
    entries, seen = [], {}
    for n in names:
        stem = Path(n).stem
        seen[stem] = seen.get(stem, 0) + 1
        entries.append(Entry(n, stem if seen[stem] == 1 else f"{stem}-{seen[stem]}", moe[n]))
    return entries


def _use_allowed_cpus(trainer) -> None:
    use_allowed_cpus(trainer.device)  # dense runs get the threads the MoE trainer takes, so timings are fair


def _use_fast_kernels(trainer) -> None:
    use_fast_kernels(trainer.optimizer)  # and its optimizer kernels, so that s/epoch compares models, not Python loops


def load(entry: Entry, weights: str | Path, moe_args: dict[str, Any] | None = None) -> YOLO | VisionMoE:
    """The model object of an entry: a new model from its YAML, or trained weights."""
    if entry.moe:
        return VisionMoE(weights, **(moe_args or {}))
    model = YOLO(weights)
    model.add_callback("on_pretrain_routine_start", _use_allowed_cpus)
    model.add_callback("on_pretrain_routine_end", _use_fast_kernels)  # the optimizer exists from here on
    return model


def train_run(entry: Entry, seed: int, args: dict[str, Any], moe_args: dict, folder: Path) -> dict:
    """Train one model with one seed (training arguments `args`, data included) and return the run's record."""
    model = load(entry, entry.name, moe_args)
    metrics = model.train(seed=seed, project=str(folder), name=f"seed{seed}", exist_ok=True, **args)
    trainer = model.trainer
    if metrics is None:  # val=False skipped the trainer's final validation on the best weights
        metrics = model.val(data=args["data"], imgsz=trainer.args.imgsz, batch=trainer.args.batch, plots=False)
    rows = list(csv.DictReader(open(trainer.save_dir / "results.csv")))
    return {
        "model": entry.name,
        "seed": seed,
        "mAP50": float(metrics.box.map50),
        "mAP50-95": float(metrics.box.map),
        "epochs": len(rows),
        "train_s_per_epoch": float(rows[-1]["time"]) / len(rows),  # wall time incl. each epoch's validation
        "weights": str(trainer.best if trainer.best.exists() else trainer.last),
    }


def _failure(e: BaseException) -> str:
    return f"failed: {type(e).__name__}: {' '.join(str(e).split())[:160]}"


def profile(entry: Entry, weights: str, imgsz: int, folder: Path) -> dict[str, Any]:
    """Size and active GFLOPs of trained weights, and their batch-1 ONNX export into `folder` (its path under
    'onnx', or the reason it failed under 'onnx_cpu_ms')."""
    model = load(entry, weights)
    net = model.model
    params = sum(p.numel() for p in net.parameters())
    result: dict[str, Any] = {
        "params": params,
        "active_params": net.active_params() if entry.moe else params,
        "active_GFLOPs": active_gflops(net, imgsz),
    }
    try:
        exported = model.export(format="onnx", imgsz=imgsz, batch=1, simplify=False, device="cpu")
        result["onnx"] = str(Path(exported).replace(folder / f"{entry.label}.onnx"))
    except Exception as e:  # one model's export failing must not stop the comparison
        result["onnx_cpu_ms"] = _failure(e)
    return result


def measure_latency(entries: list[Entry], runs: dict, profiles: dict, imgsz: int) -> dict[str, dict[str, Any]]:
    """Batch-1 latencies of every profiled model: eager PyTorch here, in interleaved rounds; ONNX Runtime in child
    processes, each model beside the first dense model alone (see utils.latency), so no thread pool or cache filled
    by a third model disturbs a pair."""
    done = [e for e in entries if e.label in profiles]
    nets = {e.label: load(e, runs[e.label][min(runs[e.label])]["weights"]).model for e in done}
    onnx = {e.label: profiles[e.label]["onnx"] for e in done if "onnx" in profiles[e.label]}
    latency: dict[str, dict[str, Any]] = {e.label: {} for e in done}
    devices = {"cpu": "cpu", "gpu": "cuda"} if torch.cuda.is_available() else {"cpu": "cpu"}
    for column, device in devices.items():
        for label, ms in torch_latency_ms(nets, imgsz, device).items():
            latency[label][f"torch_{column}_ms"] = ms
        try:
            dense = next((e.label for e in done if not e.moe and e.label in onnx), None)
            pairs = paired_latency(onnx, dense, "onnxruntime", imgsz, device=device) if onnx else {}
            timed = {label: ms for label, (ms, _) in pairs.items()}
        except RuntimeError as e:  # e.g. no CUDAExecutionProvider in this onnxruntime
            timed = dict.fromkeys(onnx, _failure(e))
        for label in latency:
            latency[label][f"onnx_{column}_ms"] = timed.get(label, profiles[label].get("onnx_cpu_ms"))
    return latency


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (nan with one value: a single seed has no spread)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def summarise(entries: list[Entry], runs: dict, profiles: dict, failures: dict) -> list[dict[str, Any]]:
    """One row per model. Deltas are paired by seed against the first dense model; the noise floor is the larger
    seed-to-seed std of mAP50-95 of the two models, and a delta within it is no evidence of a difference."""
    ref = next((e for e in entries if not e.moe and runs[e.label]), None)
    rows = []
    for e in entries:
        done = runs[e.label]
        row: dict[str, Any] = {"model": e.label, "family": "moe" if e.moe else "dense", "seeds": len(done)}
        for key in ("mAP50", "mAP50-95"):
            row[key], row[f"{key}_std"] = _mean_std([r[key] for r in done.values()])
        row |= profiles.get(e.label, {})
        row["train_s_per_epoch"] = _mean_std([r["train_s_per_epoch"] for r in done.values()])[0]
        if ref is not None and done:
            base = runs[ref.label]
            paired = [done[s]["mAP50-95"] - base[s]["mAP50-95"] for s in done if s in base]
            row["delta_mAP50-95"], row["delta_std"] = _mean_std(paired)
            row["noise_floor"] = max(row["mAP50-95_std"], _mean_std([r["mAP50-95"] for r in base.values()])[1])
            if e == ref:
                row["vs_noise"] = "reference"
            elif math.isnan(row["noise_floor"]):
                row["vs_noise"] = "n/a (1 seed)"
            else:
                row["vs_noise"] = "within" if abs(row["delta_mAP50-95"]) <= row["noise_floor"] else "beyond"
        lost = failures.get(e.label, {})
        where = {s: f"seed {s}" if isinstance(s, int) else s for s in lost}  # seeds, or the 'profile' step
        row["status"] = "; ".join(f"{where[s]} {msg}" for s, msg in lost.items()) or "ok"
        rows.append(row)
    return rows


def columns(gpu: bool) -> list[str]:
    """Table columns, in order (GPU latencies only on machines with a GPU)."""
    cols = ["model", "family", "seeds", "mAP50", "mAP50_std", "mAP50-95", "mAP50-95_std", "params",
            "active_params", "active_GFLOPs", "torch_cpu_ms", "onnx_cpu_ms"]  # fmt: skip
    cols += list(GPU_COLUMNS) if gpu else []
    return cols + ["train_s_per_epoch", "delta_mAP50-95", "delta_std", "noise_floor", "vs_noise", "status"]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def machine() -> str:
    """One line naming the CPU (and GPU) the comparison ran on, and the library versions."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)  # fmt: skip
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {allowed_cpus()} CPU threads{gpu}; torch {torch.__version__}, ultralytics {ultralytics_version}"


def write_tables(rows: list[dict], save_dir: Path, command: str, ref: str | None) -> None:
    """compare.csv (raw numbers) and compare.md (the command, the machine and the formatted table)."""
    cols = columns(torch.cuda.is_available())
    with open(save_dir / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({c: "" if isinstance(r.get(c), float) and math.isnan(r[c]) else r.get(c, "") for c in cols}
                         for r in rows)  # fmt: skip
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}",
        "",
        "mAP: mean and std over seeds, on the val split. Latency: median ms at batch 1, eager PyTorch (fused) and "
        "ONNX Runtime. delta: mAP50-95 minus the reference's, paired by seed; noise floor: the larger seed std of "
        f"the two models. Reference: {ref or 'none (no dense model finished)'}.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        *("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows),
    ]
    (save_dir / "compare.md").write_text("\n".join(lines) + "\n")


@plt_settings()
def plot(rows: list[dict], save_dir: Path) -> list[Path]:
    """mAP50-95 (mean, with seed std as error bars) against active GFLOPs and against CPU latency."""
    import matplotlib.pyplot as plt

    files = []
    for x_keys, xlabel, name in (
        (("active_GFLOPs",), "active GFLOPs", "map_vs_gflops.png"),
        (("torch_cpu_ms", "onnx_cpu_ms"), "CPU latency, batch 1 (ms)", "map_vs_latency.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4), tight_layout=True)
        for key, marker in zip(x_keys, "os"):
            for r in rows:
                x, y = r.get(key), r.get("mAP50-95")
                if not isinstance(x, (int, float)) or not isinstance(y, float) or math.isnan(y):
                    continue
                err = 0 if math.isnan(r["mAP50-95_std"]) else r["mAP50-95_std"]
                suffix = f" ({key.split('_')[0]})" if len(x_keys) > 1 else ""
                ax.errorbar(x, y, yerr=err, fmt=marker, capsize=3, label=f"{r['model']}{suffix}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mAP50-95")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
        fig.savefig(save_dir / name, dpi=150)
        plt.close(fig)
        files.append(save_dir / name)
    return files


def check_args(args: dict[str, Any]) -> None:
    """Refuse the keys compare sets itself, with the key to use instead."""
    for key, instead in CONTROLLED_KEYS.items():
        if key in args:
            raise ValueError(f"compare sets '{key}' per run; use {instead} instead (e.g. models=a.yaml,b.yaml seeds=3)")
    if "data" not in args:
        raise ValueError("compare needs a dataset: pass data=path/to/data.yaml (e.g. data=synth-shapes.yaml)")


def compare(models: str | list[str] | None = None, seeds: int = 3, moe: dict | None = None, **args: Any) -> list[dict]:
    """Train and measure every model on `args['data']` over `seeds` seeds; returns the table rows.

    The model specs, MoE settings and data are checked first, so a typo fails before any training; a run that
    fails later is recorded in its row's status and the others go on.

    Args:
        models: Model YAMLs or weights, a list or comma-separated; dense baselines are added when all are MoE.
        seeds: Seeds 0..seeds-1, one run per model and seed.
        moe: MoE settings (experts=8, ...) for the MoE models.
        **args: Training arguments (data, epochs, imgsz, batch, device, ...), the same for every run; project, name
            and exist_ok place the comparison folder.
    """
    check_args(args)
    if not (isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1):
        raise ValueError(f"seeds={seeds!r}: use an integer >= 1, the number of seeds (runs) per model")
    command = " ".join(
        ["visionmoe compare", f"models={models if isinstance(models, str) else ','.join(models or DEFAULT_MODELS)}",
         f"seeds={seeds}", *(f"{k}={v}" for k, v in {**(moe or {}), **args}.items())]
    )  # fmt: skip
    entries = resolve_models(models, moe)  # models, then data: a misspelt model never waits for a dataset download
    args["data"] = str(find_data_yaml(args["data"]))
    check_usable_images(check_det_dataset(args["data"]))  # a missing or unusable dataset fails now, as in train
    exist_ok = bool(args.pop("exist_ok", False))
    project = Path(args.pop("project", None) or RUNS_DIR / "compare")
    save_dir = increment_path(project / (args.pop("name", None) or Path(args["data"]).stem), exist_ok, mkdir=True)
    imgsz = args.get("imgsz", DEFAULT_CFG_DICT["imgsz"])
    use_allowed_cpus(torch.device("cpu"))
    LOGGER.info(f"compare: {len(entries)} models x {seeds} seeds -> {save_dir}")

    runs: dict[str, dict[int, dict]] = {e.label: {} for e in entries}
    failures: dict[str, dict[int, str]] = {e.label: {} for e in entries}
    profiles: dict[str, dict] = {}
    pbar = TQDM(total=len(entries) * seeds, desc="compare")
    # Seed-major: every model's seed-s run before any model's seed s+1, so that a machine that speeds up or slows
    # down during the comparison shifts every model's training time alike
    for seed in range(seeds):
        for e in entries:
            folder = save_dir / e.label
            record = folder / f"seed{seed}.json"
            pbar.set_description(f"compare {e.label} seed {seed}")
            if record.is_file():  # finished in an earlier invocation
                runs[e.label][seed] = json.loads(record.read_text())
            else:
                try:
                    runs[e.label][seed] = train_run(e, seed, args, moe if e.moe else {}, folder)
                    record.write_text(json.dumps(runs[e.label][seed], indent=2))
                except Exception as err:  # a failed run is reported in the table; the others go on
                    failures[e.label][seed] = _failure(err)
                    LOGGER.warning(f"compare: {e.label} seed {seed} {failures[e.label][seed]}")
            pbar.update(1)
    for e in entries:
        folder = save_dir / e.label
        profile_file = folder / "profile.json"
        if profile_file.is_file():
            profiles[e.label] = json.loads(profile_file.read_text())
        elif runs[e.label]:
            first = runs[e.label][min(runs[e.label])]
            try:
                profiles[e.label] = profile(e, first["weights"], imgsz, folder)
                profile_file.write_text(json.dumps(profiles[e.label], indent=2))
            except Exception as err:
                failures[e.label]["profile"] = _failure(err)
                LOGGER.warning(f"compare: measuring {e.label} {failures[e.label]['profile']}")
    pbar.close()
    LOGGER.info("compare: timing every model side by side")
    for label, ms in measure_latency(entries, runs, profiles, imgsz).items():
        profiles[label] = {k: v for k, v in profiles[label].items() if k != "onnx"} | ms

    rows = summarise(entries, runs, profiles, failures)
    ref = next((r["model"] for r in rows if r.get("vs_noise") == "reference"), None)
    write_tables(rows, save_dir, command, ref)
    plot(rows, save_dir)
    LOGGER.info(f"compare: results saved to {save_dir}\n" + (save_dir / "compare.md").read_text())
    return rows

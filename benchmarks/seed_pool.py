"""Many seeds at once on one GPU machine: dense YOLO11 and visionmoe recipes trained side by side, then tabled.

    python benchmarks/seed_pool.py run --data D [D ...] \
        --recipes yolo11n.yaml visionmoe-yolo-n.yaml "visionmoe-yolo-n.yaml domain_loss=0.1" --seeds 0 1 2 \
        --parallel 6 --deadline 480 --out DIR -- epochs=20 imgsz=128 batch=16 nbs=16 workers=1
    python benchmarks/seed_pool.py table DIR

`visionmoe compare` trains one run after another, which keeps its s/epoch clean on a CPU; on a GPU machine the
runs of a seed study are small enough to run many at once. `run` starts one process per (data, recipe, seed), at most
`--parallel` at a time, each through the same code as compare (`compare.train_run`; a recipe is a model YAML,
optionally followed by its own settings) or, for the prototype `oracle`, through `oracle_routing.py`. Runs still
going at `--deadline` seconds are stopped and left out of the table; a run that fails stops them all. `table` reads
every run's results.csv and prints, per data set and recipe, mAP50-95 of the best-fitness epoch (the one best.pt
keeps) of the runs that finished, the paired delta against the first recipe with its noise floor (the larger seed
std, as compare's), the mean s/epoch (not clean: the runs share the machine), and each MoE run's dead experts and
NMI with the domain (analysis.json).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROTOTYPES = {"oracle": "oracle_routing.py"}
HERE = Path(__file__).resolve().parent


def recipe_label(recipe: str) -> str:
    """Folder name of a recipe: 'visionmoe-yolo-n.yaml domain_loss=0.1' -> 'visionmoe-yolo-n_domain_loss0.1'."""
    model, *settings = recipe.split()
    return "_".join([Path(model).stem, *(s.replace("=", "") for s in settings)])


def job_command(recipe: str, data: str, seed: int, train: list[str], folder: Path) -> list[str]:
    """The command line of one run, writing its run folder to `folder`."""
    where = [f"data={data}", f"seed={seed}", f"project={folder.parent}", f"name={folder.name}", "exist_ok=True"]
    model, *settings = recipe.split()
    if model in PROTOTYPES:
        return [sys.executable, str(HERE / PROTOTYPES[model]), *where, *settings, *train]
    return [sys.executable, str(Path(__file__).resolve()), "one", model, *where, *settings, *train]


def train_one(recipe: str, args: list[str]) -> None:
    """One run of a model YAML exactly as `visionmoe compare` trains it (dense callbacks included)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    from visionmoe.cli import parse_args
    from visionmoe.engine.compare import Entry, is_moe_model, train_run

    _, overrides, moe = parse_args(["train", *args])
    project = Path(overrides.pop("project"))
    for key in ("name", "exist_ok"):  # compare names the run folder seed<S>, as job_command does
        overrides.pop(key, None)
    seed = int(overrides.pop("seed", DEFAULT_CFG_DICT["seed"]))
    record = train_run(Entry(recipe, Path(recipe).stem, is_moe_model(recipe)), seed, overrides, moe, project)
    (project / f"seed{seed}" / "record.json").write_text(json.dumps(record, indent=1))


def run(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipes.json").write_text(json.dumps([recipe_label(r) for r in args.recipes]))  # the table's order
    jobs = []
    for seed in args.seeds:  # seed-major, so that a deadline cuts the last seeds of every set and recipe alike
        for data in args.data:
            for recipe in args.recipes:
                folder = out / Path(data).parent.name / recipe_label(recipe) / f"seed{seed}"
                jobs.append((folder, job_command(recipe, data, seed, args.train, folder)))
    start, running = time.monotonic(), []
    while jobs or running:
        failed = [f for f, p in running if p.poll() not in (None, 0)]
        if failed:  # a broken recipe breaks every seed of it: stop here rather than spend the machine's time
            print(f"{failed[0].relative_to(out)} failed:\n" + "".join(open(f"{failed[0]}.log").readlines()[-30:]))
            for _, p in running:
                p.terminate()
            raise SystemExit(1)
        for folder in [f for f, p in running if p.poll() == 0]:
            print(f"{time.monotonic() - start:6.0f}s finished {folder.relative_to(out)}", flush=True)
        running = [(f, p) for f, p in running if p.poll() is None]
        while jobs and len(running) < args.parallel and time.monotonic() - start < args.deadline:
            folder, command = jobs.pop(0)
            folder.parent.mkdir(parents=True, exist_ok=True)
            log = open(f"{folder}.log", "w")
            running.append((folder, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)))
            print(f"{time.monotonic() - start:6.0f}s started {folder.relative_to(out)}", flush=True)
        if time.monotonic() - start >= args.deadline:
            for folder, p in running:
                p.terminate()
                print(f"deadline: stopped {folder.relative_to(out)}", flush=True)
            jobs, running = [], []
        time.sleep(2)
    print(f"{time.monotonic() - start:.0f}s all done", flush=True)
    table(out)


def read_run(folder: Path) -> list[dict[str, float]]:
    path = folder / "results.csv"
    if not path.is_file():
        return []
    return [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(open(path))]


def routing_health(folder: Path) -> str:
    """Layers with a dead expert and NMI with the domain by layer, from the analysis.json a finished MoE run writes."""
    path = folder / "analysis.json"
    if not path.is_file():
        return ""
    layers = json.loads(path.read_text())["layers"].values()
    nmi = " ".join(f"{layer['nmi'].get('domain', float('nan')):.2f}" for layer in layers)
    return f"dead in {sum(bool(layer['dead_experts']) for layer in layers)}/{len(layers)}, NMI domain {nmi}"


def table(out: Path) -> list[dict]:
    rows, order = [], json.loads((Path(out) / "recipes.json").read_text())
    for data_dir in sorted(p for p in Path(out).iterdir() if p.is_dir()):
        runs = {r: {s.name: read_run(s) for s in sorted((data_dir / r).iterdir()) if s.is_dir()} for r in order
                if (data_dir / r).is_dir()}  # fmt: skip
        done = [len(epochs) for seeds in runs.values() for epochs in seeds.values() if epochs]
        if not done:
            continue
        epoch = max(done)  # the schedule's length: runs a deadline stopped short of it are left out
        scores: dict[str, dict[str, float]] = {}
        clocks: dict[str, list[float]] = {}
        healths = []
        for recipe, seeds in runs.items():
            for seed, epochs in seeds.items():
                if len(epochs) < epoch:
                    continue
                head = epochs[:epoch]
                best = max(head, key=lambda e: 0.1 * e["metrics/mAP50(B)"] + 0.9 * e["metrics/mAP50-95(B)"])
                scores.setdefault(recipe, {})[seed] = best["metrics/mAP50-95(B)"]
                clocks.setdefault(recipe, []).append(head[-1]["time"] / epoch)
                if health := routing_health(data_dir / recipe / seed):
                    healths.append(f"  {recipe} {seed}: {health}")
        reference = next(iter(scores))  # the first recipe given to `run`
        print(f"\n{data_dir.name}: mAP50-95 at epoch {epoch} (best fitness up to it), paired against {reference}")
        for recipe, by_seed in scores.items():
            values = [by_seed[s] for s in sorted(by_seed)]
            row = {"data": data_dir.name, "recipe": recipe, "epoch": epoch, "seeds": len(values),
                   "per_seed": {s: round(v, 4) for s, v in sorted(by_seed.items())},
                   "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                   "s_per_epoch": statistics.mean(clocks[recipe])}  # fmt: skip
            paired = [by_seed[s] - scores[reference][s] for s in by_seed if s in scores[reference]]
            if recipe != reference and len(paired) > 1:
                floor = max(row["std"], statistics.stdev(scores[reference].values()))
                row |= {"delta": statistics.mean(paired), "delta_std": statistics.stdev(paired), "floor": floor,
                        "verdict": "beyond" if abs(statistics.mean(paired)) > floor else "within"}  # fmt: skip
            rows.append(row)
            delta = (f"  delta {row['delta']:+.4f} +- {row['delta_std']:.4f}, floor {row['floor']:.4f}: "
                     f"{row['verdict']}" if "delta" in row else "")  # fmt: skip
            print(f"  {recipe:<24} {row['mean']:.4f} +- {row['std']:.4f} ({len(values)} seeds, "
                  f"{row['s_per_epoch']:.1f} s/epoch){delta}  {row['per_seed']}")
        print("\n".join(healths))
    (Path(out) / "table.json").write_text(json.dumps(rows, indent=1))
    return rows


def main() -> None:
    if sys.argv[1:2] == ["one"]:
        return train_one(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--data", nargs="+", required=True, help="data YAMLs (their folder names label the table)")
    recipes = "model YAMLs, each optionally with settings ('m.yaml key=value', quoted), or " + ", ".join(PROTOTYPES)
    p.add_argument("--recipes", nargs="+", required=True, help=recipes)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--parallel", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--deadline", type=float, default=float("inf"), help="seconds; runs still going are stopped")
    p.add_argument("--out", required=True)
    p.add_argument("train", nargs="*", help="training arguments after --, the same for every run")
    sub.add_parser("table").add_argument("out")
    args = parser.parse_args()
    run(args) if args.command == "run" else table(Path(args.out))


if __name__ == "__main__":
    main()

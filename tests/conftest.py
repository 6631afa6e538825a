"""Shared test setup: an offline, isolated Ultralytics config with COCO8 in a temporary datasets dir.

The environment is set at import, before any test imports ultralytics, so that its settings file, fonts and
datasets all live in a temp folder and nothing reaches the network. COCO8 is copied from `$VISIONMOE_COCO8` or
`../shared/datasets/coco8` when either holds it; otherwise a stand-in in COCO8's format is built from the images
that the ultralytics wheel ships (coco8_offline.py), so a fresh clone tests offline too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from coco8_offline import build_coco8

ROOT = Path(__file__).resolve().parents[1]
TMP = Path(tempfile.mkdtemp(prefix="visionmoe-tests-"))
OFFLINE_ENV = {
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "false",
    "YOLO_CONFIG_DIR": str(TMP / "config"),
    "MPLCONFIGDIR": str(TMP / "mpl"),
    "YOLO_VERBOSE": "true",
}
os.environ.update(OFFLINE_ENV)


def _coco8_source() -> Path | None:
    for candidate in (os.environ.get("VISIONMOE_COCO8"), ROOT.parent / "shared" / "datasets" / "coco8"):
        if candidate and (Path(candidate) / "images" / "val").is_dir():
            return Path(candidate)
    return None


DATASETS = TMP / "datasets"
COCO8_SOURCE = _coco8_source()
if COCO8_SOURCE:
    shutil.copytree(COCO8_SOURCE, DATASETS / "coco8")
    for path in DATASETS.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # the shared copy is read-only; label caches get written here
else:
    build_coco8(DATASETS / "coco8")

# Ultralytics reads datasets_dir into module constants at import, so the settings file is written by a separate
# interpreter before this one imports ultralytics.
_settings = dict(datasets_dir=str(DATASETS), runs_dir=str(TMP / "runs"), weights_dir=str(TMP / "weights"))
subprocess.run(
    [sys.executable, "-c", f"from ultralytics.utils import SETTINGS; SETTINGS.update({_settings!r})"],
    env={**os.environ, **OFFLINE_ENV},
    check=True,
    capture_output=True,
)


def pytest_report_header() -> str:
    """Say which COCO8 the session tests on."""
    return f"coco8: {COCO8_SOURCE or 'offline stand-in built from the ultralytics assets (coco8_offline.py)'}"


@pytest.fixture(scope="session")
def tmp_root() -> Path:
    """The session's temp folder (datasets/, runs/, config/)."""
    return TMP


@pytest.fixture(scope="session")
def coco8() -> Path:
    """COCO8 inside the temp datasets dir, so data='coco8.yaml' resolves offline."""
    return DATASETS / "coco8"


def run_cli(*args: str, cwd: Path = TMP, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the `visionmoe` console script in a subprocess with the offline environment."""
    exe = Path(sys.executable).with_name("visionmoe")
    env = {**os.environ, **OFFLINE_ENV}
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def trained_run(coco8) -> Path:
    """Run folder of one tiny CLI training on COCO8 (1 epoch, imgsz 64), shared by the end-to-end tests."""
    project = TMP / "runs" / "e2e"
    result = run_cli(
        "train", "data=coco8.yaml", "epochs=1", "imgsz=64", "batch=4", "nbs=4", "workers=0", f"project={project}",
        "name=train", "seed=0",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (project / "train" / "stdout.txt").write_text(result.stdout + result.stderr)
    return project / "train"

"""Small shared helpers: where packaged configs live, CPU threads."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import torch
from ultralytics.data.utils import IMG_FORMATS


def packaged_dir(name: str) -> Path:
    """Folder of packaged YAMLs, `cfg` or `datasets`: inside an installed package, else at a checkout's top level."""
    package = Path(__file__).resolve().parents[1]
    installed = package / name  # setuptools maps the top-level folders into the package (pyproject.toml)
    return installed if installed.is_dir() else package.parent / name


def partial_path(path: Path) -> Path:
    """Hidden name beside `path` under which a new version of it is written before it replaces the old one."""
    return path.with_name(f".{path.name}.partial")


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yield a path to write the new version of `path` to; it replaces `path` only if the block completes, so an
    interrupt leaves the old file or the new one, never half of one."""
    partial = partial_path(path)
    try:
        yield partial
        os.replace(partial, path)  # atomic on POSIX and Windows
    finally:
        partial.unlink(missing_ok=True)


def is_image_file(path: str | Path) -> bool:
    """Whether the file name has an image suffix Ultralytics loads."""
    return Path(path).suffix[1:].lower() in IMG_FORMATS


def readable_image(path: str | Path) -> bool:
    """Whether OpenCV can decode the file (reads its header only, so a check over many files stays cheap)."""
    return cv2.haveImageReader(str(path))


def allowed_cpus() -> int:
    """CPU cores this process may use, from the scheduler's affinity mask (taskset, cgroup cpusets).

    OMP_NUM_THREADS says nothing here: importing Ultralytics sets it to 1 whenever it is unset.
    """
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_allowed_cpus(device: torch.device) -> None:
    """Run CPU work on every allowed core (Ultralytics leaves one core idle, a whole half on 2-core machines)."""
    if device.type == "cpu":
        torch.set_num_threads(allowed_cpus())

"""Datasets: the synthetic multi-domain benchmark set and lookup of packaged data YAMLs."""

from __future__ import annotations

from pathlib import Path

from ..utils import packaged_dir


def find_data_yaml(data: str | Path) -> str | Path:
    """A packaged dataset name ('synth-shapes.yaml') becomes its path; anything else is left to Ultralytics."""
    packaged = packaged_dir("datasets") / str(data)
    if isinstance(data, str) and not Path(data).exists() and Path(data).name == data and packaged.is_file():
        return str(packaged)
    return data

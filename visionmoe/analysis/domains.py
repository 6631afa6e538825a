"""Per-image domain tags of a dataset (e.g. day/night, camera, source dataset), for domain routing matrices.

Format: a CSV with one row `image,domain` per image, where `image` is the image file's stem (name without
extension, so labels/x.txt and images/x.jpg both tag as `x`). Blank lines and lines starting with '#' are skipped,
a first row `image,domain` is a header. The file is found, in order:
  1. the data YAML's `domains:` key: a mapping {image stem: domain} (quote stems that YAML would read as numbers,
     e.g. '000000000036'), or a CSV path (relative to the dataset `path`);
  2. `domains.csv` in the dataset root (the data YAML's `path`, beside images/ and labels/).
Images the tags do not list fall in the domain 'untagged'. Without either source the dataset has no domains.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

DOMAINS_FILE = "domains.csv"
UNTAGGED = "untagged"


def read_domain_csv(path: Path) -> dict[str, str]:
    """{image stem: domain} from a domain CSV; a malformed row fails with its line number."""
    tags: dict[str, str] = {}
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            row = [cell.strip() for cell in row]
            if line == 1 and row == ["image", "domain"]:
                continue
            if len(row) != 2 or not all(row):
                raise ValueError(f"invalid domain file {path} line {line}: expected 'image_stem,domain', got {row}")
            tags[row[0]] = row[1]
    return tags


def load_domains(data: dict[str, Any]) -> dict[str, str] | None:
    """{image stem: domain} for a checked data dict (`check_det_dataset` output), or None if it has no domain tags."""
    root = Path(data.get("path") or ".")
    source = data.get("domains")
    if isinstance(source, dict):
        return {str(k): str(v) for k, v in source.items()}
    if source is not None:
        path = Path(source) if Path(source).is_absolute() else root / source
        if not path.is_file():
            raise FileNotFoundError(f"domain file '{path}' (the data YAML's 'domains' key) does not exist")
        return read_domain_csv(path)
    default = root / DOMAINS_FILE
    return read_domain_csv(default) if default.is_file() else None

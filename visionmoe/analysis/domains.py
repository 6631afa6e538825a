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


def domain_experts(data: dict[str, Any], tags: dict[str, str], num_experts: int) -> dict[str, int]:
    """{domain: expert} for domain routing: the data YAML's `domain_experts:` mapping ({domain: expert index}), or,
    without one, each tagged domain its own expert in name order (needs no more domains than experts)."""
    domains = sorted(set(tags.values()))
    source = data.get("yaml_file", "the data YAML")
    given = data.get("domain_experts")
    if given is None:
        if len(domains) > num_experts:
            raise ValueError(
                f"domain routing: {source} tags {len(domains)} domains for {num_experts} experts; set experts="
                f"{len(domains)}, or map domains to experts with `domain_experts:` in the data YAML"
            )
        return {domain: i for i, domain in enumerate(domains)}
    if not isinstance(given, dict):
        raise ValueError(f"invalid domain_experts in {source}: expected a mapping {{domain: expert index}}")
    mapping = {str(k): v for k, v in given.items()}
    if missing := [d for d in domains if d not in mapping]:
        raise ValueError(f"domain_experts in {source} maps no expert for the tagged domains {missing}; map each one")
    bad = {d: e for d, e in mapping.items() if not (type(e) is int and 0 <= e < num_experts)}
    if bad:
        raise ValueError(f"domain_experts in {source}: {bad} are not expert indices 0..{num_experts - 1} "
                         f"(experts={num_experts})")  # fmt: skip
    return {d: mapping[d] for d in domains}

"""Information measures of routing: entropy and normalised mutual information, pure functions on counts."""

from __future__ import annotations

import numpy as np


def entropy(counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats of the distribution(s) proportional to non-negative `counts` along `axis`.

    A uniform distribution over E outcomes gives log(E); an all-zero row gives 0.
    """
    counts = np.asarray(counts, dtype=np.float64)
    p = counts / np.clip(counts.sum(axis=axis, keepdims=True), 1e-300, None)
    return 0.0 - (p * np.log(np.where(p > 0, p, 1.0))).sum(axis=axis)  # 0 * log 0 = 0; 0.0 - x avoids -0.0


def mutual_information(contingency: np.ndarray) -> float:
    """I(X;Y) in nats from a [rows, cols] contingency matrix of joint counts."""
    joint = np.asarray(contingency, dtype=np.float64)
    total = joint.sum()
    if total <= 0:
        return 0.0
    p = joint / total
    outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / outer[nz])).sum())


def normalized_mutual_information(contingency: np.ndarray) -> float:
    """NMI = I(X;Y) / sqrt(H(X) H(Y)) (geometric-mean normalisation) from a [rows, cols] contingency matrix.

    1 when one variable determines the other, 0 when they are independent. Defined as 0 when either variable is
    constant (zero entropy), since then nothing can be shared. The plug-in estimate is biased upwards by about
    (rows-1)(cols-1) / (2N) nats for N samples, so small samples of independent variables give small positive values.
    """
    joint = np.asarray(contingency, dtype=np.float64)
    h_rows, h_cols = entropy(joint.sum(1)), entropy(joint.sum(0))
    if h_rows <= 0 or h_cols <= 0:
        return 0.0
    return float(np.clip(mutual_information(joint) / np.sqrt(h_rows * h_cols), 0.0, 1.0))

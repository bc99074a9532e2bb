"""VBench-style aggregation (METHODS.md, "VBench scoring"): normalise, weight, Quality / Semantic / Total.

Each dimension x is normalised (x − Min)/(Max − Min) and multiplied by its weight (1; dynamic degree
0.5); Quality = Σ weighted quality dimensions / Σ their weights, Semantic likewise, and
Total = (4·Quality + Semantic)/5.  Paired bootstrap over rows gives 95% intervals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Dimension:
    min: float
    max: float
    weight: float
    group: str  # "quality" or "semantic"


_Q, _S = "quality", "semantic"
# VBench v1, 16 dimensions, with the Min/Max of METHODS.md.
VBENCH: dict[str, Dimension] = {
    "subject_consistency": Dimension(0.1462, 1.0, 1.0, _Q),
    "background_consistency": Dimension(0.2615, 1.0, 1.0, _Q),
    "temporal_flickering": Dimension(0.6293, 1.0, 1.0, _Q),
    "motion_smoothness": Dimension(0.706, 0.9975, 1.0, _Q),
    "dynamic_degree": Dimension(0.0, 1.0, 0.5, _Q),
    "aesthetic_quality": Dimension(0.0, 1.0, 1.0, _Q),
    "imaging_quality": Dimension(0.0, 1.0, 1.0, _Q),
    "object_class": Dimension(0.0, 1.0, 1.0, _S),
    "multiple_objects": Dimension(0.0, 1.0, 1.0, _S),
    "human_action": Dimension(0.0, 1.0, 1.0, _S),
    "color": Dimension(0.0, 1.0, 1.0, _S),
    "spatial_relationship": Dimension(0.0, 1.0, 1.0, _S),
    "scene": Dimension(0.0, 0.8222, 1.0, _S),
    "appearance_style": Dimension(0.0009, 0.2855, 1.0, _S),
    "temporal_style": Dimension(0.0, 0.364, 1.0, _S),
    "overall_consistency": Dimension(0.0, 0.364, 1.0, _S),
}


def normalise(x: float, dim: Dimension) -> float:
    return (x - dim.min) / (dim.max - dim.min)


def aggregate(scores: Mapping[str, float], table: Mapping[str, Dimension]) -> dict[str, float]:
    """{quality, semantic, total} from per-dimension raw scores; every table dimension is required."""
    missing = sorted(set(table) - set(scores))
    if missing:
        raise KeyError(f"scores lack dimensions {missing}; the table needs {sorted(table)}")
    out = {}
    for group in (_Q, _S):
        dims = {k: d for k, d in table.items() if d.group == group}
        weights = sum(d.weight for d in dims.values())
        out[group] = sum(d.weight * normalise(float(scores[k]), d) for k, d in dims.items()) / weights
    out["total"] = (4 * out[_Q] + out[_S]) / 5
    return out


def bootstrap(per_row: np.ndarray, statistic, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of ``statistic(per_row[idx])`` over row resamples (fixed seed:
    deterministic)."""
    per_row = np.asarray(per_row)
    rng = np.random.default_rng(seed)
    values = [statistic(per_row[rng.integers(0, len(per_row), len(per_row))]) for _ in range(n)]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)

"""Aggregating a study's results over seeds: means, sample standard deviations, and comparisons of two means
against the standard error of their difference."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sgtrain.study.grid import Grid

RowKey = tuple[str, str, float, float]  # (bench, method, density_g, density_d): a cell less its seed
Rows = dict[RowKey, dict[str, Any]]  # a table row -> each metric's Stat over seeds, "seeds" and "by_seed"


@dataclass
class Stat:
    """Mean and sample standard deviation over seeds."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        return cls(mean, std, n)

    def text(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}g} ± {self.std:.{digits - 1}g}" if self.n > 1 else f"{self.mean:.{digits}g}"

    def fixed(self, decimals: int = 2) -> str:
        """Mean ± std to a fixed number of decimals (a density: 0.30 ± 0.00, not 0.3 ± 2e-17)."""
        return f"{self.mean:.{decimals}f}" + (f" ± {self.std:.{decimals}f}" if self.n > 1 else "")


def load_results(grid: Grid) -> list[dict[str, Any]]:
    """Every cell's result.json that exists."""
    results = []
    for cell in grid.cells():
        path = grid.out / cell.name / "result.json"
        if path.is_file():
            results.append(json.loads(path.read_text()))
    return results


def aggregate(results: list[dict[str, Any]]) -> Rows:
    """Rows (bench, method, density_g, density_d) -> each numeric metric's :class:`Stat` over seeds."""
    groups: dict[RowKey, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["bench"], r["method"], r["density_g"], r["density_d"]), []).append(r)
    rows = {}
    for key, members in groups.items():
        # The numeric keys every seed has (a result written by older code may lack a newer metric).
        numeric = [
            k
            for k, v in members[0].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and all(k in m for m in members)
        ]
        rows[key] = {k: Stat.of([float(m[k]) for m in members]) for k in numeric if k not in ("seed", "step")}
        rows[key]["seeds"] = sorted(m["seed"] for m in members)
        # Each seed's value too, in seed order: with 3 seeds one collapsed run moves a mean more than a method does.
        ordered = sorted(members, key=lambda m: m["seed"])
        rows[key]["by_seed"] = {k: [float(m[k]) for m in ordered] for k in numeric if k not in ("seed", "step")}
    return rows


@dataclass
class Comparison:
    """How method A fares against B on one metric: the gain of A (positive: A better) and its standard error."""

    gain: float
    se: float
    seeds: int  # the fewer seeds of the two

    @property
    def verdict(self) -> str:
        if self.seeds < 2:
            return "no spread"  # one seed: no way to tell a difference from noise
        # Two standard errors of the difference of means: with 3 seeds, a rough but honest line between a
        # difference and noise.
        if self.gain > 2 * self.se:
            return "better"
        if self.gain < -2 * self.se:
            return "worse"
        return "within noise"


def compare(a: Stat, b: Stat, lower_is_better: bool) -> Comparison:
    """A against B: the gain of A's mean and the standard error of the difference of two independent means."""
    gain = (b.mean - a.mean) if lower_is_better else (a.mean - b.mean)
    return Comparison(gain, math.sqrt(a.std**2 / a.n + b.std**2 / b.n), min(a.n, b.n))

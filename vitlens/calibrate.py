"""Calibration of ``auto``: how often it finds planted high modes and how often it invents one.

``python -m vitlens.calibrate [--draws N] [--seed S] [--grids 16x16 37x37 ...] [--families ...]``
prints one Markdown row per (family, grid): the share of draws where a true outlier was flagged
(for families without outliers: any token), the share of true outliers recovered, the share
of draws where a bulk token was flagged and the share of bulk tokens flagged (the per-token
false-positive rate); it exits 1 when a row misses the issue's target.
Every draw samples the family's parameters in its stated ranges (nothing is hand-picked).
``--detector FILE.py:FUNCTION`` measures another threshold function (norms -> float or None),
e.g. an older version of ``auto_threshold``. The table is in docs/outliers.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .analysis.outliers import auto_threshold

BULK, OUTLIER, BETWEEN = 0, 1, 2  # token labels; BETWEEN tokens are neither counted as found nor as false
Draw = tuple[np.ndarray, np.ndarray]  # norms [n], labels [n]
MAIN_GRIDS = ((16, 16), (37, 37), (74, 74), (24, 40))
SMALL_GRIDS = ((2, 2), (3, 3), (4, 4), (6, 6), (8, 8))


@dataclass(frozen=True)
class Family:
    """A synthetic norm distribution: ``sample(rng, count)`` -> (norms, labels)."""

    name: str
    description: str
    positive: bool
    sample: Callable[[np.random.Generator, int], Draw]
    grids: tuple[tuple[int, int], ...] = MAIN_GRIDS
    target: float = 0.99  # positives: found and recovered at least this; negatives: false alarms at most 1 - this


def _labelled(bulk: np.ndarray, high: np.ndarray, between: np.ndarray | None = None) -> Draw:
    between = np.empty(0) if between is None else between
    norms = np.concatenate([bulk, high, between])
    labels = np.concatenate([np.full(bulk.size, BULK), np.full(high.size, OUTLIER), np.full(between.size, BETWEEN)])
    return norms, labels


def _uniform_bulk(rng: np.random.Generator, count: int) -> Draw:
    high = max(1, round(rng.uniform(0.005, 0.05) * count))
    low = rng.choice([10.0, 20.0])
    return _labelled(rng.uniform(low, 60.0, count - high), rng.uniform(150.0, 500.0, high))


def _lognormal_5_10(rng: np.random.Generator, count: int) -> Draw:
    median = rng.uniform(5.0, 50.0)
    high = int(rng.integers(1, 28))
    bulk = median * rng.lognormal(0.0, rng.uniform(0.15, 0.3), count - high)
    return _labelled(bulk, median * rng.uniform(5.0, 10.0, high))


def _skewed_bulk(rng: np.random.Generator, count: int, median: float) -> np.ndarray:
    """Lognormal below the median (sigma 0.15-0.3); above it stretched so the largest is 2.6-2.8x the median."""
    z = rng.standard_normal(count)
    upper = z > 0
    z[upper] *= np.log(rng.uniform(2.6, 2.8)) / z.max()
    z[~upper] *= rng.uniform(0.15, 0.3)
    return median * np.exp(z)


def _mode_size(rng: np.random.Generator, count: int) -> int:
    return max(3, round(rng.uniform(0.01, 0.03) * count))


def _sparse_mode(rng: np.random.Generator, count: int) -> Draw:
    median, high = rng.uniform(5.0, 50.0), _mode_size(rng, count)
    mode = median * np.exp(rng.uniform(np.log(3.5), np.log(10.0), high))
    return _labelled(_skewed_bulk(rng, count - high, median), mode)


def _sparse_mode_between(rng: np.random.Generator, count: int) -> Draw:
    median, high, between = rng.uniform(5.0, 50.0), _mode_size(rng, count), int(rng.integers(1, 4))
    bulk = _skewed_bulk(rng, count - high - between, median)
    mode = median * np.exp(rng.uniform(np.log(3.5), np.log(10.0), high))
    margin = np.log(1.05)  # strictly inside the gap: at least 1.05x from the bulk and from the mode
    middle = np.exp(rng.uniform(np.log(bulk.max()) + margin, np.log(mode.min()) - margin, between))
    return _labelled(bulk, mode, middle)


def _quarter_to_half(rng: np.random.Generator, count: int) -> Draw:
    median = rng.uniform(5.0, 50.0)
    high = max(1, min(count // 2, round(rng.uniform(0.25, 0.5) * count)))
    bulk = median * rng.lognormal(0.0, rng.uniform(0.1, 0.3), count - high)
    return _labelled(bulk, median * rng.uniform(5.0, 10.0, high))


def _pooled(rng: np.random.Generator, count: int, one: Callable[[np.random.Generator, int], Draw], jitter: float) -> Draw:
    """2-8 images of ``one`` (each ``count`` tokens) concatenated, each scaled by up to ``jitter``."""
    draws = [one(rng, count) for _ in range(int(rng.integers(2, 9)))]
    scales = 20.0 * np.exp(rng.uniform(-np.log(jitter), np.log(jitter), len(draws)))
    norms = [norms / np.median(norms[labels == BULK]) * scale for (norms, labels), scale in zip(draws, scales)]
    return np.concatenate(norms), np.concatenate([labels for _, labels in draws])


def _normal(rng: np.random.Generator, count: int) -> Draw:
    return _labelled(np.abs(rng.normal(40.0, 40.0 * rng.uniform(0.05, 0.25), count)), np.empty(0))


def _lognormal(rng: np.random.Generator, count: int) -> Draw:
    return _labelled(20.0 * rng.lognormal(0.0, rng.uniform(0.1, 1.0), count), np.empty(0))


def _gamma(rng: np.random.Generator, count: int) -> Draw:
    return _labelled(rng.gamma(rng.uniform(1.0, 20.0), 10.0, count), np.empty(0))


def _pareto3(rng: np.random.Generator, count: int) -> Draw:
    return _labelled(10.0 * (1.0 + rng.pareto(3.0, count)), np.empty(0))


def _abs_t3(rng: np.random.Generator, count: int) -> Draw:
    return _labelled(10.0 * np.abs(rng.standard_t(3.0, count)), np.empty(0))


def _pooled_lognormal(rng: np.random.Generator, count: int) -> Draw:
    one = lambda r, c: _labelled(r.lognormal(0.0, r.uniform(0.1, 0.5), c), np.empty(0))  # noqa: E731
    return _pooled(rng, count, one, 1.25)


FAMILIES = (
    Family("uniform_bulk", "bulk uniform 10-60 or 20-60; 0.5-5% of tokens uniform 150-500", True, _uniform_bulk),
    Family("lognormal_5_10x", "lognormal bulk (sigma 0.15-0.3); 1-27 tokens at 5-10x the median", True, _lognormal_5_10),
    Family("sparse_mode", "bulk whose right tail reaches 2.6-2.8x the median; 1-3% of tokens (at least 3) "
           "log-uniform over 3.5-10x the median", True, _sparse_mode),
    Family("sparse_mode_between", "sparse_mode plus 1-3 in-between tokens (log-uniform in the gap, 1.05x clear "
           "of both sides; not scored)", True, _sparse_mode_between),
    Family("quarter_to_half", "25-50% of tokens at 5-10x the median over a lognormal bulk (sigma 0.1-0.3)",
           True, _quarter_to_half, grids=SMALL_GRIDS),
    Family("pooled_lognormal_5_10x", "2-8 images of lognormal_5_10x concatenated, each image's bulk median 18-22",
           True, lambda rng, count: _pooled(rng, count, _lognormal_5_10, 1.1)),
    Family("normal", "normal bulk, mean 40, sd 5-25% of the mean", False, _normal),
    Family("lognormal", "lognormal bulk, sigma 0.1-1", False, _lognormal),
    Family("gamma", "gamma bulk, shape 1-20", False, _gamma),
    Family("pareto3", "Pareto bulk, tail index 3 (heavy-tailed)", False, _pareto3, target=0.95),
    Family("abs_t3", "|Student t| bulk, 3 degrees of freedom (heavy-tailed)", False, _abs_t3, target=0.95),
    Family("pooled_lognormal", "2-8 lognormal images (sigma 0.1-0.5) concatenated, each image's median 16-25",
           False, _pooled_lognormal),
)


@dataclass(frozen=True)
class Cell:
    """One (family, grid) of the table."""

    family: Family
    grid: tuple[int, int]
    draws: int
    found: float  # draws with any true outlier flagged (positives) or any token flagged (negatives)
    recovered: float  # true outliers flagged / true outliers (positives)
    bulk_flagged: float  # draws with any bulk token flagged
    bulk_token_rate: float  # bulk tokens flagged / bulk tokens (the per-token false-positive rate)
    seconds_per_draw: float

    @property
    def passed(self) -> bool:
        if self.family.positive:
            return self.found >= self.family.target and self.recovered >= self.family.target and self.bulk_flagged == 0
        return self.found <= 1 - self.family.target + 1e-12


def run_cell(family: Family, grid: tuple[int, int], draws: int, seed: int,
             detector: Callable[[np.ndarray], float | None] = auto_threshold) -> Cell:
    """``draws`` draws of ``family`` at ``grid`` through ``detector``."""
    rng = np.random.default_rng([seed, FAMILIES.index(family) if family in FAMILIES else 99, *grid])
    found = recovered = truth = bulk_flagged = bulk_hits = bulk_tokens = 0
    seconds = 0.0
    for _ in range(draws):
        norms, labels = family.sample(rng, grid[0] * grid[1])
        start = time.perf_counter()
        threshold = detector(norms)
        seconds += time.perf_counter() - start
        flagged = norms > threshold if threshold is not None else np.zeros(norms.size, dtype=bool)
        hits = int((flagged & (labels == OUTLIER)).sum())
        found += hits > 0 if family.positive else flagged.any()
        recovered, truth = recovered + hits, truth + int((labels == OUTLIER).sum())
        false_hits = int((flagged & (labels == BULK)).sum())
        bulk_flagged += false_hits > 0
        bulk_hits, bulk_tokens = bulk_hits + false_hits, bulk_tokens + int((labels == BULK).sum())
    return Cell(family, grid, draws, found / draws, recovered / truth if truth else float("nan"),
                bulk_flagged / draws, bulk_hits / bulk_tokens, seconds / draws)


def table(cells: list[Cell]) -> str:
    """The Markdown table of ``cells``."""
    lines = ["| family | grid | draws | found in | outliers recovered | draws with a bulk token flagged "
             "| bulk tokens flagged | target met |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for cell in cells:
        recovered = f"{cell.recovered:.1%}" if cell.family.positive else "-"
        lines.append(f"| {cell.family.name} | {cell.grid[0]}x{cell.grid[1]} | {cell.draws} | {cell.found:.1%} | "
                     f"{recovered} | {cell.bulk_flagged:.1%} | {cell.bulk_token_rate:.3%} | "
                     f"{'yes' if cell.passed else 'NO'} |")
    return "\n".join(lines)


def timing(cells: list[Cell]) -> str:
    """Mean detector time per call for each grid, over the single-image families."""
    single = [cell for cell in cells if not cell.family.name.startswith("pooled")]
    grids = sorted({cell.grid for cell in single}, key=lambda grid: grid[0] * grid[1])
    parts = [f"{rows}x{cols}: {np.mean([c.seconds_per_draw for c in single if c.grid == (rows, cols)]) * 1e3:.2f} ms"
             for rows, cols in grids]
    return "Detector time per call (single images): " + ", ".join(parts)


def load_detector(spec: str) -> Callable[[np.ndarray], float | None]:
    """``FILE.py:FUNCTION`` -> that function."""
    path, _, name = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location("calibrated_detector", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module  # dataclasses look their module up there
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def _grid(text: str) -> tuple[int, int]:
    rows, _, cols = text.lower().partition("x")
    return int(rows), int(cols or rows)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vitlens.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=300, help="draws per (family, grid) (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grids", nargs="+", type=_grid, default=None,
                        help="grids such as 16x16 37x37 (default: each family's own)")
    parser.add_argument("--families", nargs="+", choices=[f.name for f in FAMILIES], default=None)
    parser.add_argument("--detector", default=None, help="FILE.py:FUNCTION to measure instead of auto_threshold")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    detector = load_detector(args.detector) if args.detector else auto_threshold
    families = [f for f in FAMILIES if args.families is None or f.name in args.families]
    cells = [run_cell(family, grid, args.draws, args.seed, detector)
             for family in families for grid in (args.grids or family.grids)]
    print(table(cells))
    print("\n" + timing(cells))
    return 0 if all(cell.passed for cell in cells) else 1


if __name__ == "__main__":
    sys.exit(main())

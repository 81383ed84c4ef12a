"""Time and peak memory of each evidence analysis on 1,000 images' tokens of a ViT-S/14 at 224 px.

    python bench/evidence_speed.py [--images 1000]

The tokens are synthetic arrays of the captured shapes and dtypes (grid 16x16, 384 channels,
float16 states, 2% outlier cells), so this measures the analyses, not the forward passes (those
are in docs/benchmarks.md). Peak memory is what ``tracemalloc`` sees NumPy allocate during the
analysis, on top of its inputs.
"""
from __future__ import annotations

import argparse
import time
import tracemalloc
from typing import Callable

import numpy as np

from vitlens.analysis.lost import lost
from vitlens.analysis.probes import LocalSample, global_probe, local_probes
from vitlens.analysis.redundancy import redundancy

GRID = (16, 16)
CELLS = 256
CHANNELS = 384
PIXELS = 14 * 14 * 3


def _measure(name: str, run: Callable[[], object]) -> None:
    tracemalloc.start()
    start, cpu = time.perf_counter(), time.process_time()
    run()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"| {name} | {seconds:.2f} | {cpu:.2f} | {peak / 2**20:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    images = parser.parse_args().images
    rng = np.random.default_rng(0)
    masks = [rng.uniform(size=GRID) < 0.02 for _ in range(images)]
    similarities = [rng.uniform(size=GRID).astype(np.float32) for _ in range(images)]
    samples = [LocalSample(rng.normal(size=(CELLS, CHANNELS)).astype(np.float16),
                           rng.normal(size=(CELLS, PIXELS)).astype(np.float16), mask.ravel()) for mask in masks]
    inputs = sum(s.tokens.nbytes + s.pixels.nbytes for s in samples)
    vectors = rng.normal(size=(images, CHANNELS)).astype(np.float32)
    labels = rng.integers(0, 10, size=images)
    keys = [rng.normal(size=(CELLS, CHANNELS)).astype(np.float32) for _ in range(min(images, 1000))]
    print(f"{images} images; local-probe inputs {inputs / 2**20:.0f} MiB (float16 tokens + pixels)\n")
    print("| analysis | wall s | CPU s | peak MiB (beyond inputs) |\n|---|---|---|---|")
    _measure("redundancy (AUROC)", lambda: redundancy(similarities, masks))
    _measure("local probes (position + pixels)", lambda: local_probes(samples, GRID))
    _measure("global probe (one token kind)", lambda: global_probe(vectors, labels))
    _measure(f"LOST ({len(keys)} images)", lambda: [lost(k, GRID) for k in keys])


if __name__ == "__main__":
    main()

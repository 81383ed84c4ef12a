"""Benchmark of the register-neuron finder and of the test-time register.

``python bench/interventions.py [--images 100] [--model vit_small_patch14_dinov2] [--size 224]
[--batch 8] [--repeats 5] [--device cpu|cuda]``

1. ``neurons``: ``score_neurons`` over ``--images`` generated pictures written as PNG files (decoded
   through the same path as the CLI) on the synthetic demo weights (random weights with planted
   outliers, so every image has outliers): wall time, images per second, and the peak resident
   memory of the process above what it held after loading the model (``ru_maxrss``).
2. ``test-time register``: ``capture`` with and without a test-time register on the same batch,
   interleaved, ``--repeats`` times: median times and their ratio (target at most 1.10).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitlens.analysis.neurons import ImageBatches, score_neurons  # noqa: E402
from vitlens.capture import capture  # noqa: E402
from vitlens.interventions import TestTimeRegister  # noqa: E402
from vitlens.models import load_model  # noqa: E402

REGISTER_TARGET = 1.10


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _write_images(folder: Path, count: int, size: int) -> list[Path]:
    paths = []
    for index in range(count):
        rng = np.random.default_rng(index)
        y, x = np.mgrid[0:size, 0:size]
        pixels = np.stack([x, y, (x + y) // 2], axis=-1) * 255 / size + rng.normal(0, 20, (size, size, 3))
        path = folder / f"{index:04d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_neurons(loaded, paths: list[Path], size: int, batch: int) -> None:
    before = _peak_mib()
    start, start_cpu = time.perf_counter(), time.process_time()
    scores = score_neurons(loaded, ImageBatches(loaded, paths, side=size, batch=batch))
    _sync(loaded.device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    top = scores.top(3)
    print(f"neurons: {len(paths)} images in {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU ({len(paths) / seconds:.1f} "
          f"images/s), batch {batch}, "
          f"peak RSS {_peak_mib():.0f} MiB (+{_peak_mib() - before:.0f} MiB over the loaded model); "
          f"{scores.images_with_outliers} images with outliers; top: "
          + ", ".join(f"({n.layer}, {n.neuron}) {n.score:.1f}" for n in top))


def bench_register(loaded, size: int, batch: int, repeats: int) -> None:
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    depth = len(loaded.model.blocks)
    register = TestTimeRegister(((depth // 2, 0), (depth // 2, 1)))
    runs = {"plain": lambda: capture(loaded, pixels), "register": lambda: capture(loaded, pixels, test_time_register=register)}
    for run in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}  # process CPU seconds: steadier on a shared machine
    for _ in range(repeats):
        for name, run in runs.items():
            _sync(loaded.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            _sync(loaded.device)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    plain, treated = statistics.median(times["plain"]), statistics.median(times["register"])
    ratio, best = treated / plain, min(times["register"]) / min(times["plain"])
    cpu_ratio = statistics.median(cpu["register"]) / statistics.median(cpu["plain"])
    flag = "" if min(ratio, best, cpu_ratio) <= REGISTER_TARGET else f"  MISSES the {REGISTER_TARGET:.2f}x target"
    print(f"test-time register: capture {1000 * plain / batch:.1f} ms/image plain, {1000 * treated / batch:.1f} ms/image "
          f"with the register; ratio {ratio:.3f} (median wall), {best:.3f} (best wall), {cpu_ratio:.3f} (median CPU "
          f"time) over {repeats} interleaved runs{flag}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100, help="0: only the register benchmark")
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model, "synthetic", device=args.device)
    print(f"{args.model} (synthetic weights) at {args.size} px on {args.device}, torch threads {torch.get_num_threads()}")
    bench_register(loaded, args.size, 1, args.repeats)
    if not args.images:
        return 0
    with tempfile.TemporaryDirectory() as folder:
        paths = _write_images(Path(folder), args.images, args.size)
        bench_neurons(loaded, paths, args.size, args.batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

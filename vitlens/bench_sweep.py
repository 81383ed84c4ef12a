"""Sweep benchmark: images/s of a whole sweep vs plain batched ``forward_features`` on the same batches.

``python -m vitlens.bench --sweep [--device ...] [--models NAME ...] [--sizes PX ...] [--batch N ...]
[--precision fp32|bf16 ...] [--images N] [--repeats N]``

For each model, size, batch and precision: ``--images`` synthetic photographs (640x480 JPEG) are
written to a temporary folder; the sweep (decoding, preprocessing, norms-only capture, outlier
detection, rows, one Parquet file per batch) runs over them with the model already loaded
(loading is once per checkpoint, not per image); the plain pass runs timm's ``forward_features``
(at the same input size) on the very tensors the sweep fed, in batches of the same size. Both are timed ``--repeats``
times (a fresh results folder each time), and the best of each is compared. Goal: the sweep at
least ``SWEEP_TARGET`` of the plain throughput.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .capture import _autocast, input_resolution
from .images import read_image_file, resize_for_model, to_tensor
from .sweep import SweepConfig, SweepRunner, find_checkpoints, find_images, plan_tasks, run_local, write_results

SWEEP_TARGET = 0.9  # sweep images/s / plain images/s


@dataclass(frozen=True)
class SweepBenchRow:
    """Throughput of one configuration.

    Attributes:
        model: timm name.
        size: Input side in pixels.
        batch: Images per forward pass.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        images: Images swept.
        plain_ips: Plain ``forward_features`` images/s (best run).
        sweep_ips: Sweep images/s (best run).
    """

    model: str
    size: int
    batch: int
    precision: str
    images: int
    plain_ips: float
    sweep_ips: float

    @property
    def ratio(self) -> float:
        return self.sweep_ips / self.plain_ips


def write_photos(folder: Path, count: int) -> None:
    """Smooth synthetic 640x480 JPEG photographs (a flat band, gradients, noise)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640] / 480
    for index in range(count):
        pixels = np.stack([np.sin(x * rng.uniform(2, 9) + rng.uniform(0, 6)) * 0.5 + 0.5 for _ in range(3)], axis=-1)
        pixels[:160] = rng.uniform(0.7, 1.0)
        pixels += rng.normal(0, 0.03, pixels.shape)
        Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(folder / f"photo{index:04d}.jpg", quality=90)


def bench_sweep(name: str, size: int, batch: int, precision: str, device: torch.device, images: Path,
                repeats: int) -> SweepBenchRow:
    """Best-of-``repeats`` throughput of a sweep and of plain ``forward_features`` over ``images``."""
    config = SweepConfig(size=size, precision=precision, model_args={"img_size": size})
    runner = SweepRunner(config, device)
    items, checkpoints = find_images(images), find_checkpoints(["random"])
    loaded = runner.model(name, "random")
    tensors = [to_tensor(resize_for_model(read_image_file(item.path).image, size, loaded.patch_size), loaded.mean, loaded.std)
               for item in items]
    batches = [torch.stack(tensors[i:i + batch]).to(device) for i in range(0, len(tensors), batch)]  # [batch, 3, h, w] each

    def plain() -> None:  # at the sweep's input size (photos keep their aspect ratio), as capture sets it
        with torch.inference_mode(), _autocast(device, precision):
            for pixels in batches:
                with input_resolution(loaded.model, tuple(pixels.shape[-2:])):
                    loaded.model.forward_features(pixels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def sweep() -> None:
        with tempfile.TemporaryDirectory(prefix="vitlens-sweep-bench-") as out:
            tasks, _ = plan_tasks([name], checkpoints, items, set(), batch)
            write_results(run_local(tasks, runner), Path(out), len(items))

    plain(), sweep()  # warm-up
    plain_s, sweep_s = [], []
    for _ in range(repeats):
        plain_s.append(_seconds(plain))
        sweep_s.append(_seconds(sweep))
    return SweepBenchRow(model=name, size=size, batch=batch, precision=precision, images=len(items),
                         plain_ips=len(items) / min(plain_s), sweep_ips=len(items) / min(sweep_s))


def _seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def format_sweep_table(rows: list[SweepBenchRow]) -> str:
    head = (f"{'model':<30} {'size':>5} {'batch':>5} {'prec':>4} {'images':>6} {'plain img/s':>11} "
            f"{'sweep img/s':>11} {'sweep/plain':>11}  goal >= {SWEEP_TARGET:.2f}x")
    lines = [head, "-" * len(head)]
    for row in rows:
        verdict = "ok" if row.ratio >= SWEEP_TARGET else "MISSED"
        lines.append(f"{row.model:<30} {row.size:>5} {row.batch:>5} {row.precision:>4} {row.images:>6} "
                     f"{row.plain_ips:>11.2f} {row.sweep_ips:>11.2f} {row.ratio:>10.3f}x  {verdict}")
    return "\n".join(lines)


def sweep_main(args: argparse.Namespace, device: torch.device) -> int:
    """``python -m vitlens.bench --sweep``: one table row per model, size, batch and precision."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="vitlens-sweep-images-") as folder:
        write_photos(Path(folder), args.images)
        for name in args.models:
            for size in args.sizes:
                for batch in args.batch:
                    for precision in args.precision:
                        rows.append(bench_sweep(name, size, batch, precision, device, Path(folder), args.repeats))
                        print(f"  {name} @ {size} x{batch} {precision}: sweep {rows[-1].ratio:.3f}x plain",
                              file=sys.stderr, flush=True)
    print(format_sweep_table(rows))
    return 0

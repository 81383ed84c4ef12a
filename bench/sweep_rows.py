"""Row building of a sweep on the host: milliseconds per image of ``vitlens.sweep.task_table``.

``python bench/sweep_rows.py [--model NAME] [--size PX] [--images N] [--repeats N] [--profile FILE]``

Builds ``--images`` real traces once (a narrow model, width 64, at the real depth and patch grid of
``--model`` at ``--size``, with high-norm tokens planted from its middle block on every other
image, so both of ``auto``'s outcomes occur), then times ``task_table`` (outlier detection on
every layer, histograms, Parquet columns) over them in one batch; best and median of
``--repeats``. The forward pass is not timed: on a GPU it is a few ms per batch, so this is the
host cost that bounds a sweep's throughput. ``--profile`` writes a cProfile of one more run.
"""
from __future__ import annotations

import argparse
import cProfile
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vitlens.capture import Trace, capture  # noqa: E402
from vitlens.models import load_model  # noqa: E402
from vitlens.sweep import Checkpoint, ImageItem, SweepConfig, Task, task_table  # noqa: E402
from vitlens.synthetic import plant  # noqa: E402


def traces(model: str, size: int, count: int) -> list[Trace]:
    """``count`` traces of a width-64 copy of ``model`` at ``size``; odd ones with planted outliers."""
    args = dict(embed_dim=64, num_heads=4, img_size=size)
    plain = load_model(model, "random", model_args=args)
    planted = load_model(model, "random", model_args=args)
    grid = tuple(planted.model.patch_embed.grid_size)
    cells = [(1, 2), (grid[0] - 1, 0), (2, grid[1] - 2), (grid[0] // 2, grid[1] // 2)]
    plant(planted.model, cells, len(planted.model.blocks) // 2)
    generator = torch.Generator().manual_seed(0)
    out = []
    for index in range(count):
        loaded = planted if index % 2 else plain
        pixels = torch.randn(1, 3, size, size, generator=generator)  # [batch, 3, height, width]
        out += capture(loaded, pixels, attention=False)
    return out


def time_rows(traces_: list[Trace], repeats: int) -> list[float]:
    """Milliseconds per image of ``task_table`` over all traces, per repeat."""
    task, items, config = _task(len(traces_))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        task_table(task, items, traces_, "random:bench", config)
        times.append(1000 * (time.perf_counter() - start) / len(traces_))
    return times


def _task(count: int) -> tuple[Task, list[ImageItem], SweepConfig]:
    items = [ImageItem(f"img{index:04d}.jpg", f"/images/img{index:04d}.jpg") for index in range(count)]
    return Task("bench", Checkpoint("random", None), tuple(items)), items, SweepConfig()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch14_dinov2")
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    built = traces(args.model, args.size, args.images)
    times = time_rows(built, args.repeats)
    layers, tokens = built[0].norms.shape
    print(f"{args.model} at {args.size} px ({layers} layers x {tokens} tokens), {args.images} images: "
          f"row building best {min(times):.2f} ms/image, median {statistics.median(times):.2f} ms/image")
    if args.profile:
        task, items, config = _task(len(built))
        cProfile.runctx("task_table(task, items, built, 'random:bench', config)", globals(),
                        {"task": task, "items": items, "built": built, "config": config}, str(args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())

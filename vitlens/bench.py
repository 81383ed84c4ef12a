"""Capture benchmark: plain ``forward_features`` vs ``capture`` vs a sweep's capture vs a cache hit, per image.

``python -m vitlens.bench [--device auto|cpu|cuda] [--precision fp32|bf16 ...] [--models NAME ...]
[--sizes PX ...] [--batch N ...] [--repeats N] [--warmup N] [--sweep [--images N]]``

Each row builds one model with random weights at that input size (so nothing is resampled) and
times, interleaved so that a busy machine slows all alike: timm's own ``forward_features``,
``vitlens.capture.capture`` (norms of every block, prefix attention, copies to the host), the
norms-only capture a sweep runs (``attention=False``), and ``TraceStore.get`` of the traces just
captured, from a fresh store in a temporary folder. Times are medians over ``--repeats`` after
``--warmup`` untimed runs. Targets: capture at most 1.10x the plain pass, a cache hit under
50 ms; rows that miss one are flagged. ``--sweep`` times a whole sweep instead (see
``vitlens.bench_sweep``).
"""
from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .bench_sweep import SWEEP_TARGET, sweep_main
from .capture import PRECISIONS, Trace, _autocast, capture  # the plain pass runs under capture's own autocast
from .engine import resolve_device
from .models import load_model
from .store import TraceStore

CAPTURE_TARGET = 1.10  # capture time / plain forward time
HIT_TARGET_MS = 50.0  # one cache hit
DEFAULT_MODELS = ("vit_small_patch14_dinov2", "vit_base_patch14_dinov2")
DEFAULT_SIZES = (224, 518)


@dataclass(frozen=True)
class BenchRow:
    """Timings of one model at one input size; times are milliseconds per image.

    Attributes:
        model: timm name.
        size: Input side in pixels (square input).
        batch: Images per forward pass.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        tokens: Sequence length (prefix and patch tokens).
        plain_ms: timm ``forward_features`` (median).
        capture_ms: ``vitlens.capture.capture`` (median).
        sweep_ms: ``capture(..., attention=False)``, what a sweep runs (median).
        best_ratio: Fastest capture / fastest plain pass: less disturbed by other work on the machine.
        hit_ms: ``TraceStore.get`` of a stored trace.
        trace_kb: Size of one pickled trace.
    """

    model: str
    size: int
    batch: int
    tokens: int
    plain_ms: float
    capture_ms: float
    best_ratio: float
    hit_ms: float
    trace_kb: float
    precision: str = "fp32"
    sweep_ms: float | None = None

    @property
    def ratio(self) -> float:
        return self.capture_ms / self.plain_ms

    @property
    def sweep_ratio(self) -> float | None:
        return self.sweep_ms / self.plain_ms if self.sweep_ms is not None else None

    @property
    def images_per_s(self) -> float:
        """Capture throughput."""
        return 1000.0 / self.capture_ms

    def misses(self) -> list[str]:
        """The targets this row misses, in words."""
        misses = []
        if self.ratio > CAPTURE_TARGET:
            misses.append(f"capture > {CAPTURE_TARGET:.2f}x plain")
        if self.sweep_ratio is not None and self.sweep_ratio > CAPTURE_TARGET:
            misses.append(f"sweep capture > {CAPTURE_TARGET:.2f}x plain")
        if self.hit_ms >= HIT_TARGET_MS:
            misses.append(f"cache hit >= {HIT_TARGET_MS:.0f} ms")
        return misses


def bench_model(name: str, size: int, device: torch.device, precision: str = "fp32", batch: int = 1,
                repeats: int = 5, warmup: int = 1) -> BenchRow:
    """Time plain forward, capture, a sweep's norms-only capture and a cache hit for one model at one size."""
    model_args = {"img_size": size, "device": device} if device.type == "cuda" else {"img_size": size}
    loaded = load_model(name, "random", device=device, model_args=model_args)  # built on the GPU: fast init
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)

    def plain() -> None:
        with torch.inference_mode(), _autocast(device, precision):
            loaded.model.forward_features(pixels)

    def captured() -> list[Trace]:
        return capture(loaded, pixels, precision=precision)

    def norms_only() -> list[Trace]:
        return capture(loaded, pixels, precision=precision, attention=False)

    for _ in range(warmup):
        plain()
        captured()
        norms_only()
    plain_times, capture_times, sweep_times = [], [], []
    for _ in range(repeats):
        plain_times.append(_timed(plain, device))
        capture_times.append(_timed(captured, device))
        sweep_times.append(_timed(norms_only, device))
    traces = captured()
    hit_s, trace_bytes = _cache_hit(traces, repeats)
    del loaded
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return BenchRow(model=name, size=size, batch=batch, tokens=traces[0].layout.num_tokens,
                    plain_ms=1000 * statistics.median(plain_times) / batch,
                    capture_ms=1000 * statistics.median(capture_times) / batch,
                    best_ratio=min(capture_times) / min(plain_times),
                    hit_ms=1000 * hit_s, trace_kb=trace_bytes / 1024, precision=precision,
                    sweep_ms=1000 * statistics.median(sweep_times) / batch)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes, with the device's queue drained before and after."""
    _synchronize(device)
    start = time.perf_counter()
    run()
    _synchronize(device)
    return time.perf_counter() - start


def _cache_hit(traces: Sequence[Trace], repeats: int) -> tuple[float, float]:
    """Median seconds of one ``TraceStore.get``, and pickled bytes per trace."""
    size = statistics.mean(len(pickle.dumps(trace, protocol=pickle.HIGHEST_PROTOCOL)) for trace in traces)
    with tempfile.TemporaryDirectory(prefix="vitlens-bench-") as directory:
        store = TraceStore(directory)
        keys = [f"bench/{index}" for index in range(len(traces))]
        for key, trace in zip(keys, traces):
            store.put(key, trace)
        times = []
        for _ in range(max(repeats, 3)):
            start = time.perf_counter()
            for key in keys:
                if store.get(key) is None:
                    raise RuntimeError("a trace just stored was not found")
            times.append((time.perf_counter() - start) / len(keys))
        store.close()
    return statistics.median(times), size


def format_table(rows: Sequence[BenchRow]) -> str:
    """The results as a plain-text table, with the missed targets in the last column."""
    head = (f"{'model':<30} {'size':>5} {'batch':>5} {'prec':>4} {'tokens':>6} {'plain ms/img':>12} {'capture ms/img':>14} "
            f"{'capture/plain':>13} {'best':>6} {'hit ms':>7} {'trace kB':>8} {'img/s':>7} {'sweep ms/img':>12} "
            f"{'sweep/plain':>11}  misses")
    lines = [head, "-" * len(head)]
    for row in rows:
        sweep = (f"{row.sweep_ms:>12.1f} {row.sweep_ratio:>10.3f}x" if row.sweep_ms is not None else f"{'-':>12} {'-':>11}")
        lines.append(f"{row.model:<30} {row.size:>5} {row.batch:>5} {row.precision:>4} {row.tokens:>6} {row.plain_ms:>12.1f} "
                     f"{row.capture_ms:>14.1f} {row.ratio:>12.3f}x {row.best_ratio:>5.2f}x {row.hit_ms:>7.2f} {row.trace_kb:>8.0f} "
                     f"{row.images_per_s:>7.1f} {sweep}  {'; '.join(row.misses()) or '-'}")
    return "\n".join(lines)


def describe(device: torch.device, precisions: Sequence[str], batches: Sequence[int], repeats: int, warmup: int,
             sweep: bool = False) -> str:
    """One line naming what the numbers were measured on."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    timing = (f"best of {repeats} after 1 warm-up; goal: sweep >= {SWEEP_TARGET:.2f}x plain images/s" if sweep else
              f"median of {repeats} after {warmup} warm-up; targets: capture <= {CAPTURE_TARGET:.2f}x plain, "
              f"cache hit < {HIT_TARGET_MS:.0f} ms")
    return (f"device {device} ({where}), torch {torch.__version__}, {'/'.join(precisions)}, "
            f"batch {'/'.join(map(str, batches))}, {timing}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vitlens.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--precision", nargs="+", choices=sorted(PRECISIONS), default=["fp32"])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="timm ViT names (random weights)")
    parser.add_argument("--sizes", nargs="+", type=int, default=list(DEFAULT_SIZES), help="input sides in pixels")
    parser.add_argument("--batch", nargs="+", type=int, default=[1], help="images per forward pass")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--sweep", action="store_true", help="time a whole sweep (decode, capture, rows, Parquet) "
                        "against plain forward_features on the same batches")
    parser.add_argument("--images", type=int, default=64, help="with --sweep: images in the sweep")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    print(describe(device, args.precision, args.batch, args.repeats, args.warmup, args.sweep), flush=True)
    if args.sweep:
        return sweep_main(args, device)
    rows = []
    for name in args.models:
        for size in args.sizes:
            for batch in args.batch:
                for precision in args.precision:
                    rows.append(bench_model(name, size, device, precision, batch, args.repeats, args.warmup))
                    print(f"  {name} @ {size} x{batch} {precision}: capture {rows[-1].ratio:.3f}x plain, "
                          f"sweep capture {rows[-1].sweep_ratio:.3f}x plain", file=sys.stderr, flush=True)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

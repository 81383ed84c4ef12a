"""Sweeps: every image through every (model, weights) pair, one Parquet row per block.

``run_sweep`` is the library entry point behind ``python -m vitlens sweep`` (contract in
DESIGN.md). Work is split into tasks of at most ``batch`` images of one (model, weights) pair;
each finished task is written as one Parquet file (temporary name, then an atomic rename), so a
killed sweep loses at most the tasks in flight, and a rerun skips every (model, weights, image)
already in the folder. Traces already in the trace cache are reused; the rest are captured
without prefix attention (a sweep needs norms only).
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import math
import os
import re
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from .analysis.outliers import auto_thresholds, parse_threshold
from .capture import PRECISIONS, Trace, capture
from .checkpoints import WEIGHT_SUFFIXES
from .engine import resolve_device
from .errors import ImageError, OptionError, WeightsError
from .images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, input_shape, read_image_file, resize_for_model, to_tensor
from .models import LoadedModel, load_model, resolve_spec
from .store import CaptureOptions, TraceStore, trace_key

NORM_HIST_EDGES = np.logspace(-2, 4, 121)  # fixed log-spaced bins of patch-token norms (120 bins)
NAMED_WEIGHTS = ("hub", "random", "synthetic")
ENGINES = ("local", "ray")
DECODE_THREADS = min(8, os.cpu_count() or 1)
_GLOB_CHARS = re.compile(r"[*?\[]")
_TMP_PREFIX = ".part-"  # dataset readers skip names starting with '.'
_LOCK_NAME = ".sweep.lock"

SCHEMA = pa.schema([
    ("model", pa.string()), ("weights", pa.string()), ("step", pa.int64()), ("image", pa.string()),
    ("layer", pa.int64()), ("num_outliers", pa.int64()), ("outlier_fraction", pa.float64()),
    ("threshold", pa.float64()), ("norm_median", pa.float64()), ("norm_max", pa.float64()),
    ("num_layers", pa.int64()), ("grid_rows", pa.int64()), ("grid_cols", pa.int64()), ("size", pa.int64()),
    ("antialias", pa.bool_()), ("num_registers", pa.int64()), ("fingerprint", pa.string()),
    ("outlier_cells", pa.list_(pa.int32())), ("norm_hist", pa.list_(pa.int32())),
    ("cls_norm", pa.float64()), ("register_norm", pa.float64()),
    ("neighbor_similarity", pa.list_(pa.float32())),  # per image, on layer 0's row only (null on the others)
])

Progress = Callable[[int, int], None]  # (image x weights pairs done, in total)


@dataclass(frozen=True)
class Checkpoint:
    """One weights choice of a series: ``weights`` as named (a path or hub/random/synthetic)."""

    weights: str
    step: int | None


@dataclass(frozen=True)
class ImageItem:
    """An image file and its name in the results (relative to the IMAGES folder, '/'-separated)."""

    name: str
    path: str


@dataclass(frozen=True)
class Task:
    """At most ``batch`` images of one (model, weights) pair: the unit of work and of one Parquet file."""

    model: str
    checkpoint: Checkpoint
    images: tuple[ImageItem, ...]


@dataclass(frozen=True)
class SweepConfig:
    """How each image is fed and judged; the same for every task of a sweep.

    Attributes:
        size: Longer input side in pixels; None: each model's own.
        threshold: Fixed outlier norm, or None for ``auto``.
        antialias: Antialiased position-embedding resampling.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        model_args: Extra timm constructor arguments (tests use them for tiny models).
        max_pixels: Largest image accepted for decoding.
        max_image_bytes: Largest image file accepted (checked before reading it).
    """

    size: int | None = None
    threshold: float | None = None
    antialias: bool = True
    precision: str = "fp32"
    model_args: Mapping[str, object] = field(default_factory=dict)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    def options(self) -> CaptureOptions:
        return CaptureOptions(side=self.size, antialias=self.antialias, precision=self.precision)


@dataclass
class Prepared:
    """A task's images ready for the forward pass.

    Attributes:
        items: The images that decoded, in task order.
        cached: Traces found in the trace cache, by index into ``items``.
        batches: (indices into ``items``, pixels ``[batch, 3, height, width]``), one per input shape.
        failed: (image, reason) of the files that are not usable images.
    """

    items: list[ImageItem] = field(default_factory=list)
    cached: dict[int, Trace] = field(default_factory=dict)
    batches: list[tuple[list[int], torch.Tensor]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class TaskResult:
    """Rows of one task, the images that could not be read, and how many images were run."""

    table: pa.Table
    failed: tuple[tuple[str, str], ...]  # (image, reason)
    computed: int


@dataclass(frozen=True)
class SweepSummary:
    """What ``--json`` prints (see DESIGN.md).

    Attributes:
        rows: Rows in the results folder after the run.
        computed: (model, weights, image) triples run now.
        skipped: Triples already in the folder.
        images_per_s: ``computed`` per second of this run.
        failed: {image, reason} of each file that is not a readable image.
        checkpoints: Per (model, weights): model, weights, step, first_layer_with_outliers,
            max_outlier_fraction (over the folder's rows of that pair).
        stopped: ``should_stop`` ended the run early.
    """

    rows: int
    computed: int
    skipped: int
    images_per_s: float
    failed: list[dict]
    checkpoints: list[dict]
    stopped: bool = False

    def to_json(self) -> dict:
        return {"rows": self.rows, "computed": self.computed, "skipped": self.skipped,
                "images_per_s": self.images_per_s, "failed": self.failed, "checkpoints": self.checkpoints}

    def describe(self) -> str:
        """A few lines for people: totals, failed images, and per checkpoint the first layer with outliers."""
        lines = [f"{self.rows} rows; {self.computed} image x weights pairs computed ({self.images_per_s:.1f} images/s), "
                 f"{self.skipped} already there, {len(self.failed)} failed"]
        lines += [f"  failed: {entry['image']}: {entry['reason']}" for entry in self.failed]
        for entry in self.checkpoints:
            step = "" if entry["step"] is None else f" (step {entry['step']})"
            first = entry["first_layer_with_outliers"]
            share = entry["max_outlier_fraction"]
            lines.append(f"  {entry['model']} {entry['weights']}{step}: "
                         + ("no outliers" if first is None else f"outliers from layer {first}")
                         + ("" if share is None else f", max outlier share {share:.3f}"))
        return "\n".join(lines)


def run_sweep(
        images: str | os.PathLike,
        models: Sequence[str],
        weights: Sequence[str],
        out: str | os.PathLike,
        size: int | None = None,
        threshold: str | float | None = "auto",
        batch: int = 8,
        engine: str = "local",
        ray_address: str | None = None,
        antialias: bool = True,
        precision: str = "fp32",
        device: str = "auto",
        store: TraceStore | None = None,
        model_args: Mapping[str, object] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        progress: Progress | None = None,
        should_stop: Callable[[], bool] | None = None,
) -> SweepSummary:
    """Run every image through every (model, weights) pair and append the rows to ``out``.

    Args:
        images: A folder (searched recursively) or a glob pattern.
        models: Presets or timm ViT names.
        weights: ``hub``, ``random``, ``synthetic``, files, folders or glob patterns; the files
            of a checkpoint series are ordered by step (the last integer in the path).
        out: Results folder (a Parquet dataset); created if missing, continued if not.
        size, threshold, antialias, precision: As for ``inspect``.
        batch: Images per forward pass and per Parquet file.
        engine: ``local`` (this process) or ``ray``.
        ray_address: Ray cluster to join (``auto`` or HOST:PORT); None starts a local Ray.
        device: For the local engine: ``auto``, ``cpu`` or ``cuda[:N]``.
        store: Trace cache to reuse traces from (never written: sweep traces hold no attention).
        model_args: Extra timm constructor arguments (tests use them for tiny models).
        max_pixels, max_image_bytes: Largest image (pixels, file bytes) accepted.
        progress: Called with (pairs done, pairs to run) after each task.
        should_stop: Polled between tasks; True stops the sweep after the tasks in flight.

    Raises:
        OptionError, UnknownModelError, WeightsError: bad input, before any work.
        ImageError: no file found, or (after the run) not one of them a readable image.
    """
    if batch < 1:
        raise OptionError(f"Batch must be at least 1, not {batch}.")
    if engine not in ENGINES:
        raise OptionError(f"Engine must be one of {', '.join(ENGINES)}, not '{engine}'.")
    if precision not in PRECISIONS:
        raise OptionError(f"Precision must be one of {', '.join(PRECISIONS)}, not '{precision}'.")
    if Path(out).exists() and not Path(out).is_dir():
        raise OptionError(f"Results folder '{out}' is a file.")
    for name in models:
        resolve_spec(name)
    config = SweepConfig(size=size, threshold=parse_threshold(threshold), antialias=antialias, precision=precision,
                         model_args=dict(model_args or {}), max_pixels=max_pixels,
                         max_image_bytes=max_image_bytes)
    out = Path(out)
    items = find_images(images, exclude=out)
    checkpoints = find_checkpoints(weights)
    out.mkdir(parents=True, exist_ok=True)
    with writing(out):
        tasks, skipped = plan_tasks(models, checkpoints, items, done_keys(out), batch)
        started = time.perf_counter()
        if engine == "ray":
            from .sweep_ray import run_ray

            results = run_ray(tasks, config, ray_address, store.directory if store is not None else None)
        else:
            results = run_local(tasks, SweepRunner(config, resolve_device(device), store))
        total = sum(len(task.images) for task in tasks)
        computed, failed, stopped = write_results(results, out, total, progress, should_stop)
        elapsed = time.perf_counter() - started
    if not computed and not skipped and not stopped and len(failed) == len(items):
        raise ImageError(f"No readable image among the {len(items)} files at '{images}'; e.g. {next(iter(failed.values()))}")
    return SweepSummary(rows=count_rows(out), computed=computed, skipped=skipped,
                        images_per_s=computed / elapsed if computed and elapsed > 0 else 0.0,
                        failed=[{"image": image, "reason": reason} for image, reason in failed.items()],
                        checkpoints=checkpoint_summaries(out, models, checkpoints), stopped=stopped)


@contextlib.contextmanager
def sweep_progress_bar() -> Iterator[Progress]:
    """A ``progress`` callback drawing a tqdm bar with images/s on stderr (from its first call: no bar for bad input)."""
    from tqdm import tqdm

    bars: list[tqdm] = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="img", desc="sweep", file=sys.stderr, dynamic_ncols=True))
        bars[0].total = total
        bars[0].update(done - bars[0].n)

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()


@contextlib.contextmanager
def writing(out: Path) -> Iterator[None]:
    """Hold the results folder's lock (``out/.sweep.lock``): a second sweep into the same folder waits
    until this one ends, then plans from the rows written meanwhile, so no row is computed twice."""
    with open(out / _LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_results(results: Iterator[TaskResult], out: Path, total: int, progress: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None) -> tuple[int, dict[str, str], bool]:
    """Write each task's rows as it finishes; returns (computed, failed images, stopped early)."""
    computed, done, failed = 0, 0, {}
    if progress:
        progress(0, total)
    try:
        for result in results:
            write_part(out, result.table)
            computed += result.computed
            done += result.computed + len(result.failed)
            failed.update(dict(result.failed))
            if progress:
                progress(done, total)
            if should_stop is not None and should_stop():
                return computed, failed, True
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()
    return computed, failed, False


# ---------------------------------------------------------------- inputs


def find_images(pattern: str | os.PathLike, exclude: Path | None = None) -> list[ImageItem]:
    """The files of a folder (recursive, hidden ones left out) or of a glob, named relative to the folder.

    Every file is a candidate: one that is not a readable image is reported as failed, not
    silently left out. Files under ``exclude`` (the results folder) are left out.

    Raises:
        ImageError: nothing matches.
    """
    text = str(pattern)
    root = Path(text)
    if root.is_dir():
        paths = [path for path in root.rglob("*") if path.is_file() and not _hidden(path.relative_to(root))]
    else:
        root = _glob_root(text)
        paths = [Path(match) for match in glob.glob(text, recursive=True) if Path(match).is_file()]
    if exclude is not None:
        excluded = exclude.resolve()
        paths = [path for path in paths if not path.resolve().is_relative_to(excluded)]
    if not paths:
        raise ImageError(f"No image files found at '{text}'.")
    return sorted({ImageItem(path.relative_to(root).as_posix(), str(path)) for path in paths}, key=lambda item: item.name)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _glob_root(pattern: str) -> Path:
    """The folder a glob's wildcards start below (what ``image`` names are relative to)."""
    parts = Path(pattern).parts
    fixed = list(_until_magic(parts))
    if len(fixed) == len(parts):  # no wildcard: a single file
        return Path(*parts[:-1]) if len(parts) > 1 else Path(".")
    return Path(*fixed) if fixed else Path(".")


def _until_magic(parts: Sequence[str]) -> Iterator[str]:
    for part in parts:
        if _GLOB_CHARS.search(part):
            return
        yield part


def checkpoint_step(weights: str) -> int | None:
    """The last integer in a weights path (``training_39999/teacher_checkpoint.pth`` -> 39999); None for none."""
    if weights in NAMED_WEIGHTS:
        return None
    numbers = re.findall(r"\d+", weights)
    return int(numbers[-1]) if numbers else None


def find_checkpoints(weights: Sequence[str]) -> list[Checkpoint]:
    """Expand names, files, folders and globs into checkpoints ordered by step (then path).

    Raises:
        WeightsError: a file that does not exist, or a folder or glob without weights files.
    """
    found: dict[str, Checkpoint] = {}
    for entry in weights:
        for name in _expand_weights(str(entry)):
            found.setdefault(name, Checkpoint(name, checkpoint_step(name)))
    named = [c for c in found.values() if c.weights in NAMED_WEIGHTS]
    files = sorted((c for c in found.values() if c.weights not in NAMED_WEIGHTS),
                   key=lambda c: (c.step is None, c.step or 0, c.weights))
    return named + files


def _expand_weights(entry: str) -> list[str]:
    if entry in NAMED_WEIGHTS:
        return [entry]
    path = Path(entry)
    if path.is_dir():
        matches = [str(p) for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES]
    elif _GLOB_CHARS.search(entry):
        matches = sorted(m for m in glob.glob(entry, recursive=True) if Path(m).is_file())
    elif path.is_file():
        return [entry]
    else:
        raise WeightsError(f"Weights '{entry}' is neither hub, random, synthetic nor an existing file, folder or glob.")
    if not matches:
        raise WeightsError(f"No weights files match '{entry}'.")
    return matches


def plan_tasks(models: Sequence[str], checkpoints: Sequence[Checkpoint], images: Sequence[ImageItem],
               done: set[tuple[str, str, str]], batch: int) -> tuple[list[Task], int]:
    """Tasks for every (model, weights, image) not yet in ``done``; returns them and how many were skipped."""
    tasks, skipped = [], 0
    for model in models:
        for checkpoint in checkpoints:
            todo = [item for item in images if (model, checkpoint.weights, item.name) not in done]
            skipped += len(images) - len(todo)
            tasks += [Task(model, checkpoint, tuple(todo[i:i + batch])) for i in range(0, len(todo), batch)]
    return tasks, skipped


# ---------------------------------------------------------------- the results folder


def _dataset(out: Path) -> ds.Dataset | None:
    if not any(out.glob("*.parquet")):
        return None
    return ds.dataset(str(out), format="parquet", schema=SCHEMA)


def done_keys(out: Path) -> set[tuple[str, str, str]]:
    """(model, weights, image) triples that already have rows in ``out``."""
    dataset = _dataset(out) if out.is_dir() else None
    if dataset is None:
        return set()
    table = dataset.to_table(columns=["model", "weights", "image"])
    return set(zip(*(table.column(name).to_pylist() for name in ("model", "weights", "image"))))


def count_rows(out: Path) -> int:
    dataset = _dataset(out)
    return dataset.count_rows() if dataset is not None else 0


def write_part(out: Path, table: pa.Table) -> None:
    """Write one task's rows as a new Parquet file: a temporary name first, then an atomic rename."""
    if table.num_rows == 0:
        return
    name = f"part-{uuid.uuid4().hex}.parquet"
    temporary = out / f"{_TMP_PREFIX}{name}.tmp"
    try:
        pq.write_table(table, str(temporary))
        os.replace(temporary, out / name)
    finally:
        temporary.unlink(missing_ok=True)


def checkpoint_summaries(out: Path, models: Sequence[str], checkpoints: Sequence[Checkpoint]) -> list[dict]:
    """Per (model, weights): the first layer with any outlier and the largest outlier fraction of any row."""
    dataset = _dataset(out)
    columns = ["model", "weights", "layer", "num_outliers", "outlier_fraction"]
    frame = dataset.to_table(columns=columns).to_pandas() if dataset is not None else None
    summaries = []
    for model in models:
        for checkpoint in checkpoints:
            rows = frame[(frame.model == model) & (frame.weights == checkpoint.weights)] if frame is not None else None
            present = rows is not None and len(rows) > 0
            with_outliers = rows.layer[rows.num_outliers > 0] if present else []
            summaries.append({
                "model": model, "weights": checkpoint.weights, "step": checkpoint.step,
                "first_layer_with_outliers": int(with_outliers.min()) if len(with_outliers) else None,
                "max_outlier_fraction": float(rows.outlier_fraction.max()) if present else None,
            })
    return summaries


# ---------------------------------------------------------------- running tasks


class SweepRunner:
    """Runs tasks on one device: keeps the current model loaded, reads the trace cache, builds rows."""

    def __init__(self, config: SweepConfig, device: torch.device, store: TraceStore | None = None) -> None:
        self.config = config
        self.device = device
        self.store = store
        self._loaded: tuple[tuple[str, str], LoadedModel] | None = None

    def model(self, name: str, weights: str) -> LoadedModel:
        """The model of this (name, weights); the previous one is dropped (tasks come grouped by pair)."""
        if self._loaded is None or self._loaded[0] != (name, weights):
            self._loaded = None  # free the previous model before building the next
            self._loaded = ((name, weights), load_model(name, weights, device=self.device, model_args=self.config.model_args))
        return self._loaded[1]

    def prepare(self, task: Task) -> Prepared:
        """Everything before the forward pass: decode, preprocess, look up the trace cache, stack.

        Runs ahead in a thread while the previous task's forward pass runs.
        """
        loaded = self.model(task.model, task.checkpoint.weights)
        side = self.config.size or max(loaded.native_size)
        input_shape((side, side), side, loaded.patch_size)  # a bad --size is bad input, not a failed image
        with ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="vitlens-decode") as pool:  # PIL frees the GIL
            outcomes = list(pool.map(lambda item: self._decode(item, side, loaded), task.images))
        prepared = Prepared()
        pending: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}  # input shape -> (index, pixels)
        for item, outcome in zip(task.images, outcomes):
            if isinstance(outcome, str):
                prepared.failed.append((item.name, outcome))
                continue
            digest, tensor = outcome
            index = len(prepared.items)
            prepared.items.append(item)
            cached = self._cached(loaded, digest)
            if cached is not None:
                prepared.cached[index] = cached
            else:
                pending.setdefault(tuple(tensor.shape), []).append((index, tensor))
        prepared.batches = [([index for index, _ in group], self._stack([tensor for _, tensor in group])) for group in pending.values()]
        return prepared

    def _decode(self, item: ImageItem, side: int, loaded: LoadedModel) -> tuple[str, torch.Tensor] | str:
        """(pixel digest, model input ``[3, height, width]``), or why the file is not a usable image."""
        try:
            decoded = read_image_file(item.path, max_pixels=self.config.max_pixels, max_bytes=self.config.max_image_bytes)
        except ImageError as error:
            return str(error)
        return decoded.digest, to_tensor(resize_for_model(decoded.image, side, loaded.patch_size), loaded.mean, loaded.std)

    def _cached(self, loaded: LoadedModel, digest: str) -> Trace | None:
        return self.store.get(trace_key(loaded.key, digest, self.config.options(), self.device.type)) if self.store is not None else None

    def _stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One batch ``[batch, 3, height, width]``, in pinned memory when it feeds a GPU (a faster upload)."""
        pixels = torch.stack(tensors)
        return pixels.pin_memory() if self.device.type == "cuda" else pixels

    def run(self, task: Task, prepared: Prepared | None = None) -> TaskResult:
        """Rows of one task (``prepared``: the output of ``prepare`` when it ran ahead)."""
        prepared = prepared if prepared is not None else self.prepare(task)
        loaded = self.model(task.model, task.checkpoint.weights)
        traces = dict(prepared.cached)
        for indices, pixels in prepared.batches:
            captured = capture(loaded, pixels.to(self.device, non_blocking=True), antialias=self.config.antialias,
                               precision=self.config.precision, attention=False)
            traces.update(zip(indices, captured))
        table = task_table(task, prepared.items, [traces[index] for index in range(len(prepared.items))],
                           loaded.fingerprint, self.config)
        return TaskResult(table=table, failed=tuple(prepared.failed), computed=len(prepared.items))


def run_local(tasks: Sequence[Task], runner: SweepRunner) -> Iterator[TaskResult]:
    """Tasks in order in this process; the next task's images are decoded while the current one runs
    (when it uses the same model, so that decoding never loads a model)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vitlens-sweep-decode") as pool:
        ahead = None
        for index, task in enumerate(tasks):
            prepared = ahead.result() if ahead is not None else runner.prepare(task)
            following = tasks[index + 1] if index + 1 < len(tasks) else None
            same_pair = following is not None and (following.model, following.checkpoint) == (task.model, task.checkpoint)
            ahead = pool.submit(runner.prepare, following) if same_pair else None
            yield runner.run(task, prepared)


def task_table(task: Task, items: Sequence[ImageItem], traces: Sequence[Trace], fingerprint: str,
               config: SweepConfig) -> pa.Table:
    """The rows of a task's images: one per (image, block), images in order, norms before the final norm.

    Built column by column over all images of one shape at once (outlier thresholds of every
    layer with ``auto_thresholds``), not row by row: on a GPU this host work bounds a sweep.
    """
    groups: dict[tuple, list[int]] = {}  # images whose traces share layout, input size and depth
    for index, trace in enumerate(traces):
        groups.setdefault((trace.layout, trace.input_size, trace.norms.shape), []).append(index)
    tables, order = [], []
    for indices in groups.values():
        tables.append(_group_table(task, [items[i] for i in indices], [traces[i] for i in indices], fingerprint, config))
        order += [(image, layer) for image in indices for layer in range(traces[image].num_layers)]
    if not tables:
        return SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    return table if len(tables) == 1 else table.take(sorted(range(len(order)), key=order.__getitem__))


def _group_table(task: Task, items: Sequence[ImageItem], traces: Sequence[Trace], fingerprint: str,
                 config: SweepConfig) -> pa.Table:
    """Rows of images whose traces share layout, input size and depth."""
    layout, num_layers = traces[0].layout, traces[0].num_layers
    norms = np.stack([trace.norms for trace in traces])  # [image, layer, token]
    patches = layout.patch_grid(norms).reshape(len(traces) * num_layers, -1)  # [image x layer, patch]
    thresholds, masks = _outliers(patches, config.threshold)
    counts = masks.sum(axis=1)
    cells = np.nonzero(masks)[1]  # row-major: by (image, layer), then patch
    rows = len(traces) * num_layers
    neighbor = [None] * rows
    neighbor[::num_layers] = [trace.neighbor_similarity.ravel().astype(np.float32) for trace in traces]  # layer 0 rows
    columns = {
        "model": pa.array([task.model] * rows, pa.string()),
        "weights": pa.array([task.checkpoint.weights] * rows, pa.string()),
        "step": pa.array([task.checkpoint.step] * rows, pa.int64()),
        "image": pa.array([item.name for item in items for _ in range(num_layers)], pa.string()),
        "layer": np.tile(np.arange(num_layers), len(traces)),
        "num_outliers": counts.astype(np.int64),
        "outlier_fraction": counts / patches.shape[1],
        "threshold": thresholds.astype(np.float64),
        "norm_median": _finite_reduce(np.nanmedian, np.median, patches),
        "norm_max": _finite_reduce(np.nanmax, np.max, patches),
        "num_layers": np.full(rows, num_layers),
        "grid_rows": np.full(rows, layout.grid[0]),
        "grid_cols": np.full(rows, layout.grid[1]),
        "size": np.full(rows, max(traces[0].input_size)),
        "antialias": np.full(rows, config.antialias),
        "num_registers": np.full(rows, layout.num_registers),
        "fingerprint": pa.array([fingerprint] * rows, pa.string()),
        "outlier_cells": _list_array(np.cumsum(counts), cells),
        "norm_hist": _list_array(np.arange(1, rows + 1) * (len(NORM_HIST_EDGES) - 1), norm_histograms(patches).ravel()),
        "cls_norm": (norms[:, :, layout.cls_index].astype(np.float64).ravel() if layout.cls_index is not None
                     else np.full(rows, math.nan)),
        "register_norm": (norms[:, :, layout.registers].mean(axis=2).astype(np.float64).ravel() if layout.num_registers
                          else np.full(rows, math.nan)),
        "neighbor_similarity": pa.array(neighbor, pa.list_(pa.float32())),  # of the patch embeddings: one per image
    }
    return pa.table({name: columns[name] for name in SCHEMA.names}, schema=SCHEMA)


def _outliers(patches: np.ndarray, threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the threshold (float32 as ``LayerOutliers`` keeps it, NaN for none) and the outlier mask.

    Args:
        patches: Patch-token norms of each (image, layer).  # [row, patch]
        threshold: A fixed norm, or None for ``auto``.

    Returns:
        Thresholds  # [row]
        and masks, never True at a NaN norm.  # [row, patch]
    """
    cuts = np.full(patches.shape[0], threshold, np.float64) if threshold is not None else auto_thresholds(patches)
    cuts = cuts.astype(np.float32)  # as ``find_outliers`` compares a float32 grid with a Python float
    return cuts, patches > cuts[:, None]  # NaN > cut and norm > NaN are False


def _finite_reduce(nan_reduce, reduce, values: np.ndarray) -> np.ndarray:
    """Per row, ``reduce`` over the finite values (as ``layer_outliers``); NaN for a row with none.  # [row]"""
    if np.isfinite(values).all():
        return reduce(values, axis=1).astype(np.float64)
    finite = np.where(np.isfinite(values), values, np.nan)
    has = np.isfinite(finite).any(axis=1)
    out = np.full(values.shape[0], np.nan, dtype=np.float32)
    if has.any():
        out[has] = nan_reduce(finite[has], axis=1)
    return out.astype(np.float64)


def norm_histograms(norms: np.ndarray) -> np.ndarray:
    """Counts of norms in the ``NORM_HIST_EDGES`` bins per row, values outside (and NaN) clipped into the end bins.

    Each row is sorted once and the 121 edges are looked up in it (far fewer searches than one
    per norm); a value ``x`` falls in bin ``i`` when ``EDGES[i] <= x < EDGES[i + 1]``.

    Args:
        norms: Patch-token norms.  # [row, patch]

    Returns:
        Counts.  # [row, bin]
    """
    ordered = np.sort(norms, axis=1).astype(np.float64)  # NaN last, as searchsorted takes it
    below = np.stack([np.searchsorted(row, NORM_HIST_EDGES, side="left") for row in ordered])  # [row, edge]: values < edge
    counts = np.diff(below, axis=1)  # [row, bin]
    counts[:, 0] += below[:, 0]
    counts[:, -1] += norms.shape[1] - below[:, -1]
    return counts.astype(np.int32)


def _list_array(ends: np.ndarray, flat: np.ndarray) -> pa.ListArray:
    """A list<int32> column from the flat values and each list's end offset."""
    offsets = np.concatenate([[0], ends]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.int32), pa.int32()))

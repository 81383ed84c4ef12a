"""The paper's measurements on a model and a folder of images: captures in, analysis results out.

Images are captured through an ``Engine`` (cached, batched) in chunks, so only one chunk of
decoded images and traces is in memory at a time. Unreadable files are skipped and listed.
"""
from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from .analysis.outliers import find_outliers
from .analysis.probes import GlobalScore, LocalSample, global_probe, local_probes, pick_tokens
from .analysis.redundancy import redundancy
from .capture import Trace
from .engine import Engine
from .errors import DataError, ImageError, OptionError
from .images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, DecodedImage, read_image_file, resize_for_model, to_tensor
from .store import CaptureOptions

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CHUNK = 64  # images decoded and captured at a time
Progress = Callable[[int, int], None]
REFERENCES = {  # Darcet et al. 2024, Table 1 (DINOv2 ViT-g): normal vs outlier patch tokens
    "position_accuracy": {"normal": 0.417, "outlier": 0.228},  # top-1 over positions
    "position_distance": {"normal": 0.79, "outlier": 5.09},  # patches
    "pixel_error": {"normal": 18.38, "outlier": 25.23},  # L2 reconstruction error (their scale, not ours)
    "global_accuracy_imagenet": {"cls": 0.860, "normal": 0.658, "outlier": 0.690},  # logistic regression, ImageNet-1k
}


@dataclass(frozen=True)
class EvidenceOptions:
    """What to capture and where outliers come from.

    Attributes:
        layer: Block whose outliers (and, for probes, tokens) are used; negative counts from the end.
        threshold: Outlier norm threshold; None: ``auto``.
        capture: Input size, antialiasing, precision.
        max_pixels: Largest image accepted (width x height).
        max_bytes: Largest image file accepted.
    """

    layer: int = -1
    threshold: float | None = None
    capture: CaptureOptions = CaptureOptions()
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES


@dataclass(frozen=True)
class Failed:
    image: str
    reason: str


def find_images(root: Path) -> list[Path]:
    """The files of a folder (recursive) or glob, as the sweep finds them (``vitlens.sweep.find_images``).

    Raises:
        ImageError: nothing found.
    """
    from .sweep import find_images as sweep_images  # pyarrow: imported only when needed
    return [Path(item.path) for item in sweep_images(root)]


def image_classes(root: Path) -> list[tuple[Path, str]]:
    """(image, class) of an ImageFolder-style dataset: one subfolder per class.

    Raises:
        DataError: fewer than two subfolders with images.
    """
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    pairs = [(path, folder.name) for folder in folders for path in _images_in(folder)]
    classes = {name for _, name in pairs}
    if len(classes) < 2:
        raise DataError(f"'{root}' needs one subfolder of images per class and at least 2 classes; it has {len(classes)}.")
    return pairs


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def square_crop(image: DecodedImage) -> DecodedImage:
    """The largest centred square (probes need the same grid for every image)."""
    width, height = image.image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    cropped = image.image.crop((left, top, left + side, top + side))
    return DecodedImage(name=image.name, image=cropped, digest=f"{image.digest}-square")


def traces(engine: Engine, paths: Sequence[Path], model: str, weights: str, options: EvidenceOptions,
           square: bool = False, failed: list[Failed] | None = None,
           progress: Progress | None = None) -> Iterator[tuple[Path, DecodedImage, Trace]]:
    """Captured traces of ``paths`` in chunks; unreadable images go to ``failed``."""
    for start in range(0, len(paths), CHUNK):
        decoded = []
        for path in paths[start:start + CHUNK]:
            try:
                image = read_image_file(path, max_pixels=options.max_pixels, max_bytes=options.max_bytes)
            except ImageError as error:
                if failed is not None:
                    failed.append(Failed(str(path), str(error)))
                continue
            decoded.append((path, square_crop(image) if square else image))
        results = engine.traces([image for _, image in decoded], model, weights, options.capture) if decoded else []
        for (path, image), result in zip(decoded, results):
            yield path, image, result.trace
        if progress:
            progress(min(start + CHUNK, len(paths)), len(paths))


def outlier_mask(trace: Trace, layer: int, threshold: float | None) -> np.ndarray:
    """Outlier cells of one layer (norms before the final norm).  # [row, col]"""
    return find_outliers(trace.patch_norms()[_layer(layer, trace.num_layers)], threshold).mask


def _layer(layer: int, num_layers: int) -> int:
    if not -num_layers <= layer < num_layers:
        raise OptionError(f"Layer {layer} is out of range for a model with {num_layers} blocks.")
    return layer % num_layers


@dataclass(frozen=True)
class Run:
    """An analysis result with the images it used and those it skipped."""

    result: object
    images: list[str]
    failed: list[Failed]
    layer: int


def redundancy_run(engine: Engine, paths: Sequence[Path], model: str, weights: str, options: EvidenceOptions,
                   progress: Progress | None = None) -> Run:
    """Neighbour similarity at outlier vs normal cells of ``options.layer`` over ``paths``.

    Raises:
        DataError: no readable image.
    """
    failed: list[Failed] = []
    similarities, masks, names, layer = [], [], [], options.layer
    for path, _, trace in traces(engine, paths, model, weights, options, failed=failed, progress=progress):
        layer = _layer(options.layer, trace.num_layers)
        similarities.append(trace.neighbor_similarity)
        masks.append(outlier_mask(trace, layer, options.threshold))
        names.append(str(path))
    if not names:
        raise DataError("None of the images could be read.")
    return Run(redundancy(similarities, masks), names, failed, layer)


def patch_pixels(image: Image.Image, side: int, patch: int, mean, std) -> np.ndarray:
    """The normalised pixels of each patch as the model sees them, row-major.  # [patch, 3 * patch * patch]"""
    pixels = to_tensor(resize_for_model(image, side, patch), mean, std)  # [3, height, width]
    patches = pixels.unfold(1, patch, patch).unfold(2, patch, patch)  # [3, row, col, patch, patch]
    return patches.permute(1, 2, 0, 3, 4).reshape(-1, 3 * patch * patch).numpy()


def local_probe_run(engine: Engine, paths: Sequence[Path], model: str, weights: str, options: EvidenceOptions,
                    progress: Progress | None = None) -> Run:
    """Position and pixel probes on patch tokens of ``options.layer`` (square centre crops).

    A first pass captures every image into the engine's store; the probes then read one image at
    a time back from it, so memory does not grow with the number of images.

    Raises:
        DataError: fewer than two readable images.
    """
    options = replace(options, capture=replace(options.capture, state_layers=(options.layer,)))
    failed: list[Failed] = []
    readable, layer, grid = [], options.layer, None
    for path, _, trace in traces(engine, paths, model, weights, options, square=True, failed=failed, progress=progress):
        layer, grid = _layer(options.layer, trace.num_layers), trace.layout.grid
        readable.append(path)
    if len(readable) < 2:
        raise DataError(f"Local probes need at least 2 readable images (one to train, one to test); got {len(readable)}.")
    samples = _StoredSamples(engine, readable, model, weights, replace(options, layer=layer))
    return Run(local_probes(samples, grid), [str(p) for p in readable], failed, layer)


class _StoredSamples(SequenceABC):
    """``LocalSample``s read one at a time: the image decoded again, its trace from the engine's store."""

    def __init__(self, engine: Engine, paths: Sequence[Path], model: str, weights: str, options: EvidenceOptions) -> None:
        self.engine, self.paths, self.model, self.weights, self.options = engine, paths, model, weights, options
        self.loaded = engine.model(model, weights)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> LocalSample:
        image = square_crop(read_image_file(self.paths[index], max_pixels=self.options.max_pixels,
                                            max_bytes=self.options.max_bytes))
        trace = self.engine.traces([image], self.model, self.weights, self.options.capture)[0].trace
        loaded, layer = self.loaded, self.options.layer
        side = self.options.capture.side or max(loaded.native_size)
        pixels = patch_pixels(image.image, side, loaded.patch_size, loaded.mean, loaded.std)
        return LocalSample(trace.states[layer][trace.layout.patches], pixels,
                           outlier_mask(trace, layer, self.options.threshold).ravel())


@dataclass(frozen=True)
class GlobalProbeResult:
    """Global probes from the CLS token, a random normal and a random outlier patch token."""

    scores: dict[str, GlobalScore]
    classes: list[str]

    def summary(self) -> dict:
        return {"classes": self.classes, **{kind: vars(score) for kind, score in self.scores.items()}}


def global_probe_run(engine: Engine, root: Path, model: str, weights: str, options: EvidenceOptions,
                     seed: int = 0, progress: Progress | None = None) -> Run:
    """Class prediction from one token per image of an ImageFolder-style dataset.

    Raises:
        DataError: fewer than two classes, or no readable image.
    """
    pairs = image_classes(root)
    label_of = {path: name for path, name in pairs}
    capture = replace(options.capture, state_layers=(options.layer,))
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"cls": [], "normal": [], "outlier": []}
    labels: dict[str, list] = {"cls": [], "normal": [], "outlier": []}
    failed: list[Failed] = []
    names, layer = [], options.layer
    for path, _, trace in traces(engine, [p for p, _ in pairs], model, weights, replace(options, capture=capture),
                                 failed=failed, progress=progress):
        layer = _layer(options.layer, trace.num_layers)
        tokens = pick_tokens(trace.states[layer].astype(np.float32), trace.layout, outlier_mask(trace, layer, options.threshold), rng)
        for kind, vector in zip(("cls", "normal", "outlier"), tokens):
            if vector is not None:
                rows[kind].append(vector)
                labels[kind].append(label_of[path])
        names.append(str(path))
    if not names:
        raise DataError("None of the images could be read.")
    scores = {kind: _global_score(kind, rows[kind], labels[kind], seed) for kind in rows}
    return Run(GlobalProbeResult(scores, sorted(set(label_of.values()))), names, failed, layer)


def _global_score(kind: str, rows: list[np.ndarray], labels: list[str], seed: int) -> GlobalScore:
    if not rows:
        reason = "the model has no CLS token" if kind == "cls" else f"no image has a{'n' if kind == 'outlier' else ''} {kind} patch token"
        return GlobalScore(None, 0, 0, 0, 0, reason)
    return global_probe(np.stack(rows), np.array(labels), seed=seed)

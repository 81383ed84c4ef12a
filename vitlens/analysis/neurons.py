"""Register neurons (Jiang et al. 2025): the MLP neurons that fire where the high-norm outliers are.

A neuron is one hidden unit of a block's MLP, read at the input of ``mlp.fc2`` (after the
activation). As in the authors' ``find_register_neurons``: in each image the outliers of the
detector layer are found (``vitlens.analysis.outliers``, a fixed norm threshold or ``auto``);
each neuron of blocks 0..``max_layer`` scores its mean absolute activation over those outlier
tokens; images without outliers are left out; the scores are averaged over the remaining images
and ranked across all those blocks. The optional sparsity filter keeps, per image, only neurons
that stay below ``SPARSE_ACTIVATION`` on at least ``SPARSE_FRACTION`` of the tokens.

Memory: activations are held for one batch at a time (blocks 0..max_layer) and reduced to
``[layer, neuron]`` sums before the next batch; the forward pass stops after the last block needed.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from ..capture import input_resolution
from ..errors import ImageError, NeuronFileError, OptionError, UnknownModelError
from ..images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, read_image_file, resize_for_model, to_tensor
from ..interventions import fc2_of
from ..layout import TokenLayout
from ..models import LoadedModel, resolve_spec
from .outliers import find_outliers

SPARSE_ACTIVATION = 0.5  # authors' sparsity_activation_threshold
SPARSE_FRACTION = 0.5  # authors' sparsity_frac_threshold
DEFAULT_TOP = 10  # the authors keep 10 for OpenCLIP ViT-B/16 and 50 for DINOv2 ViT-L/14


@dataclass(frozen=True)
class Neuron:
    """One ranked MLP neuron: ``neuron`` indexes the input of block ``layer``'s ``mlp.fc2``."""

    layer: int
    neuron: int
    score: float


@dataclass(frozen=True, eq=False)
class NeuronScores:
    """Scores of every neuron of blocks 0..max_layer over a set of images.

    Attributes:
        scores: Mean absolute activation at outlier tokens, averaged over images with outliers.  # [layer, neuron]
        detector_layer: Block whose outliers were used.
        threshold: Fixed outlier norm, or None for ``auto``.
        num_images: Images seen.
        images_with_outliers: Images that had outliers at the detector layer (the others do not count).
        sparse: Whether the sparsity filter was applied.
    """

    scores: np.ndarray
    detector_layer: int
    threshold: float | None
    num_images: int
    images_with_outliers: int
    sparse: bool = False

    @property
    def max_layer(self) -> int:
        return self.scores.shape[0] - 1

    def top(self, k: int, max_layer: int | None = None) -> list[Neuron]:
        """The ``k`` best neurons across blocks 0..max_layer (default: all scored), best first (ties: lower
        block, lower index)."""
        flat = self.scores[:None if max_layer is None else max_layer + 1].ravel()
        order = np.lexsort((np.arange(flat.size), -flat))[:k]
        width = self.scores.shape[1]
        return [Neuron(layer=int(i // width), neuron=int(i % width), score=float(flat[i])) for i in order]


@dataclass(frozen=True)
class RegisterNeurons:
    """A neuron list as the ``neurons`` command writes it: ``{"model", "weights", "neurons"}``."""

    model: str
    weights: str
    neurons: tuple[Neuron, ...]

    def to_json(self) -> dict:
        return {"model": self.model, "weights": self.weights,
                "neurons": [{"layer": n.layer, "neuron": n.neuron, "score": n.score} for n in self.neurons]}

    def pairs(self) -> tuple[tuple[int, int], ...]:
        """(block, neuron) of each neuron, in rank order."""
        return tuple((n.layer, n.neuron) for n in self.neurons)

    def fits(self, name: str) -> bool:
        """Whether the list was found on the architecture ``name``."""
        return _architecture(self.model) == _architecture(name)

    def check_model(self, name: str) -> None:
        """Refuse a list found on another architecture than ``name``.

        Raises:
            NeuronFileError: the architectures differ (pretrained tags are ignored).
        """
        if not self.fits(name):
            raise NeuronFileError(f"The register neurons were found on '{self.model}', not on '{name}'.")


def _architecture(name: str) -> str:
    try:
        return resolve_spec(name).arch.partition(".")[0]
    except UnknownModelError:  # a name this timm does not know: compare it as written
        return name.partition(".")[0]


def parse_neurons(data: object, source: str = "the neuron file") -> RegisterNeurons:
    """A ``RegisterNeurons`` from decoded JSON.

    Raises:
        NeuronFileError: anything but ``{"model": str, "weights": str, "neurons": [{"layer": int >= 0,
            "neuron": int >= 0, "score": number}, ...]}`` with at least one neuron.
    """
    if not isinstance(data, dict) or not isinstance(data.get("model"), str) or not isinstance(data.get("neurons"), list):
        raise NeuronFileError(f"{source} is not a neuron list: expected {{\"model\", \"weights\", \"neurons\": [...]}}.")
    neurons = tuple(_parse_neuron(item, source) for item in data["neurons"])
    if not neurons:
        raise NeuronFileError(f"{source} lists no neurons.")
    return RegisterNeurons(model=data["model"], weights=str(data.get("weights", "")), neurons=neurons)


def _parse_neuron(item: object, source: str) -> Neuron:
    if not isinstance(item, dict):
        raise NeuronFileError(f"{source} has a neuron entry that is not an object: {item!r}.")
    layer, neuron, score = item.get("layer"), item.get("neuron"), item.get("score", 0.0)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (layer, neuron)):
        raise NeuronFileError(f"{source} has a neuron whose layer or index is not a non-negative integer: {item!r}.")
    if not isinstance(score, (int, float)) or isinstance(score, bool):
        raise NeuronFileError(f"{source} has a neuron whose score is not a number: {item!r}.")
    return Neuron(layer=layer, neuron=neuron, score=float(score))


def read_neurons(path: str | Path) -> RegisterNeurons:
    """Read a neuron file written by ``write_neurons`` (or by hand).

    Raises:
        NeuronFileError: unreadable, not JSON, or not a neuron list.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise NeuronFileError(f"Cannot read the neuron file '{path}': {error.strerror or error}.") from error
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NeuronFileError(f"The neuron file '{path}' is not valid JSON.") from None
    return parse_neurons(data, f"The neuron file '{path}'")


def write_neurons(path: str | Path, neurons: RegisterNeurons) -> None:
    """Write the ``neurons`` JSON document.

    Raises:
        OptionError: the file cannot be written.
    """
    try:
        Path(path).write_text(json.dumps(neurons.to_json(), indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise OptionError(f"Cannot write '{path}': {error.strerror or error}.") from error


def default_detector_layer(num_layers: int) -> int:
    """The second-to-last block (where the authors detect DINOv2's outliers)."""
    return max(num_layers - 2, 0)


def score_neurons(
        loaded: LoadedModel,
        batches: Iterable[torch.Tensor],
        detector_layer: int | None = None,
        max_layer: int | None = None,
        threshold: float | None = None,
        sparse: bool = False,
        antialias: bool = True,
) -> NeuronScores:
    """Score every MLP neuron of blocks 0..max_layer by its activation at the outlier tokens.

    Args:
        loaded: The model.
        batches: Normalised images, one size per batch.  # each [batch, 3, height, width]
        detector_layer: Block whose outliers count (negative counts from the end); default: second-to-last.
        max_layer: Last block whose neurons are scored; default: the detector layer.
        threshold: Fixed outlier norm; None: ``auto`` per image.
        sparse: Apply the sparsity filter.
        antialias: Antialiased position-embedding resampling for other input sizes.

    Raises:
        OptionError: a layer out of range, or a block without a linear ``mlp.fc2``.
    """
    model = loaded.model
    num_layers = len(model.blocks)
    detector_layer = _layer(default_detector_layer(num_layers) if detector_layer is None else detector_layer,
                            num_layers, "detector layer")
    max_layer = _layer(detector_layer if max_layer is None else max_layer, num_layers, "max layer")
    total: torch.Tensor | None = None  # [layer, neuron], float64
    num_images = with_outliers = 0
    for pixels in batches:
        sums, count = _score_batch(loaded, pixels, detector_layer, max_layer, threshold, sparse, antialias)
        total = sums if total is None else total + sums
        num_images += pixels.shape[0]
        with_outliers += count
    scores = (total / max(with_outliers, 1)).numpy() if total is not None else np.zeros((max_layer + 1, 0))
    return NeuronScores(scores=scores.astype(np.float32), detector_layer=detector_layer, threshold=threshold,
                        num_images=num_images, images_with_outliers=with_outliers, sparse=sparse)


def _layer(layer: int, num_layers: int, what: str) -> int:
    if not -num_layers <= layer < num_layers:
        raise OptionError(f"The {what} must be between 0 and {num_layers - 1} (or negative from the end), not {layer}.")
    return layer % num_layers


def _score_batch(loaded: LoadedModel, pixels: torch.Tensor, detector_layer: int, max_layer: int,
                 threshold: float | None, sparse: bool, antialias: bool) -> tuple[torch.Tensor, int]:
    """Per-neuron sums over the images of one batch that have outliers, and how many had them."""
    model = loaded.model
    with loaded.lock, input_resolution(model, tuple(pixels.shape[-2:]), antialias) as grid, \
            _neuron_hooks(model, max_layer, detector_layer) as recorder:
        with torch.inference_mode(), contextlib.suppress(_Stop):
            model.forward_features(pixels.to(loaded.device))
    layout = TokenLayout.from_model(model, grid)
    patch_norms = layout.patch_grid(recorder.norms.float().cpu().numpy())  # [batch, row, col]
    sums = torch.zeros(max_layer + 1, recorder.activations[0].shape[-1], dtype=torch.float64)
    count = 0
    for image, norms in enumerate(patch_norms):
        cells = np.flatnonzero(find_outliers(norms, threshold).mask.ravel())
        if cells.size == 0:
            continue
        tokens = torch.as_tensor(cells + layout.num_prefix)
        for layer, acts in enumerate(recorder.activations):
            sums[layer] += _image_scores(acts[image], tokens, sparse).double().cpu()
        count += 1
    return sums, count


def _image_scores(acts: torch.Tensor, tokens: torch.Tensor, sparse: bool) -> torch.Tensor:
    """Mean absolute activation at ``tokens``; zero for non-sparse neurons when filtering.  # [neuron]

    Args:
        acts: One image's activations of one block.  # [token, neuron]
        tokens: Outlier token indices.  # [outlier]
    """
    scores = acts[tokens.to(acts.device)].float().abs().mean(dim=0)
    if sparse:
        quiet = (acts < SPARSE_ACTIVATION).float().mean(dim=0) >= SPARSE_FRACTION
        scores = scores * quiet
    return scores


class _Stop(Exception):
    """Raised by a hook to end the forward pass once every needed block has run."""


class _NeuronRecorder:
    def __init__(self) -> None:
        self.activations: list[torch.Tensor] = []  # per block 0..max_layer: [batch, token, neuron]
        self.norms: torch.Tensor | None = None  # detector block output norms: [batch, token]


@contextlib.contextmanager
def _neuron_hooks(model: VisionTransformer, max_layer: int, detector_layer: int) -> Iterator[_NeuronRecorder]:
    """Record fc2 inputs of blocks 0..max_layer and the detector block's norms; stop after the last needed block."""
    recorder = _NeuronRecorder()
    last = max(max_layer, detector_layer)
    handles = []

    def on_fc2(module, args) -> None:
        recorder.activations.append(args[0])

    def on_detector(module, args, output: torch.Tensor) -> None:
        recorder.norms = torch.linalg.vector_norm(output.float(), dim=-1)

    def on_last(module, args, output: torch.Tensor) -> None:
        raise _Stop

    try:
        for layer in range(max_layer + 1):
            handles.append(fc2_of(model, layer).register_forward_pre_hook(on_fc2))
        handles.append(model.blocks[detector_layer].register_forward_hook(on_detector))
        handles.append(model.blocks[last].register_forward_hook(on_last))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def neuron_maps(loaded: LoadedModel, pixels: torch.Tensor, neurons: Iterable[tuple[int, int]],
                antialias: bool = True) -> np.ndarray:
    """Each neuron's activation over the patches of one image.  # [neuron, row, col]

    Args:
        pixels: One normalised image.  # [1, 3, height, width]
        neurons: (block, neuron) pairs.
    """
    neurons = list(neurons)
    model = loaded.model
    layers = sorted({layer for layer, _ in neurons})
    with loaded.lock, input_resolution(model, tuple(pixels.shape[-2:]), antialias) as grid, \
            _fc2_inputs(model, layers) as found, torch.inference_mode():
        model.forward_features(pixels.to(loaded.device))
    layout = TokenLayout.from_model(model, grid)
    columns = [found[layer][0, :, neuron].float().cpu().numpy() for layer, neuron in neurons]  # each [token]
    return layout.patch_grid(np.stack(columns)) if columns else np.zeros((0, *layout.grid), dtype=np.float32)


@contextlib.contextmanager
def _fc2_inputs(model: VisionTransformer, layers: Iterable[int]) -> Iterator[dict[int, torch.Tensor]]:
    """The fc2 inputs of ``layers`` in the next forward pass.  # {layer: [batch, token, neuron]}"""
    found: dict[int, torch.Tensor] = {}
    handles = []
    try:
        for layer in layers:
            def hook(module, args, layer=layer) -> None:
                found[layer] = args[0]
            handles.append(fc2_of(model, layer).register_forward_pre_hook(hook))
        yield found
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class ImageBatches:
    """Normalised images of files, decoded lazily and batched by input shape; unreadable files are skipped.

    Attributes:
        failed: (file, reason) of each file skipped so far.
    """

    loaded: LoadedModel
    paths: list[Path]
    side: int | None = None
    batch: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def __iter__(self) -> Iterator[torch.Tensor]:  # each [batch, 3, height, width]
        side = self.side or max(self.loaded.native_size)
        pending: list[torch.Tensor] = []
        for path in self.paths:
            try:
                image = read_image_file(path, max_pixels=self.max_pixels, max_bytes=self.max_bytes)
            except ImageError as error:
                self.failed.append((path, str(error)))
                continue
            tensor = to_tensor(resize_for_model(image.image, side, self.loaded.patch_size), self.loaded.mean, self.loaded.std)
            if pending and (tensor.shape != pending[0].shape or len(pending) == self.batch):
                yield torch.stack(pending)
                pending = []
            pending.append(tensor)
        if pending:
            yield torch.stack(pending)

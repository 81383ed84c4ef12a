"""LOST object discovery on a model's attention features, and corLoc over a Pascal-VOC-style folder.

Preprocessing follows the LOST authors' evaluation: the whole image (optionally rescaled so its
longer side is ``side`` pixels), normalised, then zero-padded on the right and bottom to a whole
number of patches; position embeddings are resampled to that grid. Boxes come back in pixels of
the original image, 0-based, x1/y1 exclusive. VOC boxes (1-based, inclusive) are read the same
way LOST reads them: ``(xmin - 1, ymin - 1, xmax, ymax)``. By default every ground-truth box
counts, ``difficult`` ones included, as in LOST's VOC07 numbers.
"""
from __future__ import annotations

import contextlib
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from .analysis.lost import DEFAULT_K, LostResult, box_iou, corloc, lost
from .capture import input_resolution
from .errors import DataError, ImageError, OptionError
from .images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, read_image_file, to_tensor
from .models import LoadedModel

FEATURES = ("k", "q", "v")  # keys (LOST's default), queries, values
_QKV_INDEX = {"q": 0, "k": 1, "v": 2}  # order of timm's fused qkv projection
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
REFERENCE_CORLOC = {  # VOC2007 trainval corLoc (%), Darcet et al. 2024, Table 3
    "DINO ViT-S/16": 61.9,
    "DINOv2 ViT-L/14": 35.3,
    "DINOv2 ViT-L/14 + registers": 55.4,
}
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Discovery:
    """LOST on one image.

    Attributes:
        result: Seed, box and masks on the patch grid.
        box: The box in pixels of the original image (x0, y0, x1, y1), x1/y1 exclusive.
        patch_size: Pixels per patch of the model input.
        scale: Model input pixels per original pixel.
    """

    result: LostResult
    box: tuple[int, int, int, int]
    patch_size: int
    scale: float


@contextlib.contextmanager
def attention_features(model: VisionTransformer, layer: int, which: str = "k") -> Iterator[dict[str, torch.Tensor]]:
    """Record one block's keys, queries or values (heads concatenated) while the block is open.

    Yields a dict that holds ``features`` after a forward pass.  # [batch, token, channel]

    Raises:
        OptionError: ``which`` is not k/q/v or ``layer`` is out of range.
    """
    if which not in FEATURES:
        raise OptionError(f"Features must be one of {', '.join(FEATURES)}, not '{which}'.")
    if not -len(model.blocks) <= layer < len(model.blocks):
        raise OptionError(f"Layer {layer} is out of range for a model with {len(model.blocks)} blocks.")
    attn = model.blocks[layer].attn
    recorded: dict[str, torch.Tensor] = {}

    def hook(module, args, qkv: torch.Tensor) -> None:
        batch, tokens, _ = qkv.shape
        parts = qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # [3, batch, head, token, dim]
        x = parts[_QKV_INDEX[which]]  # [batch, head, token, dim]
        if which in ("q", "k"):
            x = (attn.q_norm if which == "q" else attn.k_norm)(x)
        recorded["features"] = x.transpose(1, 2).reshape(batch, tokens, -1).float()

    handle = attn.qkv.register_forward_hook(hook)
    try:
        yield recorded
    finally:
        handle.remove()


def padded_input(image: Image.Image, loaded: LoadedModel, side: int | None) -> tuple[torch.Tensor, float]:
    """The normalised image, rescaled so its longer side is ``side`` (None: as it is), zero-padded
    to whole patches; and the scale (input pixels per original pixel).  # [3, height, width]"""
    scale = 1.0 if side is None else side / max(image.size)
    if scale != 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    pixels = to_tensor(image, loaded.mean, loaded.std)
    patch = loaded.patch_size
    pad_right, pad_bottom = -image.width % patch, -image.height % patch
    return F.pad(pixels, (0, pad_right, 0, pad_bottom)), scale


def discover(loaded: LoadedModel, image: Image.Image, side: int | None = None, layer: int = -1,
             which: str = "k", k: int = DEFAULT_K, antialias: bool = True) -> Discovery:
    """LOST on one image with the model's own attention features."""
    pixels, scale = padded_input(image, loaded, side)
    patch = loaded.patch_size
    model = loaded.model
    with loaded.lock, input_resolution(model, tuple(pixels.shape[-2:]), antialias) as grid, \
            attention_features(model, layer, which) as recorded, torch.inference_mode():
        model.forward_features(pixels[None].to(loaded.device))
    features = recorded["features"][0, model.num_prefix_tokens:].cpu().numpy()  # [patch, channel]
    result = lost(features, grid, k)
    return Discovery(result=result, box=_pixel_box(result.box, patch, scale, image.size), patch_size=patch, scale=scale)


def _pixel_box(cells: tuple[int, int, int, int], patch: int, scale: float, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Grid box (row0, col0, row1, col1) -> (x0, y0, x1, y1) in original pixels, clipped to the image."""
    row0, col0, row1, col1 = cells
    width, height = size
    x0, y0 = math.floor(col0 * patch / scale), math.floor(row0 * patch / scale)
    x1, y1 = math.ceil(col1 * patch / scale - 1e-9), math.ceil(row1 * patch / scale - 1e-9)
    return min(x0, width), min(y0, height), min(x1, width), min(y1, height)


@dataclass(frozen=True)
class Annotation:
    """Ground truth of one VOC image.

    Attributes:
        boxes: (x0, y0, x1, y1), 0-based, x1/y1 exclusive.  # [box, 4]
        difficult: The ``difficult`` flag of each box.  # [box]
    """

    boxes: np.ndarray
    difficult: np.ndarray

    def kept(self, difficult: bool) -> np.ndarray:
        """The boxes, without the difficult ones unless ``difficult``.  # [box, 4]"""
        return self.boxes if difficult else self.boxes[~self.difficult]


def read_annotation(path: Path) -> Annotation:
    """Parse one VOC XML file.

    Raises:
        DataError: unreadable file, not XML, or an object without a numeric ``bndbox``.
    """
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as error:
        raise DataError(f"'{path.name}' is not a readable VOC XML file ({error}).") from error
    boxes, difficult = [], []
    for obj in root.iter("object"):
        try:
            bndbox = obj.find("bndbox")
            xmin, ymin, xmax, ymax = (float(bndbox.find(tag).text) for tag in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError) as error:
            raise DataError(f"'{path.name}' has an object without a numeric bndbox.") from error
        boxes.append((xmin - 1, ymin - 1, xmax, ymax))
        difficult.append((obj.findtext("difficult") or "0").strip() == "1")
    return Annotation(np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(difficult, dtype=bool))


@dataclass(frozen=True)
class VocItem:
    """One image name and its files (either may be missing)."""

    name: str
    image: Path | None
    annotation: Path | None


def voc_items(root: Path) -> list[VocItem]:
    """The images and annotations of a VOC-style folder, paired by file stem, sorted by name.

    Raises:
        DataError: no ``JPEGImages`` or ``Annotations`` folder, or neither holds a file.
    """
    root = Path(root)
    images_dir, annotations_dir = root / "JPEGImages", root / "Annotations"
    if not images_dir.is_dir() or not annotations_dir.is_dir():
        raise DataError(f"'{root}' is not a Pascal-VOC-style folder: it needs JPEGImages/ and Annotations/ subfolders.")
    images = {p.stem: p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    annotations = {p.stem: p for p in annotations_dir.iterdir() if p.suffix.lower() == ".xml"}
    if not images and not annotations:
        raise DataError(f"'{root}' has no images in JPEGImages/ and no XML files in Annotations/.")
    return [VocItem(name, images.get(name), annotations.get(name)) for name in sorted(images.keys() | annotations.keys())]


def lost_voc(root: Path, loaded: LoadedModel, side: int | None = None, layer: int = -1, which: str = "k",
             k: int = DEFAULT_K, difficult: bool = True, antialias: bool = True,
             max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
             progress: Progress | None = None) -> dict:
    """LOST on every image of a VOC-style folder and its corLoc (the ``lost --json`` document).

    Images whose picture or XML is missing or unreadable go to ``failed``; images without a
    ground-truth box (after dropping difficult ones when ``difficult`` is False) are listed in
    ``no_boxes`` and not counted.
    """
    items = voc_items(root)
    failed, rows, no_boxes = [], [], []
    for done, item in enumerate(items):
        try:
            row = _evaluate(item, loaded, side, layer, which, k, difficult, antialias, (max_pixels, max_bytes))
        except (DataError, ImageError) as error:
            failed.append({"image": item.image.name if item.image else item.name, "reason": str(error)})
        else:
            (rows if row is not None else no_boxes).append(row if row is not None else item.name)
        if progress:
            progress(done + 1, len(items))
    score = corloc([row["iou"] for row in rows])
    return {"corloc": score, "num_images": len(rows), "failed": failed, "images": rows, "no_boxes": no_boxes,
            "options": {"size": side, "layer": layer, "features": which, "k": k, "difficult": difficult,
                        "antialias": antialias}}


def _evaluate(item: VocItem, loaded: LoadedModel, side: int | None, layer: int, which: str, k: int,
              difficult: bool, antialias: bool, limits: tuple[int, int]) -> dict | None:
    if item.annotation is None:
        raise DataError(f"no annotation Annotations/{item.name}.xml")
    if item.image is None:
        raise DataError(f"no picture JPEGImages/{item.name}.jpg")
    gt = read_annotation(item.annotation).kept(difficult)
    if not len(gt):
        return None
    image = read_image_file(item.image, max_pixels=limits[0], max_bytes=limits[1]).image
    found = discover(loaded, image, side, layer, which, k, antialias)
    iou = float(box_iou(np.array(found.box), gt).max())
    return {"image": item.image.name, "box": list(found.box), "seed": list(found.result.seed),
            "iou": iou, "correct": iou >= 0.5}

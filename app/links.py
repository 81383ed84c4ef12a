"""The view's state in the query string: one table of fields (state key, name in the link, how to read it).

A link holds everything a teammate needs to see the same view: the sidebar (model, weights, side,
images, threshold, compare) and each page's widgets (layer, head, focused image, colour scales,
opacity, post-norm, embedding method and unit-length tokens, grid cell width, heads query and patch,
histogram layers...). Reading is strict and never raises: a value that does not parse, or lies
outside its range, is left out (the widget keeps its default) and named in one message. Widgets
that need the request to validate a value (a head the model has, an image of the view) do that on
their page, as they do for values the user set.

Streamlit turns every change of ``st.query_params`` into a browser history entry, so the URL is
written only when the view changed: not on a session's first run unless the link had to be
corrected, and on Back/Forward the link is read again instead (the view follows the history).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

from grid_image import GRID_CELLS

MAX_INDEX = 4096  # no model has more blocks or heads
MAX_TEXT = 200  # characters of a name (image reference, results folder) read from a link
MAX_LAYERS = 64  # histogram layers read from a link


@dataclass(frozen=True)
class Field:
    """One widget value in the link.

    Attributes:
        key: Session-state key (the widget's key).
        param: Name in the query string.
        parse: Text to value; raises ValueError when the text is not a valid value.
        show: Value to text (the inverse of ``parse``).
    """

    key: str
    param: str
    parse: Callable[[str], object]
    show: Callable[[object], str] = str


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(text)
    return text == "1"


def _flag_text(value: object) -> str:
    return "1" if value else "0"


def _whole(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(text)
        return value
    return parse


def _fraction(step: float) -> Callable[[str], float]:
    """A number in [0, 1] on a slider's steps."""
    def parse(text: str) -> float:
        value = float(text)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(text)
        return round(round(value / step) * step, 6)
    return parse


def _number_text(value: object) -> str:
    return f"{float(value):g}"


def _one_of(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(text)
        return text
    return parse


def _whole_of(values: tuple[int, ...]) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if text not in {str(value) for value in values}:
            raise ValueError(text)
        return int(text)
    return parse


def _position(text: str) -> tuple[float, float]:
    """A place on the image: "y,x", each a fraction of the height or width (0 to 1)."""
    parts = text.split(",")
    values = tuple(float(part) for part in parts)
    if len(values) != 2 or not all(0.0 <= value <= 1.0 for value in values):  # NaN fails the comparison too
        raise ValueError(text)
    return values


def _position_text(value: object) -> str:
    return ",".join(f"{float(v):.4g}" for v in value)


def _name(text: str) -> str:
    if len(text) > MAX_TEXT:
        raise ValueError(text[:40])
    return text


def _head(text: str) -> str | int:
    """"mean" (over heads) or a head index."""
    return "mean" if text == "mean" else _whole(0, MAX_INDEX)(text)


def _layers(text: str) -> list[int]:
    layers = sorted({_whole(0, MAX_INDEX)(part) for part in text.split(",") if part})
    if len(layers) > MAX_LAYERS:
        raise ValueError(text[:40])
    return layers


def _layers_text(value: object) -> str:
    return ",".join(str(layer) for layer in value)


FIELDS = (
    Field("compare", "compare", _flag, _flag_text),
    Field("side", "side", int),  # any whole number: the sidebar rounds it to the patch size and clamps it
    Field("results_folder", "results", _name),
    Field("layer", "layer", _whole(0, MAX_INDEX)),  # the slider clamps it to the model's blocks
    Field("focus_image", "image", _name),
    Field("head", "head", _head),
    Field("opacity", "opacity", _fraction(0.05), _number_text),
    Field("post_norm", "post_norm", _flag, _flag_text),
    Field("norm_scale_shared", "norm_scale_shared", _flag, _flag_text),
    Field("shared_scale", "attention_scale_shared", _flag, _flag_text),
    Field("extra_layers", "hist_layers", _layers, _layers_text),
    Field("log_y", "log_y", _flag, _flag_text),
    Field("per_image_threshold", "per_image_threshold", _flag, _flag_text),
    Field("emergence_scope", "emergence_images", _name),
    Field("embed_method", "embed_method", _one_of("pca", "umap")),
    Field("embed_normalize", "embed_unit", _flag, _flag_text),
    Field("grid_cell", "grid_cell", _whole_of(GRID_CELLS)),
    Field("heads_query", "heads_query", _name),
    Field("attention_patch", "patch", _position, _position_text),
    Field("figure_format", "format", _one_of("png", "svg")),
)


def keys() -> list[str]:
    """The state keys the link holds."""
    return [field.key for field in FIELDS]


def read(query: Mapping[str, str]) -> tuple[dict[str, object], list[str]]:
    """The fields a link sets, by state key, and the names of those whose value was not understood."""
    values, bad = {}, []
    for field in FIELDS:
        text = query.get(field.param)
        if not text:
            continue
        try:
            values[field.key] = field.parse(text)
        except ValueError:
            bad.append(field.param)
    return values, bad


def write(state: Mapping[str, object]) -> dict[str, str]:
    """The query-string entries of the fields the state holds (a widget never drawn is left out)."""
    params = {}
    for field in FIELDS:
        value = state.get(field.key)
        if value is None:
            continue
        text = field.show(value)
        if text:
            params[field.param] = text
    return params


def corrected(opened: Mapping[str, str], params: Mapping[str, str]) -> bool:
    """Whether the view differs from what the opened link said, for the entries the link named."""
    return any(name in opened and opened[name] != text for name, text in params.items())

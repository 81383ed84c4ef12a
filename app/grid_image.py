"""A paper-style comparison grid (rows: images, columns: models) drawn to PNG and SVG without a browser.

Pure functions, no streamlit and no plotly export engine: the grid is laid out once as a list of
drawing items (pictures with the heat map blended in, text, outline boxes), and each item is
drawn either with Pillow (PNG) or as SVG elements (cells and colour bars as embedded PNG images,
outlier outlines and labels as vector elements). Both files therefore show the same layout.
"""
from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from plotly.colors import get_colorscale, hex_to_rgb

from figures import OUTLINE

MARGIN = 16
GAP = 10  # pixels between cells
BAR_HEIGHT = 12
TITLE_SIZE, HEADER_SIZE, NOTE_SIZE, LABEL_SIZE, TICK_SIZE = 16, 14, 11, 12, 11
MAX_LABEL_PX = 170  # row labels wrap within this width
GRID_CELLS = (160, 200, 240, 320, 400)  # cell widths (px) the page offers
FONT_FAMILY = "DejaVu Sans, Arial, Helvetica, sans-serif"
SVG_FONT_SLACK = 1.15  # the SVG viewer's sans-serif runs up to this much wider than Pillow's font, which measures


def _inferno_table(steps: int = 256) -> np.ndarray:
    """Plotly's Inferno colour scale sampled at ``steps`` points.  # [step, 3] uint8"""
    scale = get_colorscale("Inferno")
    positions = np.array([p for p, _ in scale])
    colours = np.array([hex_to_rgb(c) for _, c in scale], dtype=float)  # [stop, 3]
    x = np.linspace(0.0, 1.0, steps)
    return np.stack([np.interp(x, positions, colours[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


INFERNO = _inferno_table()


@dataclass(frozen=True, eq=False)
class GridCell:
    """One model's map of one image.

    Attributes:
        values: One value per patch.  # [row, col]
        mask: Cells to outline (outliers), or None.  # [row, col]
        picture: The picture under the map (stretched to the model's input box), or None.
    """

    values: np.ndarray
    mask: np.ndarray | None = None
    picture: Image.Image | None = None


@dataclass(frozen=True, eq=False)
class ComparisonGrid:
    """Maps of several images (rows) by several models (columns), to be drawn as one figure.

    Attributes:
        title: One line above the grid.
        row_labels: Image names.
        column_labels: Model names.
        column_notes: A second, smaller header line per model (weights, registers).
        cells: ``cells[image][model]``.
        colorbar: What the values are (colour-bar title).
        shared_scale: One colour scale for every cell; else one per model (column).
        aspects: Height over width of each row's pictures (the model input box).
        file_stem: Descriptive file name without extension.
        cell_px: Width of a cell in pixels.
        opacity: Heat-map opacity over the picture.
        column_colours: Each model's colour for its header (``figures.model_colours``); None: black.
    """

    title: str
    row_labels: list[str]
    column_labels: list[str]
    column_notes: list[str]
    cells: list[list[GridCell]]
    colorbar: str
    shared_scale: bool
    aspects: list[float]
    file_stem: str
    cell_px: int = 240
    opacity: float = 0.6
    column_colours: list[str] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(images, models)."""
        return len(self.row_labels), len(self.column_labels)

    def scales(self) -> list[tuple[float, float]]:
        """The colour range of each column: the same for all when the scale is shared."""
        ranges = [_range([row[c].values for row in self.cells]) for c in range(self.shape[1])]
        if self.shared_scale:
            shared = (min(low for low, _ in ranges), max(high for _, high in ranges))
            return [shared] * len(ranges)
        return ranges


def _range(arrays: Sequence[np.ndarray]) -> tuple[float, float]:
    return float(min(np.nanmin(a) for a in arrays)), float(max(np.nanmax(a) for a in arrays))


def nice_ticks(low: float, high: float, count: int = 5) -> tuple[list[float], list[str]]:
    """Round tick values (1, 2 or 5 times a power of ten apart) inside [low, high], as close to ``count``
    of them as such a spacing allows, and their labels; the two ends when no spacing gives two ticks."""
    if not high > low:
        return [low], [f"{low:.3g}"]
    power = 10.0 ** np.floor(np.log10((high - low) / max(count - 1, 1)))
    best: tuple[list[float], float] = ([low, high], high - low)
    for step in (power * m for m in (0.5, 1, 2, 5, 10)):
        ends = np.ceil(low / step - 1e-9), np.floor(high / step + 1e-9)  # tick indices inside the range
        values = [float(i * step) for i in np.arange(ends[0], ends[1] + 1)]
        closer = abs(len(values) - count) < abs(len(best[0]) - count)
        tie = abs(len(values) - count) == abs(len(best[0]) - count)
        better_tie = tie and (len(values) > len(best[0]) or best[1] == high - low)  # more ticks, or round ones over the ends
        if len(values) >= 2 and (closer or better_tie):
            best = (values, step)
    values, step = best
    if step == high - low:
        return values, [f"{v:.3g}" for v in values]
    digits = max(0, -int(np.floor(np.log10(step)))) if step < 1 else 0
    return values, [f"{v:.{digits}f}" for v in values]


def file_stem(parts: Sequence[str]) -> str:
    """A file name from descriptive parts joined by ``_``: letters, digits, dots, dashes and underscores only."""
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", part).strip("-") for part in parts if part)


# ----------------------------------------------------------------------------------------------
# Drawing items
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Raster:
    """A picture in the box (x, y, w, h); ``make(width, height)`` draws it at a given pixel size."""

    x: float
    y: float
    w: float
    h: float
    make: Callable[[int, int], Image.Image] = field(compare=False)


@dataclass(frozen=True)
class Text:
    """A line of text at (x, y); ``anchor``: start, middle or end; y is the middle of the line."""

    x: float
    y: float
    text: str
    size: int
    anchor: str = "start"
    colour: str = "#111111"


@dataclass(frozen=True)
class Box:
    """An unfilled rectangle."""

    x: float
    y: float
    w: float
    h: float
    colour: str
    width: float


@dataclass(frozen=True, eq=False)
class Layout:
    """Drawing items and the canvas size, in CSS pixels (SVG units)."""

    width: int
    height: int
    items: list
    cell_boxes: list[list[tuple[float, float, float, float]]]  # [image][model]: (x, y, w, h)


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _text_width(text: str, size: int) -> float:
    return float(_font(size).getlength(text))


def _wrap(text: str, size: int, width: float) -> list[str]:
    """Words of ``text`` in lines no wider than ``width`` (a single long word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and _text_width(f"{lines[-1]} {word}", size) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def heat_cell(cell: GridCell, low: float, high: float, opacity: float) -> Callable[[int, int], Image.Image]:
    """A function drawing the cell's heat map (square patches, nearest neighbour) over its picture."""

    def make(width: int, height: int) -> Image.Image:
        span = high - low if high > low else 1.0
        index = np.clip((np.nan_to_num(cell.values, nan=low) - low) / span, 0, 1) * (len(INFERNO) - 1)
        heat = Image.fromarray(INFERNO[index.round().astype(int)], "RGB").resize((width, height), Image.Resampling.NEAREST)
        if cell.picture is None:
            return heat
        picture = cell.picture.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        return Image.blend(picture, heat, opacity)

    return make


def _bar(width: int, height: int) -> Image.Image:
    """The colour scale from low (left) to high (right)."""
    ramp = INFERNO[np.linspace(0, len(INFERNO) - 1, max(width, 2)).round().astype(int)]  # [x, 3]
    return Image.fromarray(np.repeat(ramp[None], max(height, 1), axis=0), "RGB")


def layout(grid: ComparisonGrid) -> Layout:
    """Place title, column headers, row labels, cells, outlier outlines and colour bars."""
    rows, cols = grid.shape
    cell_w = grid.cell_px
    wrapped = [_wrap(label, LABEL_SIZE, MAX_LABEL_PX) for label in grid.row_labels]
    label_w = max(_text_width(line, LABEL_SIZE) for lines in wrapped for line in lines) * SVG_FONT_SLACK + 10
    notes = [_wrap(note, NOTE_SIZE, cell_w) for note in grid.column_notes]
    header_h = HEADER_SIZE + 6 + max(len(n) for n in notes) * (NOTE_SIZE + 3)
    x0, y = MARGIN + label_w, MARGIN
    grid_w = cols * cell_w + (cols - 1) * GAP
    title = _wrap(grid.title, TITLE_SIZE, label_w + grid_w)
    items: list = [Text(MARGIN, y + i * (TITLE_SIZE + 4) + TITLE_SIZE / 2, line, TITLE_SIZE) for i, line in enumerate(title)]
    y += len(title) * (TITLE_SIZE + 4) + 8
    colours = grid.column_colours or [Text.colour] * cols
    for c, (label, lines) in enumerate(zip(grid.column_labels, notes)):
        centre = x0 + c * (cell_w + GAP) + cell_w / 2
        items.append(Text(centre, y + HEADER_SIZE / 2, label, HEADER_SIZE, "middle", colours[c]))
        items += [Text(centre, y + HEADER_SIZE + 6 + i * (NOTE_SIZE + 3) + NOTE_SIZE / 2, line, NOTE_SIZE, "middle")
                  for i, line in enumerate(lines)]
    y += header_h + 8
    scales = grid.scales()
    boxes = []
    for r in range(rows):
        cell_h = cell_w * grid.aspects[r]
        lines = wrapped[r]
        top = y + cell_h / 2 - (len(lines) - 1) * (LABEL_SIZE + 3) / 2
        items += [Text(x0 - 10, top + i * (LABEL_SIZE + 3), line, LABEL_SIZE, "end") for i, line in enumerate(lines)]
        row_boxes = []
        for c in range(cols):
            x, cell = x0 + c * (cell_w + GAP), grid.cells[r][c]
            items.append(Raster(x, y, cell_w, cell_h, heat_cell(cell, *scales[c], grid.opacity)))
            items += _outlines(cell, x, y, cell_w, cell_h)
            row_boxes.append((x, y, cell_w, cell_h))
        boxes.append(row_boxes)
        y += cell_h + GAP
    y += 4
    if grid.shared_scale:
        bar_items, bar_h = _colour_bar(x0 + grid_w / 4, y, grid_w / 2, scales[0], grid.colorbar, 5)
        items += bar_items
    else:
        parts = [_colour_bar(x0 + c * (cell_w + GAP) + 8, y, cell_w - 16, scales[c], grid.colorbar, 3) for c in range(cols)]
        items += [item for bar_items, _ in parts for item in bar_items]
        bar_h = parts[0][1]
    width = int(np.ceil(x0 + grid_w + MARGIN))
    return Layout(width=width, height=int(np.ceil(y + bar_h + MARGIN)), items=items, cell_boxes=boxes)


def _outlines(cell: GridCell, x: float, y: float, w: float, h: float) -> list[Box]:
    if cell.mask is None:
        return []
    rows, cols = cell.mask.shape
    pw, ph = w / cols, h / rows
    return [Box(x + col * pw, y + row * ph, pw, ph, OUTLINE, 2.0) for row, col in np.argwhere(cell.mask)]


def _colour_bar(x: float, y: float, w: float, scale: tuple[float, float], title: str, count: int) -> tuple[list, float]:
    """A horizontal colour bar with tick labels under it and its title below; returns the items and the height."""
    low, high = scale
    items: list = [Raster(x, y, w, BAR_HEIGHT, _bar), Box(x, y, w, BAR_HEIGHT, "#444444", 0.6)]
    values, labels = nice_ticks(low, high, count)
    for value, label in zip(values, labels):
        tx = x + (w * (value - low) / (high - low) if high > low else w / 2)
        items.append(Box(tx, y + BAR_HEIGHT, 0, 4, "#444444", 1.0))
        items.append(Text(tx, y + BAR_HEIGHT + 6 + TICK_SIZE / 2, label, TICK_SIZE, "middle"))
    title_y = y + BAR_HEIGHT + 10 + TICK_SIZE + 4 + LABEL_SIZE / 2
    items.append(Text(x + w / 2, title_y, title, LABEL_SIZE, "middle"))
    return items, title_y + LABEL_SIZE / 2 - y


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------

_PIL_ANCHORS = {"start": "lm", "middle": "mm", "end": "rm"}


def to_png(grid: ComparisonGrid, scale: float = 2.0) -> bytes:
    """The grid as a PNG, ``scale`` device pixels per layout pixel (2: sharp in print and on HiDPI screens)."""
    plan = layout(grid)
    canvas = Image.new("RGB", (round(plan.width * scale), round(plan.height * scale)), "white")
    draw = ImageDraw.Draw(canvas)
    for item in plan.items:
        if isinstance(item, Raster):
            size = (max(1, round(item.w * scale)), max(1, round(item.h * scale)))
            canvas.paste(item.make(*size), (round(item.x * scale), round(item.y * scale)))
        elif isinstance(item, Text):
            draw.text((item.x * scale, item.y * scale), item.text, fill=item.colour, font=_font(round(item.size * scale)),
                      anchor=_PIL_ANCHORS[item.anchor])
        else:
            box = [item.x * scale, item.y * scale, (item.x + item.w) * scale, (item.y + item.h) * scale]
            if item.w == 0:
                draw.line(box, fill=item.colour, width=max(1, round(item.width * scale)))
            else:
                draw.rectangle(box, outline=item.colour, width=max(1, round(item.width * scale)))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def to_svg(grid: ComparisonGrid, raster_scale: float = 2.0) -> str:
    """The grid as a standalone SVG: cells and colour bars as embedded PNG images (``raster_scale``
    pixels per unit), outlier outlines and labels as vector rectangles and text."""
    plan = layout(grid)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{plan.width}" height="{plan.height}" '
             f'viewBox="0 0 {plan.width} {plan.height}" font-family="{FONT_FAMILY}">',
             f'<rect x="0" y="0" width="{plan.width}" height="{plan.height}" fill="white"/>']
    for item in plan.items:
        if isinstance(item, Raster):
            picture = item.make(max(1, round(item.w * raster_scale)), max(1, round(item.h * raster_scale)))
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
            parts.append(f'<image x="{item.x:.2f}" y="{item.y:.2f}" width="{item.w:.2f}" height="{item.h:.2f}" '
                         f'preserveAspectRatio="none" href="{uri}"/>')
        elif isinstance(item, Text):
            parts.append(f'<text x="{item.x:.2f}" y="{item.y:.2f}" font-size="{item.size}" text-anchor="{item.anchor}" '
                         f'dominant-baseline="central" fill="{item.colour}">{escape(item.text)}</text>')
        elif item.w == 0:
            parts.append(f'<line x1="{item.x:.2f}" y1="{item.y:.2f}" x2="{item.x:.2f}" y2="{item.y + item.h:.2f}" '
                         f'stroke="{item.colour}" stroke-width="{item.width}"/>')
        else:
            parts.append(f'<rect x="{item.x:.2f}" y="{item.y:.2f}" width="{item.w:.2f}" height="{item.h:.2f}" '
                         f'fill="none" stroke="{item.colour}" stroke-width="{item.width}"/>')
    parts.append("</svg>")
    return "\n".join(parts)

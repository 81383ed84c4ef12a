"""The comparison grid's PNG and SVG (app/grid_image.py): shape, colours on a shared or split scale, outlines."""
import io
import sys
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image

from app_fixtures import APP

sys.path.insert(0, str(APP))
import grid_image  # noqa: E402
from figures import OUTLINE  # noqa: E402
from grid_image import INFERNO, ComparisonGrid, GridCell  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"


def _grid(shared: bool = True, opacity: float = 1.0) -> ComparisonGrid:
    """Two images (a 3x4 and a 4x4 grid) by three models; the first model has an outlier of norm 100
    at (1, 2) in every image, the others have norms 5 to 20."""
    rows = []
    for shape, picture in [((3, 4), Image.new("RGB", (80, 60), "green")), ((4, 4), None)]:
        plain = np.full(shape, 10.0)
        plain[1, 2] = 100.0
        mask = plain > 50
        clean = np.linspace(5, 20, shape[0] * shape[1]).reshape(shape)
        rows.append([GridCell(plain, mask, picture), GridCell(clean, np.zeros(shape, bool), picture),
                     GridCell(clean / 2, None, picture)])
    return ComparisonGrid(title="norms at layer 4", row_labels=["a photo with a long name.png", "b.png"],
                          column_labels=["vit", "vit_reg4", "vit + ttr"], column_notes=["hub · 0 registers"] * 3,
                          cells=rows, colorbar="token norm", shared_scale=shared, aspects=[0.75, 1.0],
                          file_stem=grid_image.file_stem(["grid", "vit_vs_vit reg4", "layer4"]), cell_px=120,
                          opacity=opacity)


def _pixel(png: bytes, box: tuple[float, float, float, float], row: int, col: int, grid: tuple[int, int],
           scale: float = 2.0) -> np.ndarray:
    """The colour at the centre of patch (row, col) of the cell drawn in ``box`` (layout units)."""
    x, y, w, h = box
    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return picture[int((y + (row + 0.5) * h / grid[0]) * scale), int((x + (col + 0.5) * w / grid[1]) * scale)]


def test_png_is_the_layout_at_twice_its_size_with_one_cell_per_image_and_model():
    grid = _grid()
    plan = grid_image.layout(grid)
    image = Image.open(io.BytesIO(grid_image.to_png(grid)))
    assert image.format == "PNG" and image.size == (plan.width * 2, plan.height * 2)
    assert [len(row) for row in plan.cell_boxes] == [3, 3]
    (_, _, w0, h0), (_, _, w1, h1) = plan.cell_boxes[0][0], plan.cell_boxes[1][0]
    assert (w0, h0, w1, h1) == (120, 90, 120, 120)  # rows follow their pictures' aspect
    assert grid.file_stem == "grid_vit_vs_vit-reg4_layer4"


def test_a_shared_scale_shows_the_clean_model_dark_and_a_split_one_stretches_it():
    shared = _grid(shared=True)
    png, plan = grid_image.to_png(shared), grid_image.layout(shared)
    assert (_pixel(png, plan.cell_boxes[0][0], 1, 2, (3, 4)) == INFERNO[-1]).all()  # the outlier: top of the scale
    brightest_clean = _pixel(png, plan.cell_boxes[0][1], 2, 3, (3, 4))  # norm 20 on the shared 2.5..100
    assert abs(brightest_clean.astype(int) - INFERNO[round(17.5 / 97.5 * 255)]).max() <= 2
    split = _grid(shared=False)
    png, plan = grid_image.to_png(split), grid_image.layout(split)
    assert (_pixel(png, plan.cell_boxes[0][1], 2, 3, (3, 4)) == INFERNO[-1]).all()  # its own maximum


def test_svg_has_a_cell_image_per_map_vector_outlines_and_every_label():
    grid = _grid()
    root = ET.fromstring(grid_image.to_svg(grid))
    plan = grid_image.layout(grid)
    assert root.tag == f"{SVG}svg" and root.get("width") == str(plan.width)
    images = root.findall(f"{SVG}image")
    assert len(images) == 2 * 3 + 1  # cells, one shared colour bar
    assert all(i.get("href").startswith("data:image/png;base64,") for i in images)
    outlines = [r for r in root.findall(f"{SVG}rect") if r.get("stroke") == OUTLINE]
    assert len(outlines) == 2  # the first model's outlier in each image; the third model has no mask
    x, y, w, h = plan.cell_boxes[1][0]
    assert (float(outlines[1].get("x")), float(outlines[1].get("y"))) == (round(x + 2 * w / 4, 2), round(y + h / 4, 2))
    texts = " ".join(t.text for t in root.findall(f"{SVG}text"))
    assert all(label in texts for label in ["vit_reg4", "vit + ttr", "b.png", "norms at layer 4", "token norm"])
    assert len(ET.fromstring(grid_image.to_svg(_grid(shared=False))).findall(f"{SVG}image")) == 2 * 3 + 3


def test_nice_ticks_are_round_and_inside_the_range():
    assert grid_image.nice_ticks(1.7, 100, 5) == ([20, 40, 60, 80, 100], ["20", "40", "60", "80", "100"])
    values, labels = grid_image.nice_ticks(0.0031, 0.0038, 3)
    assert labels == ["0.0032", "0.0034", "0.0036", "0.0038"] and all(0.0031 <= v <= 0.0038 + 1e-12 for v in values)
    assert grid_image.nice_ticks(5, 20, 3)[1] == ["5", "10", "15", "20"]
    assert grid_image.nice_ticks(2.63, 101, 3)[1] == ["50", "100"]  # round values rather than the two ends
    assert grid_image.nice_ticks(10.2, 10.21, 3)[1] == ["10.200", "10.205", "10.210"]
    assert grid_image.nice_ticks(3, 3) == ([3], ["3"])


def test_model_headers_carry_the_models_colours_in_png_and_svg():
    import dataclasses

    import figures

    colours = figures.model_colours([figures.WITHOUT_REGISTERS, figures.WITH_REGISTERS, figures.TEST_TIME_REGISTER])
    grid = dataclasses.replace(_grid(), column_colours=colours)
    headers = {t.text: t.get("fill") for t in ET.fromstring(grid_image.to_svg(grid)).findall(f"{SVG}text")}
    assert [headers[label] for label in grid.column_labels] == colours and headers["b.png"] == "#111111"
    png = np.asarray(Image.open(io.BytesIO(grid_image.to_png(grid))).convert("RGB")).reshape(-1, 3)
    red = np.array(Image.new("RGB", (1, 1), colours[0]).getpixel((0, 0)))
    assert (png == red).all(axis=1).any()  # the first header's text, in the colour of "without registers"

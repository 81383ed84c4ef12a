"""Evidence figures: the maps side by side, shared histogram bins, LOST's box and seed on the picture."""
from __future__ import annotations

import numpy as np
from PIL import Image

from vitlens.analysis.lost import lost
from vitlens.analysis.redundancy import redundancy
from vitlens.discovery import Discovery
from vitlens.evidence_figures import BOX_COLOUR, SEED_COLOUR, draw_discovery, norm_and_similarity_figure, redundancy_figure


def test_norm_and_similarity_maps_mark_the_outliers_on_both():
    mask = np.zeros((3, 4), dtype=bool)
    mask[1, 2] = True
    fig = norm_and_similarity_figure(np.ones((3, 4)), np.zeros((3, 4)), mask, "x")
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    markers = [t for t in fig.data if t.type == "scatter"]
    assert len(heatmaps) == 2 and [(list(t.x), list(t.y)) for t in markers] == [([2], [1]), ([2], [1])]


def test_redundancy_histograms_share_their_bins():
    rng = np.random.default_rng(0)
    masks = [rng.uniform(size=(8, 8)) < 0.1 for _ in range(5)]
    fig = redundancy_figure(redundancy([rng.uniform(size=(8, 8)) for _ in range(5)], masks))
    assert len(fig.data) == 2 and fig.data[0].xbins == fig.data[1].xbins


def test_draw_discovery_puts_box_and_seed_where_found():
    features = np.tile(np.eye(4)[0], (6 * 8, 1))
    features.reshape(6, 8, 4)[1:3, 2:5] = np.eye(4)[1] - 0.3 * np.eye(4)[0]
    result = lost(features, (6, 8))
    found = Discovery(result=result, box=(20, 10, 50, 30), patch_size=10, scale=1.0)
    picture = np.asarray(draw_discovery(Image.new("RGB", (80, 60)), found))
    box = tuple(int(BOX_COLOUR[i:i + 2], 16) for i in (1, 3, 5))
    seed = tuple(int(SEED_COLOUR[i:i + 2], 16) for i in (1, 3, 5))
    row, col = result.seed
    assert tuple(picture[10, 35]) == box and tuple(picture[29, 35]) == box  # top and bottom edges of the box
    assert tuple(picture[row * 10, col * 10 + 5]) == seed

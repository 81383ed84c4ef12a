"""PCA / UMAP of one layer's tokens: planted outliers separate, and every point knows its cell."""
import numpy as np
import pytest

from app_fixtures import synthetic_trace
from vitlens.analysis.embedding import token_embedding
from vitlens.errors import OptionError

PLANTED = {2: [(0, 1), (2, 3)]}


def _traces():
    return [synthetic_trace(outliers=PLANTED, seed=0), synthetic_trace(outliers={2: [(1, 1)]}, seed=1)]


def test_pca_points_know_image_cell_and_norm():
    traces = _traces()
    result = token_embedding(traces, layer=2)
    assert result.coords.shape == (24, 2) and result.num_points == 24
    assert result.prefix_coords.shape == (6, 2)
    assert result.prefix_names == ["cls", "reg0", "reg1"] * 2
    assert result.prefix_image.tolist() == [0, 0, 0, 1, 1, 1]
    for point in range(result.num_points):
        trace = traces[result.image[point]]
        assert result.norm[point] == pytest.approx(trace.patch_norms()[2][result.row[point], result.col[point]])
    cells = {(int(i), int(r), int(c)) for i, r, c in zip(result.image, result.row, result.col)}
    assert len(cells) == 24
    outliers = {(int(i), int(r), int(c)) for i, r, c, o in zip(result.image, result.row, result.col, result.outlier) if o}
    assert outliers == {(0, 0, 1), (0, 2, 3), (1, 1, 1)}
    assert result.explained is not None and result.explained[0] > 0.5


def test_pca_separates_planted_outliers_on_the_first_axis():
    result = token_embedding(_traces(), layer=2, include_prefix=False)
    first = result.coords[:, 0]
    out, normal = first[result.outlier], first[~result.outlier]
    assert out.min() > normal.max() or out.max() < normal.min()
    assert result.prefix_coords.shape == (0, 2) and result.prefix_names == []


def test_fixed_threshold_and_layer_without_outliers():
    result = token_embedding(_traces(), layer=0, threshold=50.0)
    assert not result.outlier.any()
    everything = token_embedding(_traces(), layer=2, threshold=5.0)
    assert everything.outlier.all()


def test_missing_states_and_bad_method_are_option_errors():
    trace = synthetic_trace()
    bare = type(trace)(layout=trace.layout, input_size=trace.input_size, norms=trace.norms, final_norms=trace.final_norms,
                       attention=trace.attention, neighbor_similarity=trace.neighbor_similarity, states={})
    with pytest.raises(OptionError, match="not captured"):
        token_embedding([bare], layer=1)
    with pytest.raises(OptionError, match="method"):
        token_embedding([trace], layer=1, method="tsne")
    with pytest.raises(OptionError, match="at least one image"):
        token_embedding([], layer=1)
    with pytest.raises(OptionError, match="one model"):
        token_embedding([trace, synthetic_trace(width=6)], layer=1)


def test_umap_needs_enough_points():
    with pytest.raises(OptionError, match="UMAP needs"):
        token_embedding([synthetic_trace(grid=(1, 2), num_registers=0)], layer=0, method="umap")


@pytest.mark.slow
def test_umap_keeps_planted_outliers_together():
    traces = [synthetic_trace(grid=(6, 6), outliers={1: [(0, 0), (3, 3), (5, 1)]}, seed=seed) for seed in range(3)]
    result = token_embedding(traces, layer=1, method="umap", include_prefix=False)
    assert result.coords.shape == (108, 2) and np.isfinite(result.coords).all()
    out, normal = result.coords[result.outlier], result.coords[~result.outlier]
    spread = np.linalg.norm(normal - normal.mean(axis=0), axis=1).mean()
    assert np.linalg.norm(out.mean(axis=0) - normal.mean(axis=0)) > spread


def test_normalized_pca_compares_directions_where_raw_pca_sorts_by_norm():
    """Patch tokens along one direction with norms from 1 to 30, two along another with norm 10: raw PCA's
    first axis follows the norm; on unit vectors the first axis splits the two directions and the rest collapse."""
    from dataclasses import replace

    trace = synthetic_trace(grid=(3, 4), num_registers=0, num_layers=1)
    tokens = trace.layout.num_tokens
    vectors = np.zeros((tokens, 8), dtype=np.float32)
    vectors[:, 0] = np.linspace(1, 30, tokens)
    other = [trace.layout.num_prefix + 5, trace.layout.num_prefix + 6]
    vectors[other] = 0.0
    vectors[other, 1] = 10.0
    trace = replace(trace, states={0: vectors.astype(np.float16)})
    raw = token_embedding([trace], layer=0, include_prefix=False)
    unit = token_embedding([trace], layer=0, include_prefix=False, normalize=True)
    same = np.ones(raw.num_points, dtype=bool)
    same[[5, 6]] = False
    assert abs(np.corrcoef(raw.coords[same, 0], vectors[trace.layout.patches][same, 0])[0, 1]) > 0.99
    assert unit.normalized and not raw.normalized
    assert np.ptp(unit.coords[same, 0]) < 1e-3 and abs(unit.coords[~same, 0].mean() - unit.coords[same, 0].mean()) > 0.5

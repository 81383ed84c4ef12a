"""Token embedding: PCA or UMAP of one layer's tokens over the chosen images, every model side by side, outliers coloured."""
import itertools

import streamlit as st

import data
import figures
import image_data
import ui

st.title("Token embedding")
st.caption("Each point is a token of the chosen layer in one of the chosen images (with several images, colour and "
           "symbol tell the image; outliers are red), one plot per model. Outliers carry global information and gather "
           "away from the local patch tokens, near CLS; registers take their place. On raw vectors PCA mostly sorts "
           "tokens by norm; with unit-length tokens (cosine) only their directions count.")
request = ui.page_request()
result = ui.fetch(data.captured, request)
ui.notes(result)

st.session_state.setdefault("embed_method", "pca")
st.session_state.setdefault("embed_normalize", False)
controls = st.columns([4, 3, 3])
with controls[0]:
    layer = ui.layer_slider(result.num_layers)
with controls[1]:
    method = st.radio("Method", ["pca", "umap"], key="embed_method", horizontal=True,
                      format_func=lambda m: "PCA (instant)" if m == "pca" else "UMAP (seconds)")
with controls[2]:
    normalize = st.toggle("Unit-length tokens (cosine)", key="embed_normalize",
                          help="Scale every token vector to norm 1 before PCA/UMAP (UMAP then uses the cosine metric, "
                               "else the Euclidean one), so that where a token lands depends on its direction, not its norm.")


def pick(key: str, model: int) -> None:
    """Remember the last clicked patch point (model, image, row, col) of any plot."""
    points = [p for p in st.session_state[key].selection.get("points", []) if len(p.get("customdata") or []) == 5]
    if points:
        st.session_state["picked_point"] = (model, *(int(v) for v in points[0]["customdata"][:3]))


def draw(views: image_data.EmbeddingViews, suffix: str, note: str = "") -> None:
    """One plot per model, side by side."""
    picked = st.session_state.get("picked_point")
    width = ui.MAIN_WIDTH // len(views.views) - 16
    for index, (column, view) in enumerate(zip(st.columns(len(views.views)), views.views)):
        fig = figures.embedding_figure(view.embedding, view.image_names, highlight=picked and picked[1:], width=width,
                                       title=f"{view.label}<br><sup>{view.weights} · layer {layer}{note}</sup>",
                                       title_colour=view.colour)
        with column:
            key = f"embedding-{index}-{suffix}"
            ui.chart(fig, key=key, on_select=lambda key=key, index=index: pick(key, index), selection_mode="points")


slot = st.empty()  # the one plot area: waiting, the PCA while UMAP runs, then the result replace each other
threshold = ui.threshold()
waits = itertools.count()  # one run may wait for each model's UMAP in turn: each wait draws the PCA afresh
pca = ui.fetch(image_data.embeddings, request, layer, "pca", threshold, normalize, area=slot)
views = pca if method == "pca" else ui.fetch(image_data.embeddings, request, layer, "umap", threshold, normalize, area=slot,
                                             while_waiting=lambda: draw(pca, f"waiting-{next(waits)}", " · PCA while UMAP runs"))
with slot.container():
    draw(views, method, " · unit-length tokens" if normalize else "")
detail = ui.fetch(image_data.picked_cell, request, layer, threshold, st.session_state.get("picked_point"))
if detail is not None:
    with st.columns(2)[0]:
        ui.chart(figures.overlay_figure(detail, 0.5, width=ui.MAIN_WIDTH // 2 - 16, stretch=True), key="embedding-cell")
else:
    st.caption("Hover a point to see its image and cell; click it to show the cell on its image (and ring it in every plot).")
ui.download_table(views.table, f"embedding_{method}{'_unit' if normalize else ''}_layer{layer}.csv")

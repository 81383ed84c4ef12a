"""Token embedding: PCA or UMAP of one layer's tokens over the chosen images, outliers coloured."""
import numpy as np
import streamlit as st

import data
import figures
import image_data
import ui

st.title("Token embedding")
st.caption("Each point is a token of the chosen layer in one of the chosen images (with several images, colour and "
           "symbol tell the image; outliers are red). Outliers carry global information and gather away from the "
           "local patch tokens, near CLS; registers take their place.")
request = ui.page_request()
result = ui.fetch(data.captured, request)
ui.notes(result)

st.session_state.setdefault("embed_method", "pca")
controls = st.columns([4, 2, 3])
with controls[0]:
    layer = ui.layer_slider(result.num_layers)
with controls[1]:
    method = st.radio("Method", ["pca", "umap"], key="embed_method", horizontal=True,
                      format_func=lambda m: "PCA (instant)" if m == "pca" else "UMAP (seconds)")
with controls[2]:
    labels = [run.label for run in result.runs]
    if st.session_state.get("embed_model") not in range(len(labels)):
        st.session_state["embed_model"] = 0
    model_index = st.radio("Model", range(len(labels)), format_func=labels.__getitem__, key="embed_model")


def draw(view: image_data.EmbeddingView, key: str, note: str = "") -> object:
    selected = st.session_state.get("picked_point")
    fig = figures.embedding_figure(view.embedding, view.image_names, title=f"{view.label}, layer {layer}{note}",
                                   highlight=selected)
    return ui.chart(fig, key=key, on_select="rerun", selection_mode="points")


pca = ui.fetch(image_data.embedding, request, layer, "pca", ui.threshold(), model_index)
if method == "pca":
    view = pca
else:
    view = ui.fetch(image_data.embedding, request, layer, "umap", ui.threshold(), model_index,
                    while_waiting=lambda: draw(pca, "embedding-waiting", " (PCA while UMAP runs)"))
event = draw(view, f"embedding-{method}")
points = [p for p in (event.selection.get("points", []) if event else []) if len(p.get("customdata") or []) == 5]
if points:
    image_index, row, col = (int(v) for v in points[0]["customdata"][:3])
    st.session_state["picked_point"] = (image_index, row, col)
    ref = view.image_refs[image_index]
    norm_maps = ui.fetch(image_data.norm_maps, request, ref, layer, False, ui.threshold())
    overlay = norm_maps.overlays[model_index]
    mask = np.zeros_like(overlay.mask)
    mask[row, col] = True
    detail = figures.Overlay(title=f"{data.image_name(ref)}: row {row}, col {col} (layer {layer})", values=overlay.values,
                             image=overlay.image, mask=mask, colorbar=overlay.colorbar)
    with st.columns(2)[0]:
        ui.chart(figures.overlay_figure(detail, 0.5, width=ui.MAIN_WIDTH // 2 - 16), key="embedding-cell")
else:
    st.caption("Hover a point to see its image and cell; click it to show the cell on its image.")
ui.download_table(view.table, f"embedding_{method}_layer{layer}.csv")

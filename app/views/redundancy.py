"""Neighbour redundancy (paper Fig. 5a): outliers sit where neighbouring patches look alike."""
import streamlit as st

import data
import evidence_data
import figures
import ui
from vitlens.evidence_figures import redundancy_figure

st.title("Neighbour redundancy")
st.caption("Right: the cosine similarity of each patch embedding (before position embeddings) to its 4 neighbours; "
           "left: the token norms. In the paper (Fig. 5a, DINOv2 ViT-g) outlier tokens appear where that similarity "
           "is high: uniform background the model can spare.")
request = ui.page_request()
result = ui.fetch(data.captured, request)
ui.notes(result)

controls = st.columns([4, 3])
with controls[0]:
    layer = ui.layer_slider(result.num_layers, "Outliers from layer (block index, 0-based)")
with controls[1]:
    ref = ui.image_picker(request)

view = ui.fetch(evidence_data.redundancy_view, request, ref, layer, ui.threshold())
for index, (norms, similarity) in enumerate(view.overlays):
    columns = st.columns(2)
    with columns[0]:
        ui.chart(figures.overlay_figure(norms, 0.6, width=440, stretch=True), key=f"redundancy-norms-{index}")
    with columns[1]:
        ui.chart(figures.overlay_figure(similarity, 0.6, width=440, stretch=True), key=f"redundancy-similarity-{index}")
st.subheader(f"Outlier vs normal cells over {len(request.images)} images")
for index, (label, found) in enumerate(view.results):
    auroc = "n/a (no outliers at this layer)" if found.auroc is None else f"{found.auroc:.3f}"
    ui.chart(redundancy_figure(found, title=f"{label}: AUROC {auroc}"), key=f"redundancy-distributions-{index}")
st.caption("AUROC: the chance that a random outlier cell is more similar to its neighbours than a random normal cell "
           "(0.5: no relation). Paper reference: the outlier distribution lies clearly to the right (Fig. 5a). "
           "For many images use `python -m vitlens redundancy FOLDER --model M --weights W`.")
ui.download_table(view.table, f"redundancy_layer{layer}.csv")

folders = data.settings().results_folders()
if folders:
    st.subheader("Over a results folder")
    name = st.selectbox("Results folder (a sweep)", ["(none)", *folders], key="redundancy_results",
                        help="Inside VITLENS_RESULTS_DIR; outliers from the layer above")
    if name != "(none)":
        for index, (label, found) in enumerate(ui.fetch(evidence_data.results_redundancy_view, name, layer)):
            auroc = "n/a (no outliers at this layer)" if found.auroc is None else f"{found.auroc:.3f}"
            ui.chart(redundancy_figure(found, title=f"{label}, {found.num_images} images: AUROC {auroc}"),
                     key=f"redundancy-results-{index}")

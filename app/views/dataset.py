"""Dataset: norm histogram, outlier share per layer, where outliers sit on the grid, and the images with most outliers."""
import streamlit as st

import population_data
import population_figures
import population_ui
import ui

st.title("Dataset")
st.caption("Every image of a sweep: the patch-token norm histogram (a separate high mode holds the artifacts, "
           "about 2% of tokens in DINOv2 ViT-g), the outlier share per layer, where outliers sit on the patch grid "
           "(striped without antialiasing, at the borders with it), and the images with most outliers.")
name = population_ui.results_sidebar()
pairs = ui.fetch(population_data.series_in, name)
controls = st.columns([4, 4, 3])
with controls[0]:
    if st.session_state.get("dataset_series") not in range(len(pairs)):
        st.session_state["dataset_series"] = len(pairs) - 1
    index = st.selectbox("Model and weights", range(len(pairs)), key="dataset_series",
                         format_func=lambda i: f"{pairs[i].model} · {pairs[i].label} ({pairs[i].images} images)")
depth = pairs[index].num_layers
with controls[1]:
    st.session_state["dataset_layers"] = [l for l in st.session_state.get("dataset_layers", population_data.layer_default(depth)) if l < depth]
    layers = st.multiselect("Layers pooled (histogram, grid, gallery)", range(depth), key="dataset_layers") or [depth - 1]
with controls[2]:
    others = [""] + [f for f in population_data.results_folders() if f != name]
    other = st.selectbox("Compare with", others, key="compare_folder", format_func=lambda f: f or "(nothing)")

view = ui.fetch(population_data.dataset, name, index, layers, other or None)
for column, (label, summary) in zip(st.columns(len(view.summaries)), view.summaries):
    column.metric(label, f"{summary.overall_share:.2%} outliers", f"of {summary.norms.total} patch tokens",
                  delta_color="off", delta_arrow="off")
st.subheader("Norm histogram")
log_y = st.toggle("Log-scale counts", value=True, key="dataset_log_y")
ui.chart(population_figures.norm_counts_figure([(l, s.norms) for l, s in view.summaries], log_y=log_y, roles=view.roles),
         key="dataset-hist")
st.subheader("Outlier share per layer")
ui.chart(population_figures.layer_share_figure([(l, s.share) for l, s in view.summaries], roles=view.roles),
         key="dataset-share")
st.subheader("Where outliers sit on the grid")
ui.chart(population_figures.cell_frequency_figure([(l, s.cells) for l, s in view.summaries]), key="dataset-grid")
skipped = view.chosen.cells.rows_skipped
if skipped:
    st.caption(f"{skipped} image x layer rows of other grid shapes (other aspect ratios) are not in the map.")
st.subheader("Images with most outliers")
top = view.chosen.top
if view.missing_images:
    st.caption(view.missing_images)
for column, item in zip(st.columns(6) * 2, top):
    if item.image in view.thumbnails:
        column.image(view.thumbnails[item.image])
    column.caption(f"{item.image}: {item.num_outliers} outliers ({item.share:.1%})")
ui.download_table(view.table, f"dataset_{name}.csv")

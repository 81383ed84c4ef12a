"""Training: outliers across the checkpoints of a training run, from a sweep results folder."""
import streamlit as st

import population_data
import population_figures
import population_ui
import ui

st.title("Training")
st.caption("Outlier share of patch tokens for every checkpoint (rows, by step) and layer, over all images of the "
           "sweep. In DINOv2 the artifacts appear after about a third of training, in the middle layers, and stay.")
name = population_ui.results_sidebar()
models = ui.fetch(population_data.models_in, name)
if st.session_state.get("training_model") not in models:
    st.session_state["training_model"] = models[0]
model = st.selectbox("Model", models, key="training_model") if len(models) > 1 else models[0]
view = ui.fetch(population_data.training, name, model)
series = view.series

first = series.first_checkpoint
if first is None:
    st.markdown(f"**No outliers** in any of the {len(series.checkpoints)} checkpoints.")
else:
    st.markdown(f"First checkpoint with outliers: **{series.checkpoints[first].label}** (from layer {series.first_layer}), "
                f"checkpoint {first + 1} of {len(series.checkpoints)}.")
ui.chart(population_figures.training_heatmap(series), key="training-heatmap", on_select=population_ui.pick_cell,
         selection_mode="points")

depth = series.share.shape[1]
st.session_state["training_layers"] = [l for l in st.session_state.get("training_layers", population_data.layer_default(depth)) if l < depth]
layers = st.multiselect("Layers to follow across training", range(depth), key="training_layers")
if layers:
    ui.chart(population_figures.training_lines(series, layers), key="training-lines")

st.subheader("Open a checkpoint on one image")
st.caption("Click a cell of the heat map (or choose below) to pick a checkpoint and layer, then an image.")
columns = st.columns([3, 3, 4])
labels = [checkpoint.label for checkpoint in series.checkpoints]  # option labels never change with the data: widgets keep them
with columns[0]:
    if st.session_state.get("training_checkpoint") not in labels:
        st.session_state["training_checkpoint"] = labels[first or 0]
    checkpoint = labels.index(st.selectbox("Checkpoint", labels, key="training_checkpoint"))
with columns[1]:
    st.session_state["training_layer"] = min(st.session_state.get("training_layer", series.first_layer or 0), depth - 1)
    layer = st.selectbox("Layer", range(depth), key="training_layer")
with columns[2]:
    images = ui.fetch(population_data.images_at, name, model, checkpoint, layer)
    image = st.selectbox("Image (most outliers first)", [i.image for i in images], key="training_image")
    st.caption(f"{next(i.num_outliers for i in images if i.image == image)} outliers at this checkpoint and layer")
st.button("Open in the per-image views", on_click=population_ui.open_checkpoint, args=(name, model, checkpoint, layer, image))
population_ui.follow_link()
ui.download_table(view.table, f"training_{name}.csv")

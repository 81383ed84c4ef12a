"""Models: outlier share per layer against relative depth, for each model of a size series."""
import streamlit as st

import population_data
import population_figures
import population_ui
import ui

st.title("Models")
st.caption("Outlier share of patch tokens per layer, against relative depth, for each model of the sweep (its last "
           "checkpoint). Artifacts appear in large enough models (ViT-L and up in DINOv2); with registers they go.")
name = population_ui.results_sidebar()
view = ui.fetch(population_data.models, name)
columns = st.columns(min(4, len(view.profiles)))
for index, profile in enumerate(view.profiles):
    columns[index % len(columns)].metric(profile.series.model, f"{profile.max_share:.2%}", f"{profile.series.num_layers} blocks, "
                                         f"{profile.series.num_registers} registers", delta_color="off", delta_arrow="off")
ui.chart(population_figures.depth_figure(view.profiles), key="models-depth")
st.caption("Each metric is the largest outlier share of any layer of the model.")
ui.download_table(view.table, f"models_{name}.csv")

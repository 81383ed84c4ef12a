"""Comparison grid: every chosen image (rows) by every model (columns) at one layer, as one figure to download."""
import streamlit as st

import data
import grid_image
import image_data
import ui

st.title("Comparison grid")
st.caption("Rows are the chosen images, columns the models (without registers, with registers, and with a test-time "
           "register when one is on), at one layer, outliers outlined: the figure as a paper would print it. "
           "The downloads hold exactly this grid.")
request = ui.page_request()
result = ui.fetch(data.captured, request)
ui.notes(result)

st.session_state.setdefault("opacity", 0.6)
st.session_state.setdefault("norm_scale_shared", True)
st.session_state.setdefault("grid_cell", 240)
controls = st.columns([4, 3, 3, 3])
with controls[0]:
    layer = ui.layer_slider(result.num_layers)
with controls[1]:
    opacity = st.slider("Heat-map opacity", 0.0, 1.0, step=0.05, key="opacity")
with controls[2]:
    cell = st.select_slider("Cell width (px)", grid_image.GRID_CELLS, key="grid_cell")
with controls[3]:
    shared = st.toggle("One colour scale for all models", key="norm_scale_shared",
                       help="On: the same colour means the same norm in every cell. Off: one scale per model (column).")

grid = ui.fetch(image_data.comparison_grid, request, layer, ui.threshold(), shared, cell, opacity)
png = image_data.comparison_grid_png(request, layer, ui.threshold(), shared, cell, opacity)
st.image(png, width=grid_image.layout(grid).width)  # drawn at twice that: sharp on high-density screens
downloads = st.columns(4)
with downloads[0]:
    st.download_button("Grid (PNG)", png, file_name=f"{grid.file_stem}.png", mime="image/png",
                       on_click="ignore", key="dl-grid-png", type="primary")
with downloads[1]:
    st.download_button("Grid (SVG)", lambda: grid_image.to_svg(grid), file_name=f"{grid.file_stem}.svg",
                       mime="image/svg+xml", on_click="ignore", key="dl-grid-svg")

"""Norm maps: each patch token's norm at one layer over the image, outliers outlined, models side by side."""
import streamlit as st

import data
import figures
import image_data
import ui

st.title("Norm maps")
st.caption("Each cell is one patch token; its colour is the token's L2 norm after the chosen block. High-norm "
           "outliers (outlined) are the artifact tokens; the model with registers should have none.")
request = ui.page_request()
result = ui.fetch(data.captured, request)
ui.notes(result)

st.session_state.setdefault("opacity", 0.6)
st.session_state.setdefault("post_norm", False)
st.session_state.setdefault("norm_scale_shared", True)
controls = st.columns([4, 3, 3, 3])
with controls[0]:
    layer = ui.layer_slider(result.num_layers)
with controls[1]:
    post_norm = ui.post_norm_toggle(result, "After the final norm",
                                    help="Off (pre-final-norm): the residual stream after the block, where outliers live. "
                                         "On (post-final-norm): the model's normalised output, where they no longer stand out.")
with controls[2]:
    opacity = st.slider("Heat-map opacity", 0.0, 1.0, step=0.05, key="opacity")
with controls[3]:
    ref = ui.image_picker(request)

threshold = ui.threshold()
maps = ui.fetch(image_data.norm_maps, request, ref, layer, post_norm, threshold)
shared = len(maps.overlays) > 1 and st.toggle(
    "One colour scale for all models", key="norm_scale_shared",
    help="On: the same colour means the same norm in every map, so the models compare at a glance. "
         "Off: each map runs from its own lowest to its highest norm.")
scale = figures.shared_range(maps.overlays) if shared else None
ui.map_columns(maps.overlays, opacity, scale, key="norm-map", per_row=len(maps.overlays))
if post_norm:
    st.info("After the final LayerNorm every token has a similar norm, so the outliers hide: this is why reading "
            "`get_intermediate_layers(norm=True)` shows no artifacts. The layer slider does not apply here.")

downloads = st.columns(3)
with downloads[0]:
    ui.download_table(maps.table, f"norm_map_{data.image_name(ref)}_{'post' if post_norm else f'layer{layer}'}.csv")
with downloads[1]:
    ui.download_npz(lambda: image_data.trace_npz(request, threshold), "vitlens_traces.npz", "All captured arrays (NPZ)")

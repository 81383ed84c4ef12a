"""Norm histogram: patch-token norms of the chosen layers and images, with the outlier threshold."""
import streamlit as st

import data
import figures
import image_data
import ui


def _pick_threshold() -> None:
    """A click on a bar (or a box) moves the threshold to the bar's lower edge."""
    edge = ui.threshold_from_selection(st.session_state["histogram"].selection)
    if edge is not None:
        st.session_state["threshold_auto"] = False
        st.session_state["threshold_value"] = edge


st.title("Norm histogram")
st.caption("Patch-token norms pooled over the chosen images. Models with artifacts show a second, high mode "
           "(a few % of tokens with about 10x the norm); with registers it disappears.")
request = ui.page_request()
result = ui.fetch(data.captured, request)
ui.notes(result)

st.session_state.setdefault("log_y", True)
controls = st.columns([4, 3])
with controls[0]:
    layer = ui.layer_slider(result.num_layers)
with controls[1]:
    others = [l for l in range(result.num_layers) if l != layer]
    st.session_state["extra_layers"] = [l for l in st.session_state.get("extra_layers", []) if l in others]
    extra = st.multiselect("Pool more layers", others, key="extra_layers")
with st.container(horizontal=True, gap="large"):  # switches as wide as their labels, never cut
    post_norm = ui.post_norm_toggle(result, "Post-norm", help="The norms after the model's final norm (auto threshold "
                                                              "only); off: before it, where the outliers stand out.")
    log_y = st.toggle("Log counts", key="log_y", help="Token counts on a log scale, so the few outliers' bars show.")
    per_image = st.toggle("Per-image threshold", key="per_image_threshold",
                          help="Each image's own auto threshold (per layer) instead of one for the pooled norms.")
layers = sorted({layer, *extra})

view = ui.fetch(image_data.histogram, request, layers, post_norm, ui.threshold(), per_image)
for column, hist in zip(st.columns(len(view.histograms)), view.histograms):
    column.metric(hist.label, f"{hist.count} outliers", f"{hist.fraction:.2%} of {hist.norms.size} tokens",
                  delta_color="off", delta_arrow="off")
ui.chart(figures.histogram_figure(view.histograms, log_y=log_y, post_norm=post_norm), key="histogram",
         on_select=_pick_threshold, selection_mode=("points", "box"))
if post_norm:
    where = "after the final norm (auto threshold only)"
elif len(layers) == 1:
    where = f"at layer {layers[0]}"
else:
    where = f"pooled over layers {', '.join(map(str, layers[:-1]))} and {layers[-1]}"
pooled = "each image's own norms" if per_image else "the pooled norms"
mode = f"auto (a high mode of {pooled}, tested against the bulk's own tail)" if ui.threshold() is None or post_norm else f"fixed at {ui.threshold():g}"
st.caption(f"Patch-token norms {where}; threshold {mode}. Each model's bars are translucent with an outline of "
           "its colour. Click a bar to move the threshold to its lower edge, or edit it in the sidebar.")
for hist in view.histograms:
    st.caption(f"**{hist.label}**: {hist.reason}")

downloads = st.columns(3)
with downloads[0]:
    ui.download_table(view.table, "histogram_summary.csv", "Summary (CSV)")
with downloads[1]:
    ui.download_table(lambda: image_data.histogram_values(request, layers, post_norm), "histogram_norms.csv", "All norms (CSV)")

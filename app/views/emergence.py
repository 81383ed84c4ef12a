"""Layer emergence: per layer, how many outliers there are and how large the norms get."""
import streamlit as st

import data
import figures
import image_data
import ui

st.title("Layer emergence")
st.caption("Outliers appear in the middle layers of large models and stay to the last block. Top: outlier share "
           "of patch tokens per layer; bottom (log scale): max and median patch-token norm beside the CLS norm and "
           "the mean register norm. Colour is the model, line style the statistic (legend).")
request = ui.page_request()
result = ui.fetch(data.captured, request)
ui.notes(result)

options = ["all"] + list(request.images)
if st.session_state.get("emergence_scope") not in options:
    st.session_state["emergence_scope"] = "all"
scope = st.selectbox("Images", options, key="emergence_scope",
                     format_func=lambda ref: f"all {len(request.images)} selected images" if ref == "all" else data.image_label(ref))

view = ui.fetch(image_data.emergence, request, None if scope == "all" else scope, ui.threshold())
for column, curve in zip(st.columns(len(view.curves)), view.curves):
    if curve.first_layer is None:
        column.markdown(f"**{curve.label}**  \nno outliers in any layer")
    else:
        column.markdown(f"**{curve.label}**  \nfirst outliers at **layer {curve.first_layer}** "
                        f"(at most {int(curve.count.max())} tokens in a layer)")
ui.chart(figures.emergence_figure(view.curves), key="emergence")
ui.download_table(view.table, "emergence.csv")

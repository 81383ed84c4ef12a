"""Object discovery with LOST (paper Table 3): the seed patch and the box on each model's attention keys."""
import pandas as pd
import streamlit as st

import data
import evidence_data
import ui
from vitlens.discovery import REFERENCE_CORLOC

st.title("Object discovery (LOST)")
st.caption("LOST takes the patch with the fewest positive key similarities as the seed (pink), grows it to the "
           "low-degree patches that correlate with it, and boxes the seed's connected region (cyan). Artifact "
           "tokens spoil it: in the paper corLoc on VOC2007 drops from 61.9 (DINO) to 35.3 (DINOv2) and recovers "
           "to 55.4 with registers.")
request = ui.page_request()
result = ui.fetch(data.captured, request)
ui.notes(result)

controls = st.columns([3, 2, 2, 3])
with controls[0]:
    layer = st.slider("Features of layer", 0, result.num_layers - 1, result.num_layers - 1, key="lost_layer")
with controls[1]:
    features = st.radio("Features", ["k", "q", "v"], horizontal=True, key="lost_features",
                        help="keys (LOST's default), queries or values of that block's attention")
with controls[2]:
    k = st.number_input("k (seed expansion)", 1, 10_000, 100, key="lost_k")
with controls[3]:
    ref = ui.image_picker(request)

view = ui.fetch(evidence_data.lost_view, request, ref, layer, features, int(k))
for column, (label, picture, found) in zip(st.columns(len(view.pictures)), view.pictures):
    column.image(picture, caption=f"{label}: box {list(found.box)}, seed {list(found.result.seed)}")
st.subheader("Reference corLoc (VOC2007, paper Table 3)")
st.dataframe(pd.DataFrame({"model": list(REFERENCE_CORLOC), "corLoc": list(REFERENCE_CORLOC.values())}), hide_index=True)
st.caption("Your corLoc on a Pascal-VOC-style folder (JPEGImages/ + Annotations/): "
           "`python -m vitlens lost --voc DIR --model M --weights W --json`.")
ui.download_table(view.table, f"lost_{data.image_name(ref)}.csv")

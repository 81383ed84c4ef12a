"""Linear probes (paper Table 1): outlier tokens lose local information (position, pixels) and hold global information."""
import pandas as pd
import streamlit as st

import data
import evidence_data
import ui
from vitlens.evidence import REFERENCES

st.title("Linear probes")
st.caption("Ridge probes on the patch tokens of one layer, trained on some of the sidebar's images and scored on the "
           "others (split by image), separately for outlier and normal tokens. Few images give rough numbers; the "
           "CLI runs them on a whole folder.")
request = ui.page_request()
result = ui.fetch(data.captured, request)
ui.notes(result)
layer = ui.layer_slider(result.num_layers)

views = ui.fetch(evidence_data.local_probe_view, request, layer, ui.threshold())
rows = [{"model": label, "tokens": group, "test tokens": score.count, "position top-1": score.position_accuracy,
         "distance (patches)": score.position_distance, "pixel MSE (normalised)": score.pixel_error,
         "paper top-1": REFERENCES["position_accuracy"][group], "paper distance": REFERENCES["position_distance"][group],
         "paper L2 error": REFERENCES["pixel_error"][group]}
        for label, found in views for group, score in (("normal", found.normal), ("outlier", found.outlier))]
st.dataframe(pd.DataFrame(rows), hide_index=True)
if any(found.outlier.count == 0 for _, found in views):
    st.info("No outlier token among the test images of at least one model at this layer: only normal tokens are scored.")
st.caption(f"Train / test images: {', '.join(f'{l}: {f.num_train_images} / {f.num_test_images}' for l, f in views)}. "
           "Paper (Table 1, left, DINOv2 ViT-g): normal tokens 41.7% top-1 position, outliers 22.8%; "
           "pixel reconstruction error 18.38 vs 25.23 (their scale).")

st.subheader("Global information (Table 1, right)")
st.caption("Logistic regression from the CLS token, one random normal patch and one random outlier patch per image "
           "(outliers from the layer above) to the image's class, on a labelled image folder of this deployment "
           "(one subfolder per class), split by image. For any folder: "
           "`python -m vitlens global-probes FOLDER --model M --weights W`.")
datasets = data.settings().dataset_folders()
if not datasets:
    st.info("Labelled image folders need VITLENS_DATASETS_DIR (a folder of image folders, one subfolder per class).")
    st.stop()
dataset = st.selectbox("Labelled image folder", datasets, key="global_dataset", help="Inside VITLENS_DATASETS_DIR")
if st.button("Run global probes", key="global_run"):
    st.session_state["global_wanted"] = True
if st.session_state.get("global_wanted"):
    runs = ui.fetch(evidence_data.global_probe_view, request, dataset, layer, ui.threshold())
    st.dataframe(pd.DataFrame(evidence_data.global_probe_rows(runs, REFERENCES["global_accuracy_imagenet"])),
                 hide_index=True)
    for label, run in runs:
        for kind, score in run.result.scores.items():
            if score.reason:
                st.info(f"{label}, {kind}: {score.reason}")

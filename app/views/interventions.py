"""Interventions: find the register neurons (Jiang et al. 2025) and run the model with a test-time register."""
import json

import streamlit as st

import data
import figures
import intervention_data
import ui
from vitlens.analysis.neurons import RegisterNeurons, default_detector_layer, parse_neurons
from vitlens.interventions import PATCH_VALUES, REGISTER_INITS, TestTimeRegister


def _use(neurons: RegisterNeurons) -> None:
    st.session_state["register_neurons"] = neurons
    st.session_state["test_time_register"] = True


def _on_upload() -> None:
    upload = st.session_state.get("neuron_upload")
    st.session_state["neuron_upload_error"] = None
    if upload is None:
        return
    try:
        neurons = parse_neurons(json.loads(upload.getvalue().decode("utf-8")), f"'{upload.name}'")
        neurons.check_model(ui.model_name())
        _use(neurons)
    except (UnicodeDecodeError, json.JSONDecodeError):
        st.session_state["neuron_upload_error"] = f"'{upload.name}' is not valid JSON."
    except data.VitlensError as error:
        st.session_state["neuron_upload_error"] = str(error)


st.title("Interventions: register neurons and test-time registers")
st.caption("A few MLP neurons write the high-norm outliers. Each neuron (an input of a block's mlp.fc2) is scored by "
           "its mean |activation| at the outlier tokens of the detector layer, over the chosen images; the best ones, "
           "moved onto one extra token, remove the artifacts without retraining (Jiang et al. 2025).")
request = ui.page_request()
result = ui.fetch(data.captured, request)
num_layers, choice = result.num_layers, request.models[0]
state = st.session_state
state.setdefault("neuron_detector", default_detector_layer(num_layers))
state.setdefault("neuron_top", 10)
controls = st.columns([3, 3, 2, 2, 3])
detector = controls[0].slider("Detector layer", 0, num_layers - 1, key="neuron_detector",
                              help="Outliers of this block (sidebar threshold) mark the tokens neurons are scored at.")
state["neuron_max_layer"] = min(state.get("neuron_max_layer", detector), num_layers - 1)
max_layer = controls[1].slider("Max layer", 0, num_layers - 1, key="neuron_max_layer", help="Rank neurons of blocks 0 to this.")
top = int(controls[2].number_input("Top K", 1, 1000, key="neuron_top"))
sparse = controls[3].toggle("Sparse only", key="neuron_sparse", help="Keep neurons below 0.5 on at least half the tokens.")
with controls[4]:
    ref = ui.image_picker(request)

scores = ui.fetch(intervention_data.neuron_scores, request, detector, ui.threshold(), sparse)
if scores.images_with_outliers == 0:
    st.warning(f"No image has outliers at layer {detector}: lower the threshold in the sidebar or choose another detector layer.")
    st.stop()
picked = scores.top(top, max_layer)
neurons = RegisterNeurons(model=choice.name, weights=choice.weights, neurons=tuple(picked))
st.caption(f"`{choice.name}`: outliers at layer {detector} in {scores.images_with_outliers} of {scores.num_images} images; "
           f"{len(picked)} neurons picked from blocks 0-{max_layer}.")
left, right = st.columns(2)
with left:
    ui.chart(figures.neuron_counts_figure([n.layer for n in picked], num_layers), key="neuron-counts")
with right:
    ui.chart(figures.score_distribution_figure(scores.scores[:max_layer + 1], picked[-1].score if picked else None),
             key="neuron-scores")
shown = neurons.pairs()[:8]
maps = ui.fetch(intervention_data.activation_maps, request, ref, shown)
picture = intervention_data.picture(request, ref)
overlays = [figures.Overlay(title=f"layer {layer}, neuron {neuron}", values=values, image=picture, colorbar="activation",
                            value_name="activation") for (layer, neuron), values in zip(shown, maps)]
ui.chart(figures.overlay_grid(overlays, columns=4, colorbar="activation", width=ui.MAIN_WIDTH, shared_scale=False),
         key="neuron-maps")
st.caption(f"Activation maps of the {len(shown)} best picked neurons on {data.image_label(ref)}.")

buttons = st.columns(3)
buttons[0].download_button("Neuron list (JSON)", json.dumps(neurons.to_json(), indent=2), "register_neurons.json",
                           mime="application/json")
buttons[1].button("Use as the test-time register", on_click=_use, args=(neurons,), type="primary",
                  help="Adds the column 'with test-time register' to every view (checkbox in the sidebar).")
buttons[2].file_uploader("…or load a neuron list", type=["json"], key="neuron_upload", on_change=_on_upload)
if state.get("neuron_upload_error"):
    st.error(state["neuron_upload_error"])

st.subheader("Test-time register")
options = st.columns(2)
options[0].radio("The register starts as", REGISTER_INITS, key="register_init", horizontal=True,
                 help="zeros: the authors' DINOv2 code; patch-mean: their OpenCLIP code.")
options[1].radio("The patches' activations become", PATCH_VALUES, key="register_patches", horizontal=True,
                 help="zero (the authors' default) or the mean of their lower 75%.")
active = state.get("register_neurons")
if active is None or not active.fits(choice.name):
    st.info("Press 'Use as the test-time register' (or load a neuron list for this model) to apply it.")
    st.stop()
register = TestTimeRegister(active.pairs(), init=state["register_init"], patch_values=state["register_patches"])
cost = ui.fetch(intervention_data.cost, request, ref, register, ui.threshold())
ui.chart(figures.change_figure({"CLS": cost.cls_cosine, "patches outside the outliers (mean)": cost.patch_cosine,
                                "patches outside the outliers (worst)": cost.patch_cosine_min}), key="register-cost")
st.caption(f"What the register costs on {data.image_label(ref)}: 1 - cosine between the tokens with and without it, per "
           f"block and after the final norm, for CLS and for the patches outside the {int(cost.excluded.sum())} outlier "
           "cells. The other views show the model with the register as a third column.")

"""Ablations with controls, massive activations and attention sinks."""
import numpy as np
import streamlit as st

import data
import figures
import intervention_data
import ui
from vitlens.experiments import ABLATIONS, TARGETS

st.title("Ablations, massive activations and sinks")
st.caption("Replace the registers' (or the outliers') states after one block and see how much the final features "
           "change. Zero-ablation overstates what those tokens hold; replacing them by their mean over the chosen images, "
           "noise of the same norm or the same tokens of another image are the controls, shown side by side.")
request = ui.page_request()
result = ui.fetch(data.captured, request)
controls = st.columns([4, 4, 3, 3])
with controls[0]:
    layer = ui.layer_slider(result.num_layers)
plain = [i for i, run in enumerate(result.runs) if not run.choice.register]  # the register column runs on its own page
index = controls[1].selectbox("Model", plain, format_func=lambda i: result.runs[i].label,
                              index=next((n for n, i in enumerate(plain) if result.runs[i].trained_registers), 0))
run = result.runs[index]
targets = TARGETS if run.trained_registers else TARGETS[1:]
target = controls[2].radio("Replace", targets, horizontal=True)
with controls[3]:
    ref = ui.image_picker(request)
threshold = ui.threshold()
refs, results = ui.fetch(intervention_data.ablations, request, run.choice, layer, target, threshold)
if ref not in refs:
    st.info(f"{data.image_label(ref)} has another aspect ratio than the first image; showing {data.image_label(refs[0])}.")
    ref = refs[0]
position = refs.index(ref)
picture = intervention_data.picture(request, ref)
overlays, notes = [], []
for mode in ABLATIONS:
    found = results[mode]
    if isinstance(found, str):
        notes.append(f"{mode}: {found}")
        continue
    change = 1 - found.patch_cosine[position]
    overlays.append(figures.Overlay(title=f"<b>{mode}</b>: CLS 1-cos {1 - found.cls_cosine[position]:.2g}", values=change,
                                    image=picture, colorbar="1 - cosine", value_name="1 - cosine"))
ui.chart(figures.overlay_grid(overlays, columns=len(overlays), colorbar="1 - cosine of the final patch features",
                              width=ui.MAIN_WIDTH), key="ablation-maps")
replaced = next((r.replaced[position] for r in results.values() if not isinstance(r, str)), 0)
st.caption(f"{run.name}: {replaced} {target} tokens replaced after layer {layer}; per patch 1 - cosine of the "
           "final features (after the final norm) with vs without the replacement. " + " ".join(notes))

st.subheader("Attention sinks and massive activations")
state = st.session_state
state.setdefault("sink_layers", [layer])
state["sink_layers"] = [l for l in state["sink_layers"] if l < result.num_layers] or [layer]
columns = st.columns([3, 5])
sink_index = columns[0].selectbox("Model", range(len(result.runs)), format_func=lambda i: result.runs[i].label,
                                  key="sink_model", help="The column with a test-time register shows its token as a sink.")
layers = columns[1].multiselect("Layers (full attention rows are computed for these only)", list(range(result.num_layers)),
                                key="sink_layers")
sinks, massive = ui.fetch(intervention_data.sinks, request, result.runs[sink_index].choice, ref, tuple(sorted(layers)),
                          threshold)
ui.chart(figures.sink_figure(sinks.masses(), sinks.layers), key="sinks")
st.caption("Attention each group of tokens receives, averaged over all queries (not only CLS) and heads; hover for the "
           "strongest head. A sink moving from the outliers to the registers shows here.")
rows = [[l, float(massive.values[l, 0]), int(massive.tokens[l, 0]), int(massive.channels[l, 0]), float(massive.median[l]),
         float(massive.ratio[l])] for l in range(massive.values.shape[0])]
names = massive.layout.prefix_names()
st.dataframe({"layer": [r[0] for r in rows], "top |activation|": [r[1] for r in rows],
              "token": [names[r[2]] if r[2] < len(names) else f"patch {r[2] - len(names)}" for r in rows],
              "channel": [r[3] for r in rows], "median |activation|": [r[4] for r in rows],
              "top / median": np.round([r[5] for r in rows], 1)}, hide_index=True)

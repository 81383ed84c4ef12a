"""Attention: where CLS, each register and an attention-pool query look, per head or averaged, and CLS's attention on outliers."""
import streamlit as st

import data
import figures
import image_data
import ui

st.title("Attention")
st.caption("Attention of the CLS token and of each register over the patches in block l, laid over the image; "
           "outlined: the tokens that were outliers in the block's input (block l-1 output), which made its keys. "
           "Without registers CLS attends to the outliers; with them, the registers take that role.")
request = ui.page_request()
result = ui.fetch(data.captured, request)
ui.notes(result)

heads = min(run.num_heads for run in result.runs)
st.session_state.setdefault("opacity", 0.6)
st.session_state.setdefault("shared_scale", False)
if st.session_state.get("head") not in ["mean", *range(heads)]:
    st.session_state["head"] = "mean"
controls = st.columns([4, 2, 2, 3])
with controls[0]:
    layer = ui.layer_slider(result.num_layers)
with controls[1]:
    head = st.selectbox("Head", ["mean", *range(heads)], key="head",
                        format_func=lambda h: "mean over heads" if h == "mean" else f"head {h}")
with controls[2]:
    opacity = st.slider("Opacity", 0.0, 1.0, step=0.05, key="opacity")
with controls[3]:
    ref = ui.image_picker(request)

view = ui.fetch(image_data.attention, request, ref, layer, None if head == "mean" else head, ui.threshold())
for note in dict.fromkeys(panel.note for panel in view.panels if panel.note):
    st.info(note)
overlays = [overlay for panel in view.panels for overlay in panel.overlays]
if not overlays:
    st.stop()
shared = st.toggle("One colour scale for all maps", key="shared_scale",
                   help="Off: each map runs from its own lowest to its highest value, so a query with weak attention "
                        "still shows where it looks. On: all maps share one scale, so their strengths compare.")
ui.map_columns(overlays, opacity, figures.shared_range(overlays, top=0.995) if shared else None, key="attention-map",
               per_row=min(3, len(overlays)))
scale = ("One colour scale for all maps (attention is a share of the query's total)" if shared
         else "Each map has its own colour scale, from its lowest to its highest attention (bar beside it)")
st.caption(" · ".join(f"**{panel.label}**: {panel.num_registers} registers" for panel in view.panels) + f". {scale}.")

st.subheader(figures.CLS_INPUT_OUTLIERS)
measured = [panel for panel in view.panels if panel.cls_mass is not None]
if measured:
    cls_figures = figures.cls_attention_figures([(p.label, p.cls_mass) for p in measured], layer, roles=[p.role for p in measured])
    for index, (column, fig) in enumerate(zip(st.columns([3, 2]), cls_figures)):
        with column:
            ui.chart(fig, key=f"cls-mass-{index}")
    st.caption("Dotted: what the outliers would get if CLS spread its attention on patches evenly (their share of the "
               "patches times CLS's attention on patches). Far above it, CLS reads the outliers. Block 0 has no "
               "point: its input (patch and position embeddings) has no captured norms, so no outlier mask.")
else:
    st.info("This model has no class token, so there is no CLS attention to measure.")
ui.download_table(view.table, f"attention_{data.image_name(ref)}_layer{layer}.csv")


def pick_patch(key: str, grid: tuple[int, int]) -> None:
    """A click on a map of the heads grid makes that patch the query."""
    position = image_data.position_from_selection(st.session_state[key].selection, grid)
    if position is not None:
        st.session_state["attention_patch"], st.session_state["heads_query"] = position, image_data.PATCH_QUERY


st.subheader(f"All heads of block {layer}")
queries = list(dict.fromkeys(n for run in result.runs for n in run.traces[0].layout.prefix_names())) + [image_data.PATCH_QUERY]
if st.session_state.get("heads_query") not in queries:
    st.session_state["heads_query"] = queries[0]
query = st.selectbox("Query", queries, key="heads_query",
                     format_func=lambda q: "a patch (click any map below)" if q == image_data.PATCH_QUERY else q)
heads = ui.fetch(image_data.heads, request, ref, layer, query, st.session_state.get("attention_patch", (0.5, 0.5)),
                 ui.threshold())
for index, panel in enumerate(heads.panels):
    if panel.note:
        st.caption(panel.note)
        continue
    grid = panel.gives[0].grid
    what = f"patch {panel.patch.cell}" if panel.patch else query
    for name, maps, title in (("gives", panel.gives, f"what {what} attends to"), ("gets", panel.gets, f"who attends to {what}")):
        if maps:
            ui.chart(figures.overlay_grid(maps, opacity, columns=3 if len(maps) <= 6 else 4, width=ui.MAIN_WIDTH,
                                          shared_scale=shared, title=f"{panel.label}: {title}", clickable=True),
                     key=f"heads-{name}-{index}", on_select=lambda key=f"heads-{name}-{index}", grid=grid: pick_patch(key, grid),
                     selection_mode="points")
    if panel.patch is not None:
        ui.chart(figures.patch_prefix_figure(panel.patch, panel.label), key=f"heads-prefix-{index}")
st.caption("Click any cell of these maps to see what that patch attends to and who attends to it (the whole block's "
           "attention is computed for it, a second or so).")
ui.download_table(heads.table, f"attention_heads_{data.image_name(ref)}_layer{layer}.csv")

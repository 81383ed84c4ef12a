"""Streamlit pieces of the population pages: the results folder in the sidebar, sweeps started
from the app, and opening a checkpoint of a sweep in the per-image views."""
from __future__ import annotations

import streamlit as st

import data
import population_data
import ui
from vitlens.errors import VitlensError

PER_IMAGE_PAGE = "views/norm_maps.py"
KEPT_ON_SWITCH = (*ui.SIDEBAR_KEYS, *ui.PAGE_KEYS)


def results_sidebar() -> str:
    """Draw the results folder choice and the sweep form in the sidebar; returns the folder's name.

    Stops the page with one message when the deployment offers no results folder yet.
    """
    state = st.session_state
    folders = population_data.results_folders()
    running = state.get("results_folder")
    if running and running not in folders and population_data.sweeping(running):
        folders = sorted([*folders, running])
    with st.sidebar:
        st.subheader("Sweep results")
        if folders:
            if state.get("results_folder") not in folders:
                state["results_folder"] = folders[0]
            st.selectbox("Results folder", folders, key="results_folder",
                         help="A folder `python -m vitlens sweep … --out` wrote, inside VITLENS_RESULTS_DIR.")
        _sweep_form()
    if data.settings().results_dir is None:
        st.info("Sweep results are not enabled here: set VITLENS_RESULTS_DIR to the folder that holds the folders "
                "`python -m vitlens sweep IMAGES --model … --weights … --out DIR` writes.")
        st.stop()
    if not folders:
        st.info(f"No results folders in {data.settings().results_dir} yet: run `python -m vitlens sweep` with "
                "`--out` inside it, or start a sweep from the sidebar.")
        st.stop()
    ui.fetch(population_data.results, state["results_folder"])  # a sweep into it running here: its progress, cancel
    note = population_data.sweep_note(state["results_folder"])
    if note:
        st.warning(note)
    return state["results_folder"]


def _sweep_form() -> None:
    """A sweep of an image folder of the deployment into a results folder, run in the background."""
    datasets = data.settings().dataset_folders()
    with st.expander("Run a sweep"):
        if not datasets or data.settings().results_dir is None:
            st.caption("Sweeps from the app need VITLENS_DATASETS_DIR (image folders) and VITLENS_RESULTS_DIR.")
            return
        files = [data.WEIGHTS_FILE_PREFIX + name for name in data.weights_files()]
        st.selectbox("Image folder", datasets, key="sweep_images", help="Inside VITLENS_DATASETS_DIR; searched recursively.")
        st.text_input("Models (comma-separated)", key="sweep_models", value=ui.model_name())
        st.multiselect("Weights (several files: a checkpoint series)", [*data.NAMED_WEIGHTS, *files], key="sweep_weights",
                       default=["synthetic"], format_func=data.weights_label)
        st.number_input("Input side (px)", min_value=14, max_value=data.settings().max_side, value=224, key="sweep_size")
        st.text_input("Results folder name", key="sweep_out", placeholder="e.g. my-run")
        st.button("Start the sweep", on_click=_start_sweep, key="sweep_start")
        if st.session_state.get("sweep_error"):
            st.error(st.session_state["sweep_error"])


def _start_sweep() -> None:
    state = st.session_state
    state["sweep_error"] = None
    request = population_data.SweepRequest(
        images=state["sweep_images"], models=tuple(m.strip() for m in state["sweep_models"].split(",") if m.strip()),
        weights=tuple(state["sweep_weights"]), out=(state.get("sweep_out") or "").strip(), size=int(state["sweep_size"]))
    try:
        population_data.start_sweep(request)
    except VitlensError as error:
        state["sweep_error"] = str(error)
        return
    state["results_folder"] = request.out


def pick_cell() -> None:
    """Heat map click: the clicked cell's checkpoint (its label, the y of the cell) and layer become the ones to open."""
    state = st.session_state
    points = [p for p in state["training-heatmap"].selection.get("points", []) if isinstance(p.get("y"), str)]
    if points:
        state["training_checkpoint"], state["training_layer"] = points[0]["y"], int(points[0]["x"])


def open_checkpoint(name: str, model: str, checkpoint: int, layer: int, image: str) -> None:
    """Button callback: point the shared sidebar at one checkpoint and image, then go to the per-image views."""
    state = st.session_state
    try:
        link = population_data.checkpoint_link(name, model, checkpoint, layer, image)
    except VitlensError as error:
        state["link_error"] = str(error)
        return
    for key in KEPT_ON_SWITCH:  # st.switch_page's rerun carries no widget values: keep them as state
        if key in state:
            state[key] = state[key]
    presets = [spec.name for spec in data.presets()]
    state["model"], state["custom_model"] = (link.model, "") if link.model in presets else (state.get("model"), link.model)
    state["weights_mode"], state["sweep_weights_choice"], state["compare"] = "sweep", link.weights, False
    state["images"], state["focus_image"] = [link.image], link.image
    state.setdefault("my_uploads", []).append(link.image)
    state["layer"], state["side"] = link.layer, link.side
    state["link_error"], state["open_per_image"] = None, True


def follow_link() -> None:
    """Go to the per-image views when ``open_checkpoint`` asked to; else show why it could not."""
    state = st.session_state
    if state.pop("open_per_image", False):
        st.switch_page(PER_IMAGE_PAGE)
    if state.get("link_error"):
        st.error(state["link_error"])

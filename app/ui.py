"""Streamlit pieces the pages share: the sidebar, state mirrored in the URL, waiting, downloads.

Shared state lives in ``st.session_state`` under the widget keys below and is mirrored in the
query string (``?model=…&weights=…&images=astronaut,cat&layer=9``), so a teammate who opens the
URL sees the same view. ``main.py`` calls ``init_state`` and ``keep_page_state`` before the
widgets are drawn and ``sync_url`` after the sidebar.
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence, TypeVar

import plotly.graph_objects as go
import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

import auth
import data
import figures
import links
from data import ImageError, OptionError, VitlensError, WeightsError
from vitlens.interventions import TestTimeRegister

T = TypeVar("T")
DEFAULT_MODEL = "dinov2_vits14_reg4"
DEFAULT_IMAGES = ("astronaut", "cat")
DEFAULT_SIDE = 224
WEIGHT_MODES = {"hub": "pretrained (hub / local HF cache)", "synthetic": "synthetic demo (planted artifacts)",
                "random": "random weights", "file": "local weights file", "upload": "upload a weights file",
                "sweep": "checkpoint of a sweep (Training page)"}
FALLBACK_WORDS = {"synthetic": "synthetic demo", "random": "random weights"}  # what replaces pretrained weights offline
IMAGE_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"]
PAGE_KEYS = ("layer", "head", "opacity", "post_norm", "focus_image", "log_y", "extra_layers", "per_image_threshold", "embed_method",
             "embed_normalize", "emergence_scope", "figure_format", "shared_scale", "norm_scale_shared",
             "register_init", "register_patches", "test_time_register", "neuron_detector", "neuron_max_layer",
             "neuron_top", "neuron_sparse", "sink_layers", "results_folder", "compare_folder", "training_model",
             "training_layers", "dataset_series", "dataset_layers", "grid_cell", "heads_query")  # page widgets whose values follow the user
SIDEBAR_KEYS = ("model", "custom_model", "compare", "weights_mode", "weights_file", "pair_weights", "side", "images",
                "threshold_auto", "threshold_value", "test_time_register")  # sidebar widgets an error run does not draw
MIN_PATCHES = 4  # the input side is at least this many patches
_WAITS = itertools.count()  # numbers the progress areas' cancel buttons
GRACE_S = 0.5  # a job that ends this soon is waited for without showing its progress
MAIN_WIDTH = 900  # pixels the main column gives figures in a 1400-pixel window (grid figures are drawn this wide)


# ----------------------------------------------------------------------------------------------
# State and URL
# ----------------------------------------------------------------------------------------------

def _param(name: str) -> str | None:
    value = st.query_params.get(name)
    return value if value else None


def init_state() -> None:
    """Fill the shared state from the URL (else the defaults): once per session, and again when the browser's
    Back or Forward brings an earlier link back (the view follows the history)."""
    state = st.session_state
    if state.get("_initialised") and not _history_navigation():
        return
    state["_first_run"] = not state.get("_initialised")
    state["_initialised"] = True
    state["_opened_link"] = st.query_params.to_dict()
    state["url_problems"] = []
    if not state["_first_run"]:  # an earlier link: what it leaves out is back to the defaults
        for key in links.keys():
            state.pop(key, None)
    _read_sidebar_link()
    values, bad = links.read(st.query_params)
    state.update(values)
    if bad:
        state["url_problems"].append(f"The link's {_some(bad)} {'was' if len(bad) == 1 else 'were'} not understood; "
                                     "using the defaults.")


def _history_navigation() -> bool:
    """Whether this run comes from the browser's Back or Forward button."""
    ctx = get_script_run_ctx()
    return bool(ctx is not None and ctx.is_history_navigation)


def _read_sidebar_link() -> None:
    """The sidebar's entries of the link, each checked against what this server offers."""
    state = st.session_state
    model = _param("model") or DEFAULT_MODEL
    preset_names = [spec.name for spec in data.presets()]
    if model in preset_names:
        state["model"], state["custom_model"] = model, ""
    else:
        state["model"], state["custom_model"] = (preset_names[0] if preset_names else ""), model
    state["compare"], state["side"] = True, DEFAULT_SIDE
    weights = _param("weights") or "hub"
    mode = weights.split(":", 1)[0] if ":" in weights else weights
    state["weights_mode"] = mode if mode in WEIGHT_MODES else "hub"
    if mode == "file":
        state["weights_file"] = weights.split(":", 1)[1]
        if state["weights_file"] not in data.weights_files():
            state["url_problems"].append(f"Weights file '{state['weights_file'][:80]}' from the link is not in the "
                                         "weights folder; choose one in the sidebar.")
    if mode == "upload":
        state["weights_upload_choice"] = weights
    if mode == "sweep":
        state["sweep_weights_choice"] = weights
    if _param("pair_weights"):
        state["pair_weights"] = _param("pair_weights")
    refs = list(dict.fromkeys(ref for ref in (_param("images") or ",".join(DEFAULT_IMAGES)).split(",") if ref))  # each once
    missing = [ref for ref in refs if not data.has_image(ref)]
    if missing:
        state["url_problems"].append(f"Images {_some(missing)} from the link are not on this server (uploads are kept "
                                     "in memory only); upload them again.")
    state["images"] = _capped([ref for ref in refs if data.has_image(ref)], "The link")
    try:
        value = data.parse_threshold(_param("threshold"))
    except OptionError as error:
        value = None
        state["url_problems"].append(f"{error} Using auto.")
    state["threshold_auto"], state["threshold_value"] = value is None, value or 100.0


def _some(items: list[str], shown: int = 5) -> str:
    """The first few items (each cut to 40 characters) and how many more there are."""
    listed = ", ".join(item[:40] for item in items[:shown])
    return listed + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _capped(refs: list[str], source: str) -> list[str]:
    """At most ``max_images`` references; says which were dropped (in ``url_problems``)."""
    limit = data.settings().max_images
    if len(refs) > limit:
        st.session_state.setdefault("url_problems", []).append(
            f"{source} names {len(refs)} images; a view shows at most {limit}, so {_some(refs[limit:])} "
            "were left out.")
    return refs[:limit]


def keep_page_state() -> None:
    """Keep widgets' values while they are not drawn: page widgets on other pages, sidebar widgets while an
    error hides them (Streamlit drops the state of a widget a run does not draw, unless the script set it)."""
    for key in PAGE_KEYS + SIDEBAR_KEYS:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


def sync_url(request: data.Request | None, last: bool = False) -> None:
    """Mirror the view in the query string (``last``: the run's final call, after the page).

    Each write adds a browser history entry, so a session's first run leaves the link it was opened
    with as it is (defaults need not be spelled out) unless the link had to be corrected.
    """
    state = st.session_state
    params = url_params(request)
    if state.get("_first_run"):
        state["_first_run"] = not last
        if not state.get("url_problems") and not links.corrected(state.get("_opened_link", {}), params):
            return
    if st.query_params.to_dict() != params:
        st.query_params.from_dict(params)


def url_params(request: data.Request | None) -> dict[str, str]:
    """The query string of the current view."""
    state = st.session_state
    params = {"model": model_name(), "weights": primary_weights(), "images": ",".join(state.get("images", [])),
              "threshold": "auto" if state.get("threshold_auto", True) else f"{state.get('threshold_value'):g}"}
    if request is not None and len(request.models) > 1:
        params["pair_weights"] = request.models[1].weights
    return params | links.write(state)


def model_name() -> str:
    state = st.session_state
    return (state.get("custom_model") or "").strip() or state.get("model") or DEFAULT_MODEL


def primary_weights() -> str:
    state = st.session_state
    mode = state.get("weights_mode", "hub")
    if mode == "file":
        return f"{data.WEIGHTS_FILE_PREFIX}{state.get('weights_file') or ''}"
    if mode == "upload":
        return state.get("weights_upload_choice") or "upload:"
    if mode == "sweep":
        return state.get("sweep_weights_choice") or "sweep:"
    return mode


def threshold_from_selection(selection: dict) -> float | None:
    """The threshold a histogram selection asks for: the lowest clicked bar's lower edge
    (its customdata; its centre when that is missing) or a box's left side; None if neither."""
    edges = []
    for point in selection.get("points", []):
        data = point.get("customdata")
        value = data[0] if isinstance(data, (list, tuple)) and data else point.get("x")
        if isinstance(value, (int, float)):
            edges.append(float(value))
    edges += [float(min(box["x"])) for box in selection.get("box", []) if box.get("x")]
    edges = [edge for edge in edges if edge > 0]
    return float(f"{min(edges):.4g}") if edges else None


def threshold() -> float | None:
    """The shared outlier threshold: None for auto."""
    state = st.session_state
    return None if state.get("threshold_auto", True) else float(state.get("threshold_value", 100.0))


# ----------------------------------------------------------------------------------------------
# Sidebar
# ----------------------------------------------------------------------------------------------

def sidebar() -> data.Request | None:
    """Draw the shared sidebar; returns the request, or None (the reason is kept for the pages)."""
    st.session_state["request_error"] = None
    with st.sidebar:
        auth.account_panel()
        request = _model_and_images()
        _threshold_controls()
        _status()
    return request


def _model_and_images() -> data.Request | None:
    state = st.session_state
    st.subheader("Model")
    specs = data.presets()
    labels = {spec.name: spec.label for spec in specs}  # short enough for the sidebar; the name goes below
    if specs:
        if state.get("model") not in labels:
            state["model"] = specs[0].name
        st.selectbox("Preset", list(labels), format_func=labels.get, key="model",
                     help="\n".join(f"- {spec.label}: `{spec.name}`" for spec in specs))
        if not (state.get("custom_model") or "").strip():
            st.caption(f"`{state['model']}`")
    st.text_input("or any timm ViT name", key="custom_model", placeholder="e.g. vit_base_patch14_reg4_dinov2",
                  help="Overrides the preset while it is not empty.")
    name = model_name()
    try:
        patch = data.patch_size(data.check_model(name))
    except VitlensError as error:
        state["request_error"] = str(error)  # shown once, by the page (page_request)
        return None
    pair = data.pair_of(name)
    if pair:
        st.checkbox(f"Compare with {pair}", key="compare", help="Side by side: the same model with/without registers, or "
                                                                "for DINOv3 (no register-free twin) the DINOv2 of about its size.")
    register = _register_control(name)
    weights, pair_weights = _weights_controls(pair, [name, pair] if pair and state.get("compare", True) else [name])
    side = _side_control(patch)
    refs = _image_controls()
    if weights is None:
        return None
    models = [data.ModelChoice(name, weights)]
    if pair and state.get("compare", True):
        models.append(data.ModelChoice(pair, pair_weights))
    if register is not None:
        models.append(data.ModelChoice(name, weights, register))
    return data.Request(models=tuple(models), images=tuple(refs), side=side)


def _register_control(name: str) -> TestTimeRegister | None:
    """The "with test-time register" column: offered once a neuron list for this architecture is loaded
    (Interventions page)."""
    neurons = st.session_state.get("register_neurons")
    if neurons is None or not neurons.fits(name):
        return None
    label = f"With test-time register ({len(neurons.neurons)} neurons)"
    if not st.checkbox(label, key="test_time_register", help="A third column: the same model with one extra token that "
                       "takes over the register neurons found on the Interventions page (Jiang et al. 2025)."):
        return None
    state = st.session_state
    return TestTimeRegister(neurons.pairs(), init=state.get("register_init", "zeros"),
                            patch_values=state.get("register_patches", "zero"))


def _weights_controls(pair: str | None, compared: list[str]) -> tuple[str | None, str]:
    state = st.session_state
    modes = [mode for mode in WEIGHT_MODES if mode != "sweep" or state.get("sweep_weights_choice")]
    state["hub_fallback_shown"] = fallback = data.offline_fallback(compared)
    st.radio("Weights", modes, format_func=lambda mode: _mode_label(mode, fallback), key="weights_mode", horizontal=False)
    mode = state["weights_mode"]
    if mode == "sweep":
        st.caption(f"Checkpoint `{data.weights_label(state['sweep_weights_choice'])}`, opened from the Training page.")
        if pair:
            st.caption(f"{pair} uses random weights.")
        return state["sweep_weights_choice"], "random"
    if mode in data.NAMED_WEIGHTS:
        if mode == "random":
            st.caption("Random weights: no artifacts expected (useful to check the app works offline).")
        if mode == "synthetic":
            st.caption("Not a trained model: random weights with high-norm tokens planted at fixed cells from the middle "
                       "block of the model without registers (the same cells at every side and aspect); the twin with registers is left clean. "
                       "Offline, pretrained weights fall back to this demo.")
        return mode, mode
    if mode == "file":
        files = data.weights_files()
        if not files:
            message = ("Local weights files are not enabled here (set VITLENS_WEIGHTS_DIR to a folder of "
                       ".safetensors/.pth/.pt files)." if data.settings().weights_dir is None
                       else f"No .safetensors/.pth/.pt files in {data.settings().weights_dir}.")
            state["request_error"] = message
            st.warning(message)
            return None, "random"
        if state.get("weights_file") not in files:
            state["weights_file"] = files[0]
        st.selectbox("Weights file", files, key="weights_file")
        pair_weights = "random"
        if pair:
            options = ["random", "synthetic"] + [data.WEIGHTS_FILE_PREFIX + f for f in files]
            if state.get("pair_weights") not in options:
                state["pair_weights"] = "random"
            pair_weights = st.selectbox(f"Weights of {pair}", options, key="pair_weights", format_func=data.weights_label)
        return data.WEIGHTS_FILE_PREFIX + state["weights_file"], pair_weights
    st.file_uploader("Weights file (.safetensors, .pth, .pt)", type=["safetensors", "pth", "pt"], key="weights_upload",
                     on_change=_on_weights_upload)
    if state.get("weights_upload_error"):
        st.error(state["weights_upload_error"])
    choice = state.get("weights_upload_choice")
    if not choice or choice == "upload:":
        state["request_error"] = "Upload a weights file in the sidebar, or choose other weights."
        st.info(state["request_error"])
        return None, "random"
    if pair:
        st.caption(f"{pair} uses random weights.")
    return choice, "random"


def _mode_label(mode: str, fallback: tuple[str, ...]) -> str:
    """A weights choice as the radio shows it: "pretrained" says what replaces it while the hub is unreachable."""
    if mode == "hub" and fallback:
        return f"{' / '.join(FALLBACK_WORDS.get(w, w) for w in fallback)} (pretrained unavailable offline)"
    return WEIGHT_MODES[mode]


def _on_weights_upload() -> None:
    state = st.session_state
    upload, state["weights_upload_error"] = state.get("weights_upload"), None
    if upload is None:
        return
    try:
        state["weights_upload_choice"] = data.add_weights_upload(upload.name, upload.getvalue())
    except WeightsError as error:
        state["weights_upload_error"] = str(error)


def _side_control(patch: int) -> int:
    state = st.session_state
    max_side = data.settings().max_side
    lowest = min(MIN_PATCHES * patch, max_side // patch * patch)
    side = int(state.get("side") or DEFAULT_SIDE)
    state["side"] = min(max(lowest, round(side / patch) * patch), max_side // patch * patch)
    st.number_input("Input side (px)", min_value=lowest, max_value=max_side // patch * patch, step=patch, key="side",
                    help=f"Longer image side fed to the model; a multiple of the patch size ({patch}).")
    return int(state["side"])


def _on_upload() -> None:
    """Add the uploader's new files; a file that failed is reported once, not again on later uploads
    (it stays in the uploader until the user removes it)."""
    state = st.session_state
    errors, refs = [], list(state.get("images", []))
    failed = state.setdefault("failed_uploads", set())  # uploader file ids
    for upload in state.get("image_uploads") or []:
        file_id = getattr(upload, "file_id", None) or f"{upload.name}:{upload.size}"
        if file_id in failed:
            continue
        try:
            ref, dropped = data.add_upload(upload.name, upload.getvalue())
        except ImageError as error:
            errors.append(str(error))
            failed.add(file_id)
            continue
        if dropped:
            errors.append(f"Your uploads use more than this server keeps per visitor, so your oldest ({', '.join(dropped[:5])}"
                          f"{' and more' if len(dropped) > 5 else ''}) were dropped.")
            refs = [ref for ref in refs if data.has_image(ref)]
        if ref not in refs and len(refs) >= data.settings().max_images:
            errors.append(f"'{upload.name}' was not added: a view shows at most {data.settings().max_images} images; "
                          "remove some first.")
            continue
        if ref not in refs:
            refs.append(ref)
        state.setdefault("my_uploads", [])
        if ref not in state["my_uploads"]:
            state["my_uploads"].append(ref)
    state["images"] = refs
    state["upload_errors"] = errors
    new = [ref for ref in refs if ref in state.get("my_uploads", [])]
    if new:
        state["focus_image"] = new[-1]  # show the latest upload on the per-image pages


def _image_controls() -> list[str]:
    state = st.session_state
    st.subheader("Images")
    options = list(data.GALLERY_NAMES)
    options += [ref for ref in state.get("my_uploads", []) + state.get("images", []) if ref not in options and data.has_image(ref)]
    state["images"] = [ref for ref in state.get("images", []) if ref in options]
    state["images"] = state["images"][:data.settings().max_images]
    st.multiselect("Gallery photographs and uploads", options, key="images", format_func=data.image_label,
                   max_selections=data.settings().max_images)
    st.file_uploader("Upload images (several at once)", type=IMAGE_TYPES, accept_multiple_files=True, key="image_uploads",
                     on_change=_on_upload)
    for message in state.get("upload_errors", []):
        st.error(message)
    if state.get("my_uploads"):
        if state.get("share_uploads"):
            st.caption("Your uploads are shared: anyone with this page's link sees them.")
        else:
            st.button("Share my uploads by link", on_click=data.share_uploads,
                      help="Uploads are visible only to you; this lets anyone with the link see them.")
    return list(state["images"])


def _threshold_controls() -> None:
    st.subheader("Outliers")
    st.checkbox("Automatic threshold (per layer, where the norms have a high mode)", key="threshold_auto")
    st.number_input("Fixed norm threshold", min_value=0.001, step=1.0, format="%.4g", key="threshold_value",
                    disabled=st.session_state.get("threshold_auto", True),
                    help="Model-specific: about 150 for DINOv2 ViT-g, 30 for OpenCLIP ViT-B/16. Applies to pre-final-norm norms.")


def _status() -> None:
    jobs = data.running_jobs()
    st.session_state["jobs_shown"] = {job.key for job in jobs}  # the jobs this run gives a cancel button
    if jobs:
        st.subheader("Running in the background")
        _progress_panel()
        for job in jobs:  # outside the fragment: a click here interrupts a page that is waiting
            st.button(f"Cancel: {job.label}", key=f"sidebar-cancel-{abs(hash(job.key))}", on_click=job.cancel)
    st.radio("Figure download format (camera icon in each figure)", ["png", "svg"], key="figure_format", horizontal=True)


@st.fragment(run_every=1.0)
def _progress_panel() -> None:
    """Live progress of background work while the user browses (refreshes itself every second); once a job
    with a cancel button ends (done or cancelled), the whole app runs again: the page shows the results and
    the sidebar drops the button (it is drawn outside this fragment, which cannot remove it)."""
    jobs = data.running_jobs()
    if {job.key for job in jobs} != st.session_state.get("jobs_shown"):
        st.rerun(scope="app")
    for job in jobs:
        st.progress(job.fraction if job.fraction is not None else 0.0, text=job.describe())


# ----------------------------------------------------------------------------------------------
# Pages: request, waiting, common widgets, output
# ----------------------------------------------------------------------------------------------

def page_request() -> data.Request:
    """The sidebar's request; stops the page with one message when there is none."""
    for message in st.session_state.get("url_problems", []):
        st.warning(message)
    request = st.session_state.get("request")
    if request is None:
        st.error(st.session_state.get("request_error") or "Choose a model and weights in the sidebar.")
        st.stop()
    if not request.images:
        st.info("Choose at least one image in the sidebar: a gallery photograph or your own upload.")
        st.stop()
    return request


def fetch(fn: Callable[..., T], *args, while_waiting: Callable[[], None] | None = None, area=None, **kwargs) -> T:
    """Call a data function; while it is pending show progress and a cancel button; errors become one message.

    The progress goes to ``area`` (a placeholder the page draws into afterwards) or to a placeholder made
    here whether or not the call waits: every run then has the same elements in the same places, so an
    element of the previous run never lingers, faded, below the new one (it would when only one run waited).
    """
    area, shown = st.empty() if area is None else area, False
    while True:
        try:
            result = fn(*args, **kwargs)
        except data.Pending as pending:
            if not shown and pending.job.wait(GRACE_S):
                continue  # a short job (a new image on warm models): no progress bar flashing up and away
            shown = True
            _wait(pending.job, area, while_waiting)
            continue
        except data.Cancelled as cancelled:
            area.empty()
            st.warning(f"{cancelled} Change a setting or press the button to run it again.")
            st.button("Run again", on_click=data.forget, args=(cancelled.key,), key=f"again-{abs(hash(cancelled.key))}")
            st.stop()
        except VitlensError as error:
            area.empty()
            st.error(str(error))
            st.stop()
        area.empty()
        return result


def _wait(job: data.Job, area, while_waiting: Callable[[], None] | None) -> None:
    with area.container():
        if while_waiting is not None:
            while_waiting()
        bar = st.progress(0.0, text=job.describe())
        # a fresh key per wait: one run may wait on the same job twice (two fetches, or a job restarted after it was
        # abandoned), and two buttons with one key stop the page
        st.button("Cancel", key=f"cancel-{abs(hash(job.key))}-{next(_WAITS)}", on_click=job.cancel)
        st.caption("You can browse other pages meanwhile: the work goes on in the background.")
    tick = 0
    while not job.finished:
        job.touch()  # this page still waits: the job goes on (it stops once no page or sidebar asks)
        fraction = job.fraction
        if fraction is None:  # no count to show: sweep
            tick += 1
            fraction = (tick % 20) / 20
        bar.progress(fraction, text=job.describe())
        job.wait(0.1)


def notes(result: data.Captured) -> None:
    """Say when the weights differ from the choice (hub unreachable) and what to do about it, and
    what the synthetic demo is whenever it is shown."""
    noted = [run for run in result.runs if run.note]
    demo = data.synthetic_note(result) if result.synthetic else ""
    if data.offline_fallback([run.choice.name for run in result.runs]) != st.session_state.get("hub_fallback_shown"):
        st.rerun()  # this capture just found the hub unreachable: the sidebar's weights choice says so from now on
    if noted:
        used = "the synthetic demo" if result.synthetic else f"**{data.RANDOM_NOTE}**"
        lines = "\n".join(f"- {run.note}" for run in dict((run.note, run) for run in noted).values())
        st.warning(f"Pretrained weights are not available, so these views show {used}.")
        with st.expander("Details: what is shown and how to get the pretrained weights"):
            st.markdown(f"{demo}\n\n{lines}")
    elif demo:
        st.info(demo)


def post_norm_toggle(result: data.Captured, label: str, help: str) -> bool:
    """The "after the final norm" switch; off and disabled, with a sentence, when a model of the
    request has no per-token final norm (nothing to show after it)."""
    missing = result.without_final_norm
    if missing:
        st.session_state["post_norm"] = False
    post_norm = st.toggle(label, key="post_norm", disabled=bool(missing), help=help)
    if missing:
        st.caption(f"{', '.join(missing)} has no per-token final norm (it pools the tokens before normalising, "
                   "or has none), so there is nothing to show after it.")
    return post_norm


def layer_slider(num_layers: int, label: str = "Layer (block index, 0-based)") -> int:
    state = st.session_state
    layer = state.get("layer")
    state["layer"] = (2 * num_layers) // 3 if layer is None else min(max(int(layer), 0), num_layers - 1)
    if num_layers == 1:
        st.caption("Layer 0 (the model has one block)")
        return 0
    return st.slider(label, 0, num_layers - 1, key="layer")


def image_picker(request: data.Request, label: str = "Image") -> str:
    state = st.session_state
    if state.get("focus_image") not in request.images:
        state["focus_image"] = request.images[0]
    if len(request.images) == 1:
        return request.images[0]
    return st.selectbox(label, list(request.images), format_func=data.image_label, key="focus_image")


def chart(fig: go.Figure, key: str, **kwargs):
    """Draw a figure with the download button configured for the sidebar's format (a figure that
    sets its own width is drawn that wide, at most the container's width); long legend entries and
    subplot titles are broken into lines, so a phone shows them whole."""
    if fig.layout.width is not None:
        kwargs.setdefault("width", "content")
    figures.fit_narrow(fig)
    config = dict(figures.DOWNLOAD_CONFIG)
    config["toImageButtonOptions"] = dict(config["toImageButtonOptions"], format=st.session_state.get("figure_format", "png"),
                                          filename=key)
    return st.plotly_chart(fig, key=key, config=config, theme=None, **kwargs)


def map_columns(overlays: Sequence[figures.Overlay], opacity: float, scale: tuple[float, float] | None, key: str,
                per_row: int) -> None:
    """Heat maps ``per_row`` to a row, each its own figure in its own column and as wide as it. Under 640 px
    Streamlit stacks columns, so a phone shows one map per row, nothing cut off and no titles side by side."""
    width = min(MAIN_WIDTH // per_row - 16, 640)  # what a column is on a wide screen: the height is sized for it
    for start in range(0, len(overlays), per_row):
        for index, column in zip(range(start, min(start + per_row, len(overlays))), st.columns(per_row)):
            with column:
                chart(figures.overlay_figure(overlays[index], opacity, width=width, scale=scale, stretch=True),
                      key=f"{key}-{index}")


def download_table(table: figures.Table | Callable[[], figures.Table], file_name: str, label: str = "Numbers (CSV)",
                   key: str | None = None) -> None:
    """A CSV download; a callable table is only built when the button is pressed."""
    make = (lambda: table().to_csv()) if callable(table) else table.to_csv
    st.download_button(label, make, file_name=file_name, mime="text/csv", on_click="ignore", key=key or f"dl-{file_name}")


def download_npz(make: Callable[[], bytes], file_name: str, label: str = "Arrays (NPZ)") -> None:
    st.download_button(label, make, file_name=file_name, mime="application/octet-stream", on_click="ignore", key=f"dl-{file_name}")

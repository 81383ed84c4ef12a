"""vitlens dashboard: the router. Shared sidebar and state here; one file per view in views/ (not "pages/": Streamlit would treat that folder as its legacy multipage layout)."""
import streamlit as st

st.set_page_config(page_title="vitlens", page_icon=":material/blur_on:", layout="wide")
with st.spinner("Loading models…"):  # a server's first run imports PyTorch and timm: seconds of an empty page otherwise
    import auth
    import ui
auth.gate()  # with sign-in configured: only the sign-in page until signed in with an allowed account

PAGES = [
    st.Page("views/norm_maps.py", title="Norm maps", icon=":material/grid_on:", url_path="norm_maps", default=True),
    st.Page("views/grid.py", title="Comparison grid", icon=":material/view_module:", url_path="grid"),
    st.Page("views/histogram.py", title="Norm histogram", icon=":material/bar_chart:", url_path="histogram"),
    st.Page("views/emergence.py", title="Layer emergence", icon=":material/stacked_line_chart:", url_path="emergence"),
    st.Page("views/attention.py", title="Attention", icon=":material/visibility:", url_path="attention"),
    st.Page("views/embedding.py", title="Token embedding", icon=":material/scatter_plot:", url_path="embedding"),
    st.Page("views/redundancy.py", title="Neighbour redundancy", icon=":material/texture:", url_path="redundancy"),
    st.Page("views/probes.py", title="Linear probes", icon=":material/science:", url_path="probes"),
    st.Page("views/lost.py", title="Object discovery (LOST)", icon=":material/crop_free:", url_path="lost"),
    st.Page("views/report.py", title="Report", icon=":material/description:", url_path="report"),
    st.Page("views/interventions.py", title="Interventions", icon=":material/build:", url_path="interventions"),
    st.Page("views/ablations.py", title="Ablations and sinks", icon=":material/biotech:", url_path="ablations"),
    st.Page("views/training.py", title="Training", icon=":material/timeline:", url_path="training"),
    st.Page("views/models.py", title="Models", icon=":material/stacked_bar_chart:", url_path="models"),
    st.Page("views/dataset.py", title="Dataset", icon=":material/photo_library:", url_path="dataset"),
    st.Page("views/about.py", title="About / how to read", icon=":material/menu_book:", url_path="about"),
]

page = st.navigation(PAGES)
ui.init_state()
ui.keep_page_state()
request = ui.sidebar()
st.session_state["request"] = request
ui.sync_url(request)
try:
    page.run()
finally:  # also after st.stop: what the page settled (its layer, the focused image) goes into the link
    ui.sync_url(request, last=True)

"""A self-contained HTML report of every measurement, to mail around."""
import streamlit as st

import evidence_data
import ui

st.title("Report")
st.caption("One HTML file with the norm views, neighbour redundancy, local probes and LOST for the first model of the "
           "sidebar on its images, with the exact weights fingerprint and options. It opens offline in any browser. "
           "For a whole folder (and global probes on class folders, corLoc on a VOC folder): "
           "`python -m vitlens report --model M --weights W --images DIR --out report.html`.")
request = ui.page_request()
layer = st.number_input("Outliers from layer (negative: from the end)", value=-1, step=1, key="report_layer")
if st.button("Build the report", key="report_build"):
    st.session_state["report_wanted"] = True
if st.session_state.get("report_wanted"):
    page = ui.fetch(evidence_data.report_html, request, int(layer), ui.threshold())
    st.download_button("Download report.html", page, file_name="vitlens_report.html", mime="text/html",
                       on_click="ignore", key="report_download")

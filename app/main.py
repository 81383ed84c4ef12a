import streamlit as st

st.title("vitlens")
st.write("The dashboard is being built.")

"""sparse-attn: see what sparse attention keeps and loses. Run: streamlit run app.py"""
import streamlit as st

import sparse_attn

st.set_page_config(page_title="sparse-attn", layout="wide")
st.title("sparse-attn")
st.write(f"Library version {sparse_attn.__version__}. The full app is being built.")

"""Streamlit panels, one module per tab. The only Streamlit code besides app.py.

``import sparse_attn`` never imports this package: the library and notebooks
work without Streamlit.
"""

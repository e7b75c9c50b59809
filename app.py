"""sparse-attn: see what sparse attention keeps and loses. Run: streamlit run app.py"""
import streamlit as st

from sparse_attn.i18n import t
from sparse_attn.ui import budget, explainer, generate, heap, lessons, maps, sidebar, speed, state, threads

st.set_page_config(page_title="sparse-attn", page_icon="🔍", layout="wide")
heap.start_trimming()  # once the students leave, the server gives its freed memory back
threads.limit()  # one torch thread per student's run: the students are the server's parallelism
state.init_state()
settings = sidebar.render()
lang = state.lang()

st.title(t("app.title", lang))
st.caption(t("app.subtitle", lang))
state.show_url_notices(lang)
lessons.banner(lang)
tab_maps, tab_budget, tab_speed, tab_generate, tab_explain = st.tabs(
    state.tab_labels(lang), key="tab", on_change="rerun", default=state.open_tab_label(lang)
)
state.write_query_params(state.specs())
if tab_maps.open:
    with tab_maps:
        maps.render(settings, lang)
if tab_budget.open:
    with tab_budget:
        budget.render(settings, lang)
if tab_speed.open:
    with tab_speed:
        speed.render(settings, lang)
if tab_generate.open:
    with tab_generate:
        generate.render(settings, lang)
if tab_explain.open:
    with tab_explain:
        explainer.render(lang)

"""The pretrained model's views: its input box, and BertViz-style pictures of its attention.

The sidebar says, before anything is typed, that the model reads English and
turns most Chinese characters into [UNK], and offers example sentences in
both languages that it reads. Under the maps: one head's tokens linked by
attention lines (dense beside the chosen sparse method), and every layer x
head as small multiples.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import streamlit as st
import torch

from sparse_attn import viz_model
from sparse_attn.i18n import LANG_NAMES, t
from sparse_attn.methods import METHODS, Config
from sparse_attn.sources import load
from sparse_attn.sources.model import vocab_counts
from sparse_attn.sources.sentences import sentence, sentences
from sparse_attn.viz import pool_map

from . import charts, compute, errors, guide, inputs, state

EXAMPLE_KEY = "model_example"    # the example picker
QUERY_KEY = "model_query"        # the line view's query token (None: every token)
OVERVIEW_KEY = "model_overview"  # what the overview shows: "dense" or "sparse"
OVERVIEW_CELLS = 48              # per side of each small map


def _examples(lang: str) -> list[str]:
    """Example ids, the reader's language first."""
    return [s.id for s in sentences(lang)] + [s.id for s in sentences() if s.lang != lang]


def _fill() -> None:
    """The picker's callback: put the sentence in the text box, and open the layer and head of its link."""
    ss = st.session_state
    picked = ss.get(EXAMPLE_KEY)
    if picked is None:
        return
    chosen = sentence(picked)
    ss["text"] = chosen.text
    if chosen.look is not None:
        ss["layer"], ss["head"], ss[QUERY_KEY] = chosen.look.layer, chosen.look.head, chosen.look.query
    else:
        ss[QUERY_KEY] = None


def text_input(sb, lang: str) -> None:
    """The sidebar's input for the model source (the text area keyed ``text``)."""
    inputs.model()  # shared, loaded once per process: the notice counts its vocabulary
    counts = vocab_counts()
    sb.info(t("model.notice", lang, vocab=f"{counts['vocab']:,}", han=counts["han"]), icon=":material/translate:")
    sb.selectbox(t("model.example", lang), _examples(lang), index=None, key=EXAMPLE_KEY, on_change=_fill,
                 placeholder=t("model.example_placeholder", lang), help=t("model.example_help", lang),
                 format_func=lambda i: f"{LANG_NAMES[sentence(i).lang]} · {sentence(i).text}")
    # No max_chars: the widget would drop an over-long paste without a word; the maps panel says why instead.
    sb.text_area(t("setting.text", lang), key="text", help=t("help.text", lang))
    if note := state.text_restart_note(lang):
        sb.caption(note)
    picked = st.session_state.get(EXAMPLE_KEY)
    if picked is not None:
        chosen = sentence(picked)
        if chosen.look is not None and chosen.text == st.session_state.get("text"):
            lk = chosen.look
            sb.caption(t("model.look", lang, layer=lk.layer, head=lk.head, q=lk.query_token, i=lk.query,
                         k=lk.key_token, j=lk.key))


def _trim() -> int:
    return min(viz_model.MAX_LINE_TOKENS, inputs.model().max_tokens)


def _layer_qkv(text: str, layer: int):
    return load(inputs.source({"source": "model", "text": text, "layer": layer}))


@st.cache_data(max_entries=8, ttl=1800, show_spinner=False)
def dense_layers(text: str, causal: bool) -> dict:
    """Every layer's dense attention on ``text``, once per text (CPU, float32), trimmed for the two pictures.

    Kept per layer: the first ``MAX_LINE_TOKENS`` tokens' weights (H, n, n)
    for the line view, and each head pooled to ``OVERVIEW_CELLS`` for the
    overview; the (H, L, L) tensors live only while this runs.
    """
    config, n = Config(causal=causal), _trim()
    out = {"weights": [], "grid": []}
    for layer in range(inputs.model().num_layers):
        qkv = _layer_qkv(text, layer)
        with torch.no_grad():
            w = METHODS["dense"].run(qkv.q, qkv.k, qkv.v, config).weights[0].float()
        out["weights"].append(w[:, :n, :n].numpy())
        out["grid"].append([pool_map(w[h], OVERVIEW_CELLS) for h in range(w.shape[0])])
    out.update(tokens=list(qkv.tokens), notes=[(x.code, dict(x.params)) for x in qkv.notes],
               heads=int(qkv.q.shape[1]), layers=len(out["weights"]))
    return out


@st.cache_data(max_entries=48, ttl=1800, show_spinner=False)
def sparse_layer(text: str, method: str, cfg: dict, layer: int) -> dict:
    """One layer's sparse weights and mask (trimmed), its pooled heads, and per head whether nothing was dropped.

    A layer at a time: a change of k recomputes the layer on screen, not
    every layer; the overview of the sparse method asks for the others.
    """
    config, m, n = Config(**cfg), METHODS[method], _trim()
    if m.validate is not None:
        m.validate(config)
    qkv = _layer_qkv(text, layer)
    with torch.no_grad():
        dense = METHODS["dense"].run(qkv.q, qkv.k, qkv.v, config).weights[0]
        r = m.run_for_picture(qkv.q, qkv.k, qkv.v, config)
    w, mask = r.weights[0].float(), r.mask[0]
    return {
        "weights": w[:, :n, :n].numpy(),
        "mask": mask[:, :n, :n].numpy(),
        "grid": [pool_map(w[h], OVERVIEW_CELLS) for h in range(w.shape[0])],
        # Does the selection cover every key dense attention uses? Then nothing is dropped.
        "all_kept": (mask | (dense == 0)).flatten(1).all(-1).tolist(),
    }


def _look_caption(text: str, layer: int, head: int, dense: np.ndarray, lang: str) -> str | None:
    """The measured weight of the example's link, when the example, its layer and its head are on screen."""
    picked = st.session_state.get(EXAMPLE_KEY)
    if picked is None:
        return None
    lk = sentence(picked).look
    if lk is None or sentence(picked).text != text or (lk.layer, lk.head) != (layer, head):
        return None
    return t("model.look_weight", lang, layer=layer, head=head, q=lk.query_token, i=lk.query, k=lk.key_token,
             j=lk.key, w=float(dense[lk.query, lk.key]))


def render(s: dict, lang: str) -> None:
    """Tokens linked by attention lines, and the layer x head overview, for the model source."""
    if s.get("source") != "model":
        return
    ss = st.session_state
    cfg = dataclasses.asdict(compute.config(s))
    try:
        data = dense_layers(s["text"], bool(cfg["causal"]))
        layer = min(max(int(s.get("layer", 0)), 0), data["layers"] - 1)
        sparse = sparse_layer(s["text"], s["method"], cfg, layer)
    except Exception as exc:  # a bad setting or text breaks these pictures only
        errors.show(exc, lang)
        return
    tokens, H = data["tokens"], data["heads"]
    head = min(max(int(ss.get("head", s.get("head", 0))), 0), H - 1)
    method = t(f"method.{s['method']}", lang)
    n = data["weights"][layer].shape[-1]
    unknown = next((p for code, p in data["notes"] if code == "unknown_tokens"), None)
    subtitle = t("model.unknown_sub", lang, **unknown) if unknown else None

    st.subheader(t("model.lines_header", lang))
    if ss.get(QUERY_KEY) is not None and not 0 <= ss[QUERY_KEY] < n:
        ss[QUERY_KEY] = None  # a position from a longer text
    c1, c2 = st.columns([1, 2])
    c1.selectbox(t("model.query_pick", lang), [None, *range(n)], key=QUERY_KEY,
                 format_func=lambda i: t("model.query_all", lang) if i is None
                 else t("model.query_option", lang, i=i, token=tokens[i]))
    dense = data["weights"][layer][head]
    look = _look_caption(s["text"], layer, head, dense, lang)
    if look:
        c2.info(look, icon=":material/visibility:")
    if sparse["all_kept"][head]:
        st.info(t("model.nothing_dropped", lang, method=method, keys=len(tokens)))
    title = t("model.lines_title", lang, layer=layer, head=head)
    if len(tokens) > n:  # only the first n were kept for this picture: say so, with the real length
        title += " " + t("model.lines_first", lang, shown=n, total=len(tokens))
    fig = viz_model.line_view(dense, tokens[:n], sparse=sparse["weights"][head], mask=sparse["mask"][head],
                              query=ss.get(QUERY_KEY), method_name=method, title=title, subtitle=subtitle, lang=lang)
    charts.show(fig, "model_lines_chart", filename="model_attention_lines")
    st.caption(t("model.lines_how", lang, method=method) + "  \n:material/menu_book: "
               + guide.chapter_ref("ch6_real_model", lang))

    st.subheader(t("model.overview_header", lang))
    st.radio(t("model.overview_show", lang), ("dense", "sparse"), key=OVERVIEW_KEY, horizontal=True,
             format_func=lambda v: t("model.overview_dense", lang) if v == "dense" else method)
    sparse_view = ss.get(OVERVIEW_KEY) == "sparse"
    grid = data["grid"]
    if sparse_view:  # every layer of the sparse method: computed here, on demand, a layer per cache entry
        try:
            grid = [sparse_layer(s["text"], s["method"], cfg, i)["grid"] for i in range(data["layers"])]
        except Exception as exc:
            errors.show(exc, lang)
            return
    title = t("model.overview_title_sparse", lang, method=method) if sparse_view else t("model.overview_title", lang)
    if subtitle:
        title += f"<br><span style='font-size:13px;color:{viz_model.QUERY_COLOUR}'>{subtitle}</span>"
    ov = viz_model.overview(grid, layer=layer, head=head, max_cells=OVERVIEW_CELLS, title=title, lang=lang)
    charts.show(ov, "model_overview_chart", filename="model_layers_heads")
    st.caption(t("model.overview_how", lang) + "  \n:material/menu_book: " + guide.chapter_ref("ch6_real_model", lang))

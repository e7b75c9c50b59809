"""BertViz-style views on a real model run: line opacities are the weights, the overview has layers x heads maps."""
import numpy as np
import pytest
import torch

from sparse_attn.i18n import t
from sparse_attn.methods import METHODS, Config
from sparse_attn.sources import Source, load, load_model
from sparse_attn.sources.sentences import sentence
from sparse_attn.ui.charts import elements as chart_elements
from sparse_attn.ui.charts import spec as chart_spec
from sparse_attn.viz_model import DENSE_COLOUR, DROPPED_COLOUR, LINE_FLOOR, OPACITY_STEP, line_view, overview

TEXT = sentence("en_cat").text  # "The cat did not eat the fish because it was not hungry."


@pytest.fixture(scope="module")
def run():
    """Every layer's q, k, v, dense and top-4 results on TEXT."""
    load_model()
    layers = [load(Source.model(TEXT, layer=i)) for i in range(6)]
    cfg = Config(top_k=4)
    dense = [METHODS["dense"].run(x.q, x.k, x.v, cfg) for x in layers]
    topk = [METHODS["topk"].run(x.q, x.k, x.v, cfg) for x in layers]
    return layers, dense, topk


def drawn(fig, xaxis="x", colour=None):
    """{(query, key): opacity} of every link line drawn on the panel of ``xaxis`` (optionally of one colour)."""
    found = {}
    for tr in fig.data:
        if tr.mode != "lines" or tr.x[0] is None or (tr.xaxis or "x") != xaxis:  # x[0] None: a legend entry
            continue
        if colour is not None and tr.line.color != colour:
            continue
        xs, ys = np.asarray(tr.x, dtype=float), np.asarray(tr.y, dtype=float)
        assert len(xs) % 4 == 0
        for s in range(0, len(xs), 4):  # start, midpoint, end, gap
            assert np.array_equal(xs[s:s + 4], [0, 0.5, 1, np.nan], equal_nan=True) and np.isnan(ys[s + 3])
            link = (int(ys[s]), int(ys[s + 2]))
            assert link not in found, f"link {link} drawn twice"
            found[link] = tr.opacity
    return found


def test_line_opacities_are_the_weights(run):
    layers, dense, _ = run
    w = dense[3].weights[0, 1].numpy()  # layer 3, head 1: "it" -> "cat"
    tokens = layers[3].tokens
    fig = line_view(w, tokens)
    links = drawn(fig)
    expected = {(i, j) for i in range(len(tokens)) for j in range(len(tokens)) if w[i, j] >= LINE_FLOOR}
    assert set(links) == expected and len(expected) > len(tokens)
    for (i, j), opacity in links.items():
        assert abs(opacity - w[i, j]) <= OPACITY_STEP / 2 + 1e-9, (i, j, opacity, w[i, j])
    # The link the example names is one of the darkest: "it" (9) -> "cat" (2) at 0.63.
    assert tokens[9] == "it" and tokens[2] == "cat" and links[(9, 2)] == pytest.approx(0.63, abs=0.005)
    hover = [tx for tr in fig.data if tr.mode == "lines" and tr.text for tx in tr.text if tx]
    assert "query 9 (it) → key 2 (cat): weight 0.630" in hover


def test_one_query_draws_only_its_links_and_marks_it(run):
    layers, dense, _ = run
    w = dense[3].weights[0, 1].numpy()
    fig = line_view(w, layers[3].tokens, query=9, lang="zh")
    links = drawn(fig)
    assert links and {i for i, _ in links} == {9}
    assert set(links) == {(9, j) for j in range(w.shape[1]) if w[9, j] >= LINE_FLOOR}
    left = [tr for tr in fig.data if tr.mode == "text+markers" and tr.textposition == "middle left"][0]
    assert left.text[9] == "<b>it</b>" and left.textfont.color[9] != left.textfont.color[8]
    assert "查询 9（it）→ 键 2（cat）：权重 0.630" in [tx for tr in fig.data if tr.mode == "lines" for tx in tr.text if tx]
    right = [tr for tr in fig.data if tr.mode == "text+markers" and tr.textposition == "middle right"][0]
    assert right.text[2] == "cat  <span style='color:#777777'>0.63</span>"  # the chosen query's weight per key
    assert right.text[0].startswith("[CLS]") and all(right.text[j] == tok for j, tok in enumerate(layers[3].tokens)
                                                     if w[9, j] < 0.01)


def test_chosen_query_shows_kept_weights_and_lost_ones_in_red(run):
    layers, dense, topk = run
    dw, sw, mask = dense[3].weights[0, 1].numpy(), topk[3].weights[0, 1].numpy(), topk[3].mask[0, 1].numpy()
    fig = line_view(dw, layers[3].tokens, sparse=sw, mask=mask, query=9, method_name="top-4")
    right = [tr for tr in fig.data if tr.mode == "text+markers" and tr.textposition == "middle right"][1]
    assert (right.xaxis, int(mask[9].sum())) == ("x2", 4)
    for j in range(len(dw)):
        if mask[9, j]:
            assert f"{sw[9, j]:.2f}</span>" in right.text[j] and "#777777" in right.text[j]
        elif dw[9, j] >= 0.01:
            assert right.text[j].endswith(f"<span style='color:{DROPPED_COLOUR}'>{dw[9, j]:.2f}</span>")
    assert f"{sw[9, 2]:.2f}" != f"{dw[9, 2]:.2f}"  # kept weights are renormalised over the 4 keys


def test_sparse_panel_shows_kept_links_at_sparse_weight_and_dropped_at_dense(run):
    layers, dense, topk = run
    dw, sw, mask = dense[3].weights[0, 1].numpy(), topk[3].weights[0, 1].numpy(), topk[3].mask[0, 1].numpy()
    assert not mask.all()  # top-4 of 15 keys drops links
    fig = line_view(dw, layers[3].tokens, sparse=sw, mask=mask, method_name="top-4")
    assert drawn(fig, "x") == drawn(fig, "x", DENSE_COLOUR)  # the dense panel is untouched
    kept = {k: v for k, v in drawn(fig, "x2").items() if k not in drawn(fig, "x2", DROPPED_COLOUR)}
    dropped = drawn(fig, "x2", DROPPED_COLOUR)
    assert set(kept) == {(i, j) for i, j in zip(*np.nonzero(mask)) if sw[i, j] >= LINE_FLOOR}
    assert set(dropped) == {(i, j) for i, j in zip(*np.nonzero(~mask)) if dw[i, j] >= LINE_FLOOR}
    assert dropped, "top-4 drops visible links on this head"
    for (i, j), op in kept.items():
        assert abs(op - sw[i, j]) <= OPACITY_STEP / 2 + 1e-9
    for (i, j), op in dropped.items():
        assert abs(op - dw[i, j]) <= OPACITY_STEP / 2 + 1e-9
    # Each row's kept links are at most k = 4, and the legend names both kinds once.
    assert max(sum(1 for i, _ in kept if i == r) for r in range(len(dw))) <= 4
    legend = [tr.name for tr in fig.data if tr.showlegend is not False and tr.x == (None,)]
    assert legend == ["kept by top-4", "dropped by top-4 (drawn at its dense weight)"]


def test_long_text_draws_the_first_tokens_and_says_so():
    w = torch.softmax(torch.randn(80, 80), -1)
    fig = line_view(w, [f"t{i}" for i in range(80)], max_tokens=20)
    assert max(max(link) for link in drawn(fig)) < 20
    assert "(the first 20 of 80 tokens)" in fig.layout.title.text


def test_line_view_refuses_bad_input():
    w = torch.softmax(torch.randn(5, 5), -1)
    with pytest.raises(ValueError, match="tokens must have one string per query"):
        line_view(w, ["a"])
    with pytest.raises(ValueError, match="square"):
        line_view(torch.rand(5, 4), list("abcde"))
    with pytest.raises(ValueError, match="sparse and mask go together"):
        line_view(w, list("abcde"), sparse=w)
    with pytest.raises(ValueError, match="query must be <= 4"):
        line_view(w, list("abcde"), query=5)
    with pytest.raises(TypeError, match="dense must be a 2-d tensor"):
        line_view([[1.0]], ["a"])


def test_overview_has_one_map_per_layer_and_head(run):
    layers, dense, _ = run
    weights = torch.stack([d.weights[0] for d in dense])  # (6, 12, L, L)
    fig = overview(weights, layer=3, head=1, lang="en")
    maps = [tr for tr in fig.data if tr.type == "heatmap"]
    assert len(maps) == 6 * 12
    # Subplot (3, 1) is trace 3 * 12 + 1; its map is that head's weights, and the red frame sits on its axes.
    tile = maps[3 * 12 + 1]
    assert np.allclose(np.asarray(tile.z), weights[3, 1].numpy(), atol=1e-7)
    (frame,) = fig.layout.shapes
    assert (frame.xref, frame.yref) == (f"x{3 * 12 + 2} domain", f"y{3 * 12 + 2} domain") == (
        f"{tile.xaxis} domain", f"{tile.yaxis} domain")
    labels = [a.text for a in fig.layout.annotations]
    assert labels == [f"head {h}" for h in range(12)] + [f"layer {i}" for i in range(6)]
    # No tick labels on the tiny maps (they would be squashed); one colour scale for all.
    axes = {k: v for k, v in fig.layout.to_plotly_json().items() if k.startswith(("xaxis", "yaxis"))}
    assert len(axes) == 2 * 72 and all(ax.get("showticklabels") is False for ax in axes.values())
    assert {tr.coloraxis for tr in maps} == {"coloraxis"}
    assert fig.layout.coloraxis.cmax == pytest.approx(float(weights.max()))


def test_overview_pools_long_inputs_and_checks_its_arguments():
    w = torch.softmax(torch.randn(2, 3, 100, 100), -1)
    fig = overview(w, max_cells=25, lang="zh")
    assert np.asarray(fig.data[0].z).shape == (25, 25)
    assert fig.layout.title.text.endswith(t("viz.pooled", "zh", mode=t("viz.pool_max", "zh"), sq=4, sk=4))
    assert not fig.layout.shapes  # no frame without a chosen layer and head
    with pytest.raises(ValueError, match="layers, heads, Lq, Lk"):
        overview(w[0])
    with pytest.raises(ValueError, match="layer must be <= 1"):
        overview(w, layer=2, head=0)
    with pytest.raises(TypeError, match="weights must be"):
        overview("maps")


def test_panel_cache_and_render_under_apptest():
    """model_panel.render on the model source: both charts, with the example's link and 6 x 12 tiles."""
    from streamlit.testing.v1 import AppTest

    def script():
        import streamlit as st

        from sparse_attn.sources.sentences import sentence
        from sparse_attn.ui import model_panel, state

        s = state.defaults()
        s.update(source="model", text=sentence("en_cat").text, layer=3, top_k=4)
        st.session_state.setdefault("head", 1)
        st.session_state.setdefault(model_panel.EXAMPLE_KEY, "en_cat")
        model_panel.render(s, "en")

    at = AppTest.from_function(script, default_timeout=120).run()
    assert not at.exception, at.exception
    specs = {c.proto.id: chart_spec(c) for c in chart_elements(at)}
    assert len(specs) == 2

    figs = list(specs.values())
    over, lines = sorted(figs, key=lambda f: -sum(tr["type"] == "heatmap" for tr in f["data"]))
    assert sum(tr["type"] == "heatmap" for tr in over["data"]) == 72
    assert "layer 3, head 1" in lines["layout"]["title"]["text"]
    assert any("weight 0.630" in (tx or "") for tr in lines["data"] if tr.get("mode") == "lines" for tx in tr["text"])
    assert any("63%" in i.value and "“it” (9)" in i.value and "“cat” (2)" in i.value for i in at.info)

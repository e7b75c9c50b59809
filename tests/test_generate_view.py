"""The generating view: bytes per token against the formulas, each drawn step against a decoder run on its own, the panel."""
import base64
import re
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from sparse_attn import viz_decode
from sparse_attn.decode import DECODERS, KVCache, bytes_per_step, decode
from sparse_attn.i18n import LANGS, t
from sparse_attn.methods import METHODS, Config, SettingError
from sparse_attn.sources import synthetic_qkv
from sparse_attn.ui import compute, errors, generate, state, threads
from sparse_attn.ui.charts import elements as chart_elements
from sparse_attn.ui.charts import spec as chart_spec
from sparse_attn.viz_decode import BY_POSITION, BY_SCORE, EVERY_KEY, FUTURE, SKIPPED

MIB = 2**20
# Small blocks so that 40 tokens hold several: partial pages and blocks, forced blocks, sinks inside the window.
CFG = Config(top_k=5, token_budget=7, page_size=4, compress_block_size=4, selection_block_size=8,
             num_selected_blocks=3, num_initial_blocks=1, num_local_blocks=1, sliding_window_size=6, num_sink_tokens=2)


# ---- bytes per new token ----------------------------------------------------------------------------------

def test_dense_bytes_are_two_rows_of_every_kv_head_per_key():
    rows = viz_decode.bytes_rows(Config(), **generate.MODEL_SHAPE)
    dense = {r["length"]: r["bytes_per_token"] for r in rows if r["method"] == "dense"}
    assert sorted(dense) == list(viz_decode.BYTES_LENGTHS) == [2**n for n in range(10, 18)]
    for L, b in dense.items():
        assert b == 2 * L * 4 * 128 * 2  # 2 (K and V) * Lk * Hkv * D * itemsize
    assert dense[131072] == 256 * MIB and dense[65536] == 128 * MIB  # the 128 MiB at 64k


def test_every_row_is_bytes_per_step_and_the_methods_follow_the_settings():
    cfg = replace(Config(), top_k=64, sliding_window_size=100)
    shape = dict(num_heads=8, num_kv_heads=2, head_dim=32, itemsize=4)
    rows = viz_decode.bytes_rows(cfg, lengths=(100, 5000), **shape)
    assert {r["method"] for r in rows} == set(DECODERS) and len(rows) == 2 * len(DECODERS)
    for r in rows:
        assert r["bytes_per_token"] == bytes_per_step(r["method"], r["length"], cfg, **shape)
    streaming = [r["bytes_per_token"] for r in rows if r["method"] == "streaming_llm"]
    assert streaming == [2 * 2 * 32 * 4 * 100, 2 * 2 * 32 * 4 * 104]  # min(L, sinks + window) rows


def test_the_ratio_table_is_the_longest_lengths_bytes():
    rows = viz_decode.bytes_rows(Config(), **generate.MODEL_SHAPE)
    for lang in LANGS:
        table = generate.ratio_table(rows, lang)
        assert list(table.columns) == [t("gen.col.method", lang), t("gen.col.mib", lang, n="128k"),
                                       t("gen.col.ratio", lang)]
        for m, (_, row) in zip(DECODERS, table.iterrows()):
            want = bytes_per_step(m, 131072, Config(), **{k: v for k, v in generate.MODEL_SHAPE.items()})
            assert row.iloc[0] == viz_decode.gen_method_label(m, lang)
            assert float(row.iloc[1].replace(",", "")) == pytest.approx(want / MIB, abs=0.005)
            assert float(row.iloc[2].rstrip("×")) == pytest.approx(256 * MIB / want, abs=0.05)


@pytest.mark.parametrize("bad, match", [
    (dict(num_heads=6, num_kv_heads=4), "num_heads"),
    (dict(head_dim=0), "head_dim"),
    (dict(methods=("dense", "sampling")), "methods"),
    (dict(lengths=(0,)), "lengths"),
])
def test_bytes_rows_name_the_bad_argument(bad, match):
    args = {**generate.MODEL_SHAPE, **bad}
    with pytest.raises(ValueError, match=match):
        viz_decode.bytes_rows(Config(), **args)


def test_the_bytes_figure_draws_each_method_in_mib_in_both_languages():
    rows = viz_decode.bytes_rows(Config(), **generate.MODEL_SHAPE)
    for lang in LANGS:
        fig = viz_decode.bytes_figure(rows, lang)
        assert [tr.name for tr in fig.data] == [viz_decode.gen_method_label(m, lang) for m in DECODERS]
        assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
        assert list(fig.data[0].y) == pytest.approx([2 * L * 4 * 128 * 2 / MIB for L in viz_decode.BYTES_LENGTHS])
    with pytest.raises(ValueError, match="rows"):
        viz_decode.bytes_figure([])


# ---- the selection over a growing cache -------------------------------------------------------------------

def qkv(L=40, H=4, Hkv=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, H, L, D, generator=g), torch.randn(1, Hkv, L, D, generator=g),
            torch.randn(1, Hkv, L, D, generator=g))


def alone(method, q, k, v, pos, cfg):
    """The step at ``pos`` decoded on its own: a cache filled with tokens 0..pos in one append."""
    cache = KVCache.for_config(cfg, 1, k.shape[1], pos + 1, k.shape[-1]).append(k[:, :, : pos + 1], v[:, :, : pos + 1])
    return decode(method, q[:, :, pos : pos + 1], cache, cfg)


@pytest.mark.parametrize("method", tuple(DECODERS))
def test_each_drawn_step_is_what_that_token_reads_when_decoded_on_its_own(method):
    q, k, v = qkv()
    H, L = q.shape[1], k.shape[2]
    grid = viz_decode.decode_steps(method, q, k, v, CFG, max_steps=16)
    assert list(grid.steps) == list(range(L - 1, -1, -3))[::-1]  # every 3rd token (ceil(40 / 16)), ending at the last
    for row, pos in enumerate(grid.steps):
        r = alone(method, q, k, v, int(pos), CFG)
        cats = grid.categories[:, row]
        assert (cats[:, pos + 1 :] == FUTURE).all() and (cats[:, : pos + 1] != FUTURE).all()
        mask = r.selection.token_mask()[0, :, 0]  # (H, Hkv or 1, n): per head, per KV group or shared
        want = mask.repeat_interleave(H // mask.shape[0], dim=0).numpy()
        assert ((cats[:, : pos + 1] >= BY_SCORE) == want).all(), (method, pos)
        assert (cats[:, : pos + 1][~want] == SKIPPED).all()
        if method == "dense":
            assert (cats[:, : pos + 1] == EVERY_KEY).all()
        assert grid.bytes_read[row] == r.bytes_read.total
        assert grid.dense_bytes[row] == 2 * (pos + 1) * 2 * 8 * 4  # K and V rows of both KV heads, float32


def test_streaming_llm_reads_its_sinks_and_window_by_position_and_nothing_by_score():
    q, k, v = qkv()
    grid = viz_decode.decode_steps("streaming_llm", q, k, v, CFG)
    assert len(grid.steps) == 40 and not (grid.categories == BY_SCORE).any()
    for row, pos in enumerate(grid.steps):
        kept = {j for j in range(pos + 1) if j < 2 or j > pos - 6}
        assert set(np.flatnonzero(grid.categories[0, row] == BY_POSITION)) == kept


def test_nsa_marks_its_window_and_forced_blocks_by_position_and_picked_blocks_by_score():
    q, k, v = qkv(L=64)
    grid = viz_decode.decode_steps("nsa", q, k, v, CFG)
    pos = 63  # blocks of 8: the first (initial) and the query's own (local) are forced, the window is keys 58..63
    last = grid.categories[0, -1]
    positional = set(np.flatnonzero(last == BY_POSITION))
    assert set(range(8)) | set(range(56, 64)) <= positional == set(range(8)) | set(range(56, 64))
    picked = np.flatnonzero(last == BY_SCORE)
    assert len(picked) == 8 and len({j // 8 for j in picked}) == 1  # 3 slots: 2 forced, one block by score
    assert grid.keys_read(0) == 24 and grid.steps[-1] == pos


def test_topk_and_quest_pick_by_score_only():
    q, k, v = qkv()
    for method, per_row in (("topk", lambda pos: min(5, pos + 1)), ("quest", None)):
        grid = viz_decode.decode_steps(method, q, k, v, CFG)
        assert not (grid.categories == BY_POSITION).any()
        if per_row:
            assert all(grid.keys_read(h, row) == per_row(p) for h in range(4) for row, p in enumerate(grid.steps))


def test_decode_steps_refuses_bad_input():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="method"):
        viz_decode.decode_steps("sampling", q, k, v, CFG)
    with pytest.raises(ValueError, match="q must hold"):
        viz_decode.decode_steps("dense", q[:, :, :5], k, v, CFG)
    with pytest.raises(ValueError, match="max_steps"):
        viz_decode.decode_steps("dense", q, k, v, CFG, max_steps=0)
    with pytest.raises(ValueError, match="k must be a 4-d"):
        viz_decode.decode_steps("dense", q, k[0], v, CFG)


def test_the_steps_figure_names_each_kind_of_cell_in_both_languages():
    q, k, v = qkv()
    grid = viz_decode.decode_steps("nsa", q, k, v, CFG)
    for lang in LANGS:
        fig = viz_decode.steps_figure(grid, 1, lang)
        names = [tr.name for tr in fig.data]
        assert names == [t("decode.cell.skipped", lang), t("decode.cell.score.nsa", lang),
                         t("decode.cell.position.nsa", lang), t("gen.method.dense", lang), t("method.nsa", lang)]
        assert fig.layout.title.text == t("decode.steps.title", lang, method=t("method.nsa", lang), h=1)
        assert list(fig.data[-1].x) == pytest.approx(list(grid.bytes_read / 1024))
    with pytest.raises(ValueError, match="head"):
        viz_decode.steps_figure(grid, 4)
    with pytest.raises(TypeError, match="StepGrid"):
        viz_decode.steps_figure("nsa")


def test_the_step_by_step_view_is_cheap_at_the_defaults():
    s = state.defaults()
    q, k, v = generate.gen_input(s)
    cfg = compute.config(s)
    times = []
    with threads.one_thread():  # as the panel runs it
        viz_decode.decode_steps(s["method"], q, k, v, cfg)  # the first call warms torch's kernels up
        for _ in range(3):
            start = time.perf_counter()
            viz_decode.decode_steps(s["method"], q, k, v, cfg)
            times.append(time.perf_counter() - start)
    # 0.05-0.07 s on 2 shared cores; the bound leaves room for a machine busy with other jobs.
    assert sorted(times)[1] < 0.3, times


# ---- the panel ----------------------------------------------------------------------------------------------

SCRIPT = """
import streamlit as st
from sparse_attn.ui import generate, state

state.init_state()
generate.render(state.settings(st.session_state), st.session_state["lang"])
"""


@pytest.fixture
def panel(tmp_path, monkeypatch):
    log = tmp_path / "calls.log"
    monkeypatch.setenv(compute.CALL_LOG_ENV, str(log))
    generate.steps_data.clear()
    generate.bytes_data.clear()
    path = tmp_path / "panel.py"
    path.write_text(SCRIPT, encoding="utf-8")

    def make(**query):
        at = AppTest.from_file(str(path), default_timeout=60)
        for key, value in query.items():
            at.query_params[key] = value
        return at

    make.calls = lambda: log.read_text().split().count("generate_steps") if log.exists() else 0
    return make


def _chart_json(at, i):
    return chart_spec(chart_elements(at)[i])


def _decode_array(a):
    if isinstance(a, dict) and "bdata" in a:
        return np.frombuffer(base64.b64decode(a["bdata"]), a["dtype"])
    return np.asarray(a, dtype=float)


@pytest.mark.parametrize("lang", LANGS)
def test_the_panel_states_the_numbers_of_its_pictures(panel, lang):
    at = panel(lang=lang, method="nsa", pattern="sink_local")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="gen_method").value == "nsa"  # the sidebar's method
    assert len(chart_elements(at)) == 2
    # The table: the large model's bytes per token at 128k, as bytes_per_step counts them.
    table = at.dataframe[0].value
    cfg = compute.config(state.from_query({"method": "nsa"}))
    for m, (_, row) in zip(DECODERS, table.iterrows()):
        want = bytes_per_step(m, 131072, cfg, **generate.MODEL_SHAPE)
        assert float(row.iloc[1].replace(",", "")) == pytest.approx(want / MIB, abs=0.005)
    # The caption under the steps: the numbers of a fresh run of the decoders on the same input.
    s = state.from_query({"method": "nsa", "pattern": "sink_local"})
    q, k, v = generate.gen_input(s)
    grid = viz_decode.decode_steps("nsa", q, k, v, compute.config(s))
    captions = [c.value for c in at.caption]
    assert generate.steps_caption(grid, 0, lang) in captions
    read, dense = int(grid.bytes_read[-1]), int(grid.dense_bytes[-1])
    assert dense == 2 * 256 * 4 * 64 * 4 and read == alone("nsa", q, k, v, 255, compute.config(s)).bytes_read.total
    numbers = re.findall(r"\d+(?:\.\d+)?", generate.steps_caption(grid, 0, lang))
    assert f"{read / 1024:.1f}" in numbers and f"{dense / 1024:.1f}" in numbers and str(grid.keys_read(0)) in numbers
    for picture in ("generate_bytes", "generate_steps"):  # each picture's reading note, with its chapter
        assert any(c.startswith(t(f"guide.{picture}", lang)) and f"notebooks/{lang}/ch8_decode.ipynb" in c
                   for c in captions), picture
    # The heatmap in the browser is the grid: its read cells are the ones the decoder read.
    spec = _chart_json(at, 1)
    score = next(tr for tr in spec["data"] if tr.get("name") == t("decode.cell.score.nsa", lang))
    z = _decode_array(score["z"]).reshape(len(grid.steps), grid.length)
    assert np.array_equal(~np.isnan(z), grid.categories[0] == BY_SCORE)


def test_head_and_language_redraw_without_recomputing_and_the_picker_follows_the_sidebar(panel):
    at = panel(method="topk", H="4")
    at.run()
    assert at.selectbox(key="gen_method").value == "topk" and panel.calls() == 1
    at.slider(key="gen_head").set_value(3).run()
    at.session_state["lang"] = "zh"
    at.run()
    assert not at.exception and panel.calls() == 1
    assert any(c.value.startswith("图中最后一步") and "注意力头 3" in c.value for c in at.caption)
    at.selectbox(key="gen_method").select("quest").run()
    assert panel.calls() == 2
    at.session_state["method"] = "sampling"  # no decoder: the picker keeps what the student chose
    at.run()
    assert at.selectbox(key="gen_method").value == "quest"
    at.session_state["method"] = "streaming_llm"
    at.run()
    assert at.selectbox(key="gen_method").value == "streaming_llm" and not at.exception


def test_a_method_without_a_decoder_starts_the_picker_at_nsa(panel):
    at = panel(method="sampling")
    at.run()
    assert not at.exception and at.selectbox(key="gen_method").value == "nsa"


@pytest.mark.parametrize("lang", LANGS)
def test_settings_a_decoder_refuses_leave_it_out_with_a_message_not_a_traceback(panel, lang):
    at = panel(lang=lang, method="topk", k="0")
    at.run()
    assert not at.exception
    names = list(at.dataframe[0].value.iloc[:, 0])
    assert viz_decode.gen_method_label("topk", lang) not in names and len(names) == len(DECODERS) - 1
    with pytest.raises(SettingError) as refused:
        METHODS["topk"].validate(Config(top_k=0))
    why = errors.message(refused.value, lang)
    assert why == t("err.k_too_small", lang, value=0)  # the sidebar's own words for it, in the reader's language
    label = viz_decode.gen_method_label("topk", lang)
    assert t("gen.left_out", lang, method=label, why=why) in [c.value for c in at.caption]
    assert [w.value for w in at.warning] == [t("gen.method_refused", lang, method=label, why=why)]


def test_the_sidebars_shape_and_a_model_input_are_said(panel):
    at = panel(source="model", H="2", D="32", dtype="bfloat16")
    at.run()
    assert not at.exception
    at.radio(key="gen_shape").set_value("sidebar").run()
    spec = _chart_json(at, 0)
    dense = _decode_array(spec["data"][0]["y"])
    assert dense == pytest.approx([2 * L * 2 * 32 * 2 / MIB for L in viz_decode.BYTES_LENGTHS])
    pattern = t("pattern.local", "en")
    assert t("gen.synthetic_only", "en", pattern=pattern) in [c.value for c in at.caption]


def test_the_input_is_the_sidebars_pattern_capped_and_causal_where_the_pattern_places_matches():
    s = {**state.defaults(), "pattern": "retrieval", "L": 1024, "H": 2, "D": 32}
    q, k, v = generate.gen_input(s)
    assert q.shape == (1, 2, generate.GEN_MAX_LEN, 32)
    want = synthetic_qkv("retrieval", heads=2, length=256, head_dim=32, seed=0, causal=True)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), want))

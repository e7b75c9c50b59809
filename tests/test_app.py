"""The Streamlit app under AppTest: defaults, every source x method, k, language, URL, bad input."""
import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from sparse_attn import viz
from sparse_attn.i18n import LANGS, t
from sparse_attn.methods import METHODS, choices
from sparse_attn.sources import KINDS
from sparse_attn.ui.charts import elements as chart_elements
from sparse_attn.ui.charts import spec as chart_spec
from sparse_attn.ui.state import TABS

APP = str(Path(__file__).resolve().parent.parent / "app.py")
CJK = re.compile(r"[\u4e00-\u9fff]")


def run_app(**query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    for key, value in query.items():
        at.query_params[key] = str(value)
    return at.run()


def ok(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]


def spec(at: AppTest, i: int = 0) -> dict:
    return chart_spec(chart_elements(at)[i])


def z(trace: dict) -> np.ndarray:
    zz = trace["z"]
    if isinstance(zz, dict):
        return np.frombuffer(base64.b64decode(zz["bdata"]), zz["dtype"]).reshape([int(n) for n in zz["shape"].split(",")])
    return np.asarray(zz, dtype=float)


def chart_texts(fig: dict) -> list[str]:
    lay = fig["layout"]
    out = [lay["title"]["text"]]
    for name, axis in lay.items():
        if re.fullmatch(r"[xy]axis\d*", name) and "title" in axis and axis["title"].get("text"):
            out.append(axis["title"]["text"])
    out += [a["text"] for a in lay.get("annotations", [])]
    return out


def visible_labels(at: AppTest) -> list[str]:
    """Every label a reader sees: widgets, tabs, title, headers, metric labels, chart titles and axes."""
    labels = [at.title[0].value, *[h.value for h in at.header], *[h.value for h in at.subheader]]
    labels += [tab.label for tab in at.tabs]
    for kind in ("radio", "selectbox", "slider", "select_slider", "toggle", "number_input", "text_area", "button",
                 "multiselect"):
        labels += [w.label for w in at.get(kind)]
    labels += [m.label for m in at.metric]
    for i in range(len(chart_elements(at))):
        labels += chart_texts(spec(at, i))
    return labels


def test_defaults_run_and_show_maps_and_metrics():
    at = run_app()
    ok(at)
    assert not at.error
    fig = spec(at)
    # dense, sparse, difference, then the mask: one heatmap per category (not selected, selected), with its legend
    assert sum(tr["type"] == "heatmap" for tr in fig["data"]) == 5
    dense, sparse = z(fig["data"][0]), z(fig["data"][1])
    assert dense.shape == sparse.shape == (256, 256)
    # The maps are cached as float16 (about 3 significant digits, as many as the hover shows): each of a
    # row's 256 weights is off by at most half a float16 step, so the row sums stay within 1e-3 of 1.
    np.testing.assert_allclose(dense.sum(1), 1, atol=1e-3)
    assert ((sparse > 0).sum(1) <= 32).all()  # k = 32 keys per query at most
    labels = [m.label for m in at.metric]
    for key in ("mass_kept", "relative_error", "sparsity", "keys_scored", "keys_attended", "flops", "memory"):
        assert t(f"metric.{key}", "en") in labels
    assert at.query_params["lang"] == "en"


@pytest.mark.parametrize("source", KINDS)
def test_every_source_and_method_runs(source):
    at = run_app(source=source)
    for method in choices("method"):
        at.sidebar.selectbox(key="method").set_value(method).run()
        ok(at)
        if source == "file":  # nothing uploaded yet: a message in place of the picture, the page still works
            assert [e.value for e in at.error] == [t("err.no_upload", "en")]
            assert len(at.tabs) == len(TABS)
        else:
            assert not at.error, [e.value for e in at.error]
            # maps and head grid; NSA adds its branches, blocks and gates; the model its line view and overview
            charts = 2 + 3 * (method == "nsa") + 2 * (source == "model")
            assert len(chart_elements(at)) == charts and len(at.metric) == 7


def test_changing_k_changes_the_sparse_map_and_the_metrics():
    at = run_app()
    before_map, before_metrics = z(spec(at)["data"][1]), [m.value for m in at.metric]
    at.sidebar.slider(key="top_k").set_value(4).run()
    ok(at)
    after_map, after_metrics = z(spec(at)["data"][1]), [m.value for m in at.metric]
    assert not np.array_equal(before_map, after_map)
    assert ((after_map > 0).sum(1) <= 4).all()
    assert before_metrics[0] != after_metrics[0] and before_metrics[4] != after_metrics[4]  # mass kept, keys attended
    assert at.query_params["k"] == "4"


def test_block_and_window_bounds_follow_the_sequence_length():
    at = run_app(method="nsa", L=256, block=16, nblocks=40, window=1000)
    ok(at)
    sliders = {w.key: w for w in at.sidebar.slider}
    assert sliders["num_selected_blocks"].max == 256 // 16 and sliders["num_selected_blocks"].value == 16
    assert sliders["sliding_window_size"].max == 256 and sliders["sliding_window_size"].value == 256
    at.sidebar.select_slider(key="L").set_value(1024).run()  # a longer input widens both bounds again
    ok(at)
    sliders = {w.key: w for w in at.sidebar.slider}
    assert sliders["num_selected_blocks"].max == 1024 // 16 and sliders["sliding_window_size"].max == 1024


@pytest.mark.parametrize("lang", LANGS)
def test_a_budget_that_keeps_every_key_says_nothing_was_dropped(lang):
    at = run_app(lang=lang, L=32, H=1, k=64)  # k >= L: top-k is dense attention
    ok(at)
    notes = [i.value for i in at.info]
    assert t("note.all_keys_kept", lang, keys=32) in notes
    fig = spec(at)
    assert np.allclose(z(fig["data"][0]), z(fig["data"][1]), atol=1e-6)  # the maps say the same (up to rounding)
    assert fig["layout"]["coloraxis2"]["cmax"] == viz.DIFF_FLOOR  # and the rounding noise left shows white
    at.sidebar.slider(key="top_k").set_value(8).run()  # now keys are dropped: no such notice
    ok(at)
    assert not any(n.startswith(t("note.all_keys_kept", lang, keys=32)[:8]) for n in (i.value for i in at.info))


@pytest.mark.parametrize("query", [{}, {"method": "nsa"}, {"view": "explain"}, {"view": "speed"},
                                   {"view": "budget", "L": 32, "H": 1}, {"source": "model"}])
def test_language_switch_changes_every_visible_label(query):
    at = run_app(**query)
    en = visible_labels(at)
    at.sidebar.radio(key="lang").set_value("zh").run()
    ok(at)
    zh = visible_labels(at)
    assert len(en) == len(zh) and len(en) > 20
    unchanged = [(a, b) for a, b in zip(en, zh) if a == b and a != "k"]
    assert not unchanged
    assert all(CJK.search(b) for a, b in zip(en, zh) if a != "k"), [b for b in zh if not CJK.search(b)]
    assert at.query_params["lang"] == "zh"


def test_url_restores_settings_and_language():
    at = run_app(lang="zh", L=128, k=8, method="hybrid", causal="true", head=2, log="true", view="maps")
    ok(at)
    ss = at.session_state
    assert (ss["L"], ss["top_k"], ss["method"], ss["causal"], ss["head"], ss["log"]) == (128, 8, "hybrid", True, 2, True)
    assert at.title[0].value == t("app.title", "zh")
    assert z(spec(at)["data"][0]).shape == (128, 128)
    # And the URL the page writes back opens the same view.
    again = run_app(**dict(at.query_params))
    ok(again)
    assert z(spec(again)["data"][1]).tolist() == z(spec(at)["data"][1]).tolist()


def test_bad_url_values_fall_back_to_defaults():
    at = run_app(L=12345, k="lots", method="magic", lang="xx", head=-1)
    ok(at)
    assert (at.session_state["L"], at.session_state["top_k"], at.session_state["method"]) == (256, 32, "topk")
    assert not at.error


@pytest.mark.parametrize("name", ["sampled", "sampled:lsh", "full_topk", "dense", "nsa_selected"])
def test_a_method_that_is_not_a_registry_method_falls_back_to_the_default(name):
    at = run_app(method=name)
    ok(at)
    assert at.session_state["method"] == "topk" and not at.error
    assert "method" not in at.query_params  # the page writes back the default, which the URL leaves out


# The query-string keys of shared links; the URL must keep reading them whatever the settings are called.
URL_KEYS = ("lang", "source", "pattern", "text", "layer", "L", "H", "D", "method", "k", "samples", "proposal", "block",
            "nblocks", "window", "initial", "local", "sinks", "tokens", "page", "chunk", "causal", "device", "dtype",
            "seed", "head", "log", "pool", "view", "lesson")


def test_the_url_keeps_its_short_keys_and_maps_them_to_the_setting_names():
    from sparse_attn.methods import Config
    from sparse_attn.ui import compute, state

    assert tuple(state.url_key(name) for name in state.specs()) == URL_KEYS
    s = state.from_query({"k": 8, "samples": 99, "block": 32, "nblocks": 3, "window": 64, "chunk": 128,
                          "proposal": "uniform", "causal": True, "seed": 5, "method": "nsa"})
    assert compute.config(s) == Config(top_k=8, num_samples=99, proposal="uniform", chunk_size=128,
                                       compress_block_size=32, selection_block_size=32, num_selected_blocks=3,
                                       sliding_window_size=64, causal=True, seed=5)
    assert s["method"] == "nsa" and state.from_query({"k": "lots"})["top_k"] == state.defaults()["top_k"] == 32
    # The one block slider sets both NSA block sizes.
    at = run_app(method="nsa", block=32)
    ok(at)
    at.sidebar.select_slider(key="selection_block_size").set_value(64).run()
    ok(at)
    assert at.query_params["block"] == "64" and not at.error


def test_every_setting_the_budget_can_name_is_a_labelled_slider_in_both_languages():
    from sparse_attn.ui import errors
    from sparse_attn.ui.memory import BudgetError

    names = {"seq_len", "heads", "head_dim"}
    names |= {p for key in choices("method") + choices("timing") + choices("reference") for p in METHODS[key].params
              if p != "proposal"}
    for lang in LANGS:
        for name in names:
            exc = BudgetError("budget", "over", need_mb=3000, budget_mb=2048, setting=name)
            label = errors.setting_label(name, lang)
            assert errors.message(exc, lang) == t("err.budget", lang, need_mb=3000, budget_mb=2048, setting=label)
    assert errors.setting_label("compress_block_size", "zh") == t("setting.selection_block_size", "zh")


def test_k_zero_shows_a_translated_message_and_the_rest_works():
    at = run_app(lang="zh")
    at.sidebar.slider(key="top_k").set_value(0).run()
    ok(at)
    assert [e.value for e in at.error] == [t("err.k_too_small", "zh", value=0)]
    assert not chart_elements(at)
    at.sidebar.slider(key="top_k").set_value(16).run()
    ok(at)
    assert not at.error and chart_elements(at)


def test_over_budget_settings_are_refused_naming_the_setting():
    at = run_app(L=8192, H=16)
    ok(at)
    [err] = at.error
    assert t("setting.seq_len", "en") in err.value and "MiB" in err.value
    assert not chart_elements(at) and len(at.tabs) == len(TABS)


def test_other_tabs_run():
    at = run_app(view="budget", L=64, H=2)
    ok(at)
    assert not at.error
    fig = spec(at)
    assert {tr["name"] for tr in fig["data"]} >= {t("method.topk", "en")}
    assert fig["layout"]["xaxis"]["type"] == "log"
    at = run_app(view="speed", L=64, H=2)
    at.multiselect(key="sp_lengths").set_value([64, 128])
    at.button(key="sp_run").click().run()
    ok(at)
    assert at.success and not at.error
    fig = spec(at)
    assert fig["layout"]["xaxis"]["type"] == "log" and fig["layout"]["yaxis"]["type"] == "log"
    assert len(fig["data"]) == 3  # dense SDPA, full-score top-k, streaming top-k


def test_uploaded_file_and_pickle_through_the_app_code():
    from sparse_attn.ui import compute, errors, state

    s = state.defaults() | {"source": "file"}
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buf, q=rng.standard_normal((1, 2, 20, 8), dtype=np.float32),
             k=rng.standard_normal((1, 2, 20, 8), dtype=np.float32), v=rng.standard_normal((1, 2, 20, 8), dtype=np.float32))
    data = compute.view({k: s[k] for k in compute.COMPUTE_KEYS}, ("qkv.npz", buf.getvalue()))
    assert data["shape"] == (2, 20, 20) and 0 < data["metrics"]["mass_kept"] <= 1
    assert compute.pick(data, 5, "max")["head"] == 1  # clamped to the heads the file has
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError) as info:
        compute.view({k: s[k] for k in compute.COMPUTE_KEYS}, ("evil.npy", pickled.getvalue()))
    for lang in ("en", "zh"):
        msg = errors.message(info.value, lang)
        assert "evil.npy" in msg and msg != str(info.value)


def test_a_failing_computation_breaks_only_its_panel(monkeypatch):
    from sparse_attn.ui import compute

    def boom(*args, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(compute, "view", boom)
    at = run_app(lang="zh")
    ok(at)
    [err] = at.error
    assert err.value.startswith(t("err.unexpected", "zh", detail="X").split("（")[0]) and "injected fault" in err.value
    assert len(at.tabs) == len(TABS) and at.sidebar.slider(key="top_k").value == 32


def test_timing_sweep_stops_at_its_time_budget_and_locks_are_shared():
    from sparse_attn.ui import speed, state

    s = state.defaults() | {"H": 1, "D": 16}
    df, cancelled = speed.run_sweep(s, [64], 0.0, "en")
    assert cancelled and df.empty
    df, cancelled = speed.run_sweep(s, [64, 128], 60.0, "en", min_run_time=0.01)
    assert not cancelled and len(df) == 2 * len(speed.timed_methods(s))
    assert (df["median_ms"] > 0).all() and (df["runs"] >= 3).all()
    assert speed.device_locks() is speed.device_locks() and set(speed.device_locks()) == set(state.devices())
    # A point predicted (from the shorter ones) to overrun the budget is not started.
    df, cancelled = speed.run_sweep(s, [64, 8192], 5.0, "en", min_run_time=0.01)
    # Streaming top-k at L = 8192 (4096x the 64-point's work, about 0.5 ms there) cannot fit in 5 s: never started.
    assert cancelled and not ((df["method"] == "topk") & (df["seq_len"] == 8192) & (df["runs"] > 0)).any()

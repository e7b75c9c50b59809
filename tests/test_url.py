"""Shared links: what the URL sets, what it ignores (and says so), how text travels, and each key written once."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from sparse_attn.i18n import LANGS, t
from sparse_attn.ui import state

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def run_app(**query) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    for key, value in query.items():
        at.query_params[key] = value if isinstance(value, list) else str(value)
    return at.run()


def ok(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]


def test_read_query_lists_bad_values_and_unknown_keys_in_the_urls_order():
    s, ignored = state.read_query({"L": "12345", "k": "8", "foo": "1", "method": "magic", "lang": "zh-CN", "causal": "yes"})
    assert (s["L"], s["top_k"], s["method"], s["lang"], s["causal"]) == (256, 8, "topk", "zh", True)
    assert ignored == [("L", "12345"), ("foo", "1"), ("method", "magic")]
    assert state.read_query({})[1] == [] and state.read_query({})[0] == state.defaults()
    # Values the sidebar would otherwise replace without a word are checked here too.
    s, ignored = state.read_query({"source": "web", "pattern": "spiral"})
    assert (s["source"], s["pattern"]) == ("synthetic", "local") and [k for k, _ in ignored] == ["source", "pattern"]


@pytest.mark.parametrize("raw", ["zh-CN", "zh_TW", "ZH", "zh-Hans-CN", " zh "])
def test_language_tags_open_in_chinese(raw):
    assert state.from_query({"lang": raw})["lang"] == "zh"
    at = run_app(lang=raw)
    ok(at)
    assert at.session_state["lang"] == "zh" and at.title[0].value == t("app.title", "zh")
    assert at.query_params["lang"] == "zh"  # written back as the app's own code


def test_a_key_given_twice_is_written_back_once():
    at = run_app(lang=["en", "zh"], k=["8", "16"], L="128")
    ok(at)
    # The last value counts, as in st.query_params; the rewritten URL holds each key once.
    assert at.session_state["lang"] == "zh" and at.session_state["top_k"] == 16
    assert at.query_params["lang"] == "zh" and at.query_params["k"] == "16" and at.query_params["L"] == "128"
    assert not any(isinstance(v, list) for v in at.query_params.values()), at.query_params


def _notice_script():
    """init_state and show_url_notices alone, as app.py calls them (the sidebar sets k in between)."""
    import streamlit as st

    from sparse_attn.ui import state

    state.init_state()
    st.slider("k", 0, state.K_MAX, key="top_k")
    state.show_url_notices(state.lang())


@pytest.mark.parametrize("lang", LANGS)
def test_the_notice_lists_what_was_ignored_in_the_readers_language_until_a_change(lang):
    at = AppTest.from_function(_notice_script, default_timeout=60)
    at.query_params.update({"lang": lang, "k": "lots", "L": "12345", "zoom": "9", "H": "2"})
    at.run()
    ok(at)
    want = state.url_notice_text([("k", "lots"), ("L", "12345"), ("zoom", "9")], lang)
    assert [w.value for w in at.warning] == [want]
    assert all(f"`{pair}`" in want for pair in ("k=lots", "L=12345", "zoom=9")) and "H=2" not in want
    assert want.startswith(t("io.url_ignored", lang, items="").split("{")[0][:12])
    at.run()  # a rerun with nothing changed (another panel's button, say) keeps it
    assert [w.value for w in at.warning] == [want]
    at.slider(key="top_k").set_value(8).run()  # the student moved on
    assert not at.warning
    at.slider(key="top_k").set_value(32).run()  # back to the link's settings: the notice stays gone
    assert not at.warning


def test_a_clean_link_shows_no_notice_and_the_app_shows_the_notice():
    at = run_app(L=128, k=8, lang="zh")
    ok(at)
    assert not at.warning
    at = run_app(k="lots", lang="zh")
    ok(at)
    assert [w.value for w in at.warning] == [state.url_notice_text([("k", "lots")], "zh")]


def test_notice_values_are_shortened_and_kept_as_code():
    text = state.url_notice_text([("text", "x" * 600), ("k", "![a](http://b/c.png)")], "en")
    assert "`text=" + "x" * state.NOTICE_VALUE_CHARS + "…`" in text and "x" * 41 not in text
    assert "`k=![a](http://b/c.png)`" in text


def test_the_url_carries_text_up_to_its_limit_both_ways():
    limit = state.URL_TEXT_CHARS
    short, long = "a" * limit, "a" * (limit + 1)
    # Reading: text up to the limit is used, longer text is ignored (and listed), so a link opens what the page wrote.
    assert state.read_query({"text": short}) == (state.defaults() | {"text": short}, [])
    s, ignored = state.read_query({"text": long})
    assert s["text"] == state.defaults()["text"] and ignored == [("text", long)]
    # Writing: the same rule.
    assert state.query_for(["text", "lang"], {"text": short, "lang": "en"}) == {"text": short, "lang": "en"}
    assert state.query_for(["text", "lang"], {"text": long, "lang": "en"}) == {"lang": "en"}
    assert str(limit) in t("help.text", "en") and str(limit) in t("help.text", "zh")


def _text_note_script():
    import streamlit as st

    from sparse_attn.ui import state

    state.init_state()
    note = state.text_link_note(state.lang())
    if note:
        st.caption(note)


@pytest.mark.parametrize("lang", LANGS)
def test_the_text_note_appears_exactly_when_the_link_cannot_carry_the_text(lang):
    at = AppTest.from_function(_text_note_script, default_timeout=60)
    at.query_params.update({"lang": lang, "source": "model"})
    at.run()
    ok(at)
    assert not at.caption
    for n, shown in ((state.URL_TEXT_CHARS, False), (state.URL_TEXT_CHARS + 1, True)):
        at.session_state["text"] = "字" * n
        at.run()
        want = [t("io.text_not_in_link", lang, count=n, limit=state.URL_TEXT_CHARS)] if shown else []
        assert [c.value for c in at.caption] == want
    at.session_state["source"] = "synthetic"  # the text is not in use: nothing to say
    at.run()
    assert not at.caption


def test_long_model_text_is_left_out_of_the_link():
    sentence = "The cat sat on the mat. "
    at = run_app(source="model", text=sentence * 3)
    ok(at)
    assert at.session_state["text"] == sentence * 3 and at.query_params["text"] == sentence * 3
    long = (sentence * 40)[: state.URL_TEXT_CHARS + 20]
    at.session_state["text"] = long
    at.run()
    ok(at)
    assert "text" not in at.query_params  # the link keeps no stale short text either
    assert at.session_state["text"] == long


# ---- a server restart under an open page -------------------------------------------------------------------
# The restarted server holds no session. The page keeps its widgets and its URL (the one the app last wrote), and
# its next change starts a new session: that first run brings every widget's value, the changed one included,
# while the URL still says what the page showed before the change. Streamlit reads a widget's value only once the
# widget is drawn, so the seeding must read them itself (and a widget's value must win over the URL).

def _restart(at: AppTest) -> None:
    """What a server restart leaves of the session: nothing. The browser's widgets (``at``'s tree) stay."""
    from streamlit.runtime.state.safe_session_state import SafeSessionState
    from streamlit.runtime.state.session_state import SessionState
    from streamlit.testing.v1.app_test import TESTING_KEY, _AppTestSessionState

    fresh = SessionState()
    fresh[TESTING_KEY] = {}
    at._session_state = SafeSessionState(fresh, lambda: None)
    at.session_state = _AppTestSessionState(at._session_state)


def _reconnect_with(at: AppTest, *changes) -> AppTest:
    """Apply ``changes`` to the page's widgets, restart the server, and run: the new session's first run."""
    for change in changes:
        change(at)
    sent = at._tree.get_widget_states()  # read while the old session can still decode them, as the browser holds them
    _restart(at)
    return at._run(sent)


@pytest.mark.parametrize("lang", LANGS)
def test_after_a_restart_the_next_change_sticks(lang):
    at = run_app(k=8, L=128, lang=lang)
    ok(at)
    at = _reconnect_with(at, lambda a: a.slider(key="top_k").set_value(16))
    ok(at)
    assert at.session_state["top_k"] == 16 and at.slider(key="top_k").value == 16
    assert at.query_params["k"] == "16" and at.query_params["L"] == "128" and at.query_params["lang"] == lang
    assert not at.warning  # the page's own URL: nothing to report
    at.run()  # one more run: still the student's
    ok(at)
    assert at.session_state["top_k"] == 16 and at.query_params["k"] == "16"


def test_after_a_restart_every_kind_of_widget_reads_back():
    """A slider, a select slider, a choice by its Chinese label, a toggle, a number box, the maps' own controls."""
    at = run_app(L=128, lang="zh", method="hybrid")
    ok(at)
    at = _reconnect_with(
        at,
        lambda a: a.select_slider(key="L").set_value(64),
        lambda a: a.selectbox(key="proposal").set_value("uniform"),
        lambda a: a.slider(key="num_samples").set_value(40),
        lambda a: a.toggle(key="causal").set_value(True),
        lambda a: a.number_input(key="seed").set_value(7),
        lambda a: a.slider(key="head").set_value(2),  # drawn in the maps tab, after the URL is written
        lambda a: a.radio(key="pool").set_value("mean"),
        lambda a: a.toggle(key="log").set_value(True),
    )
    ok(at)
    want = {"L": 64, "proposal": "uniform", "num_samples": 40, "causal": True, "seed": 7, "head": 2, "pool": "mean",
            "log": True, "method": "hybrid", "lang": "zh"}
    assert {name: at.session_state[name] for name in want} == want
    assert state.query_for(want, at.session_state).items() <= at.query_params.items()
    at.run()
    ok(at)
    assert {name: at.session_state[name] for name in want} == want


def test_a_first_run_without_widget_values_still_seeds_from_the_url():
    # A fresh page load sends no widget values: the link's settings, and its notice, as before.
    at = run_app(k=8, L=128, zoom=3)
    ok(at)
    assert at.session_state["top_k"] == 8 and at.session_state["L"] == 128
    assert [w.value for w in at.warning] == [state.url_notice_text([("zoom", "3")], "en")]


def test_long_model_text_survives_a_restart():
    """The link does not carry text over the limit; the text box does, and a reconnect brings it."""
    long = ("The cat sat on the mat because it was warm. " * 20)[: state.URL_TEXT_CHARS + 100]
    at = run_app(source="model")
    ok(at)
    at.text_area(key="text").input(long).run()
    ok(at)
    assert "text" not in at.query_params
    at = _reconnect_with(at, lambda a: a.slider(key="layer").set_value(2))
    ok(at)
    assert at.session_state["text"] == long and at.session_state["layer"] == 2 and at.session_state["source"] == "model"


def _choice_widgets(at: AppTest):
    for kind in ("selectbox", "radio"):
        for w in at.get(kind):
            if w.key in state.specs():
                yield w


@pytest.mark.parametrize("lang", LANGS)
def test_each_choice_label_the_app_shows_reads_back_as_its_option(lang):
    # The browser names a choice by its label: every label of every setting's choice widget must decode, to a
    # different option each, and the one shown to the widget's own value.
    seen = set()
    for query in ({"lang": lang}, {"lang": lang, "method": "sampling", "lesson": "band"}):
        at = run_app(**query)
        ok(at)
        for w in _choice_widgets(at):
            decoded = [state.decode_widget(w.key, label) for label in w.options]
            assert None not in decoded and len(set(decoded)) == len(decoded), (w.key, w.options, decoded)
            assert state.decode_widget(w.key, w.options[w.index]) == w.value, w.key
            seen.add(w.key)
    assert {"lang", "lesson", "source", "pattern", "method", "proposal", "device", "dtype", "pool"} <= seen
    for view, label in zip(state.TABS, state.tab_labels(lang)):  # the tabs hold the open tab's label
        assert state.decode_widget("view", label) == view


def test_a_widget_value_is_checked_as_a_url_value_is():
    decode = state.decode_widget
    assert decode("top_k", [16.0]) == 16 and decode("L", ["512"]) == 512 and decode("causal", True) is True
    assert decode("seed", 7.0) == 7 and decode("method", t("method.nsa", "zh")) == "nsa"
    for name, raw in [("top_k", [state.K_MAX + 1.0]), ("top_k", [2.5]), ("top_k", [float("nan")]), ("top_k", [float("inf")]), ("L", ["100"]),
                      ("top_k", [1.0, 2.0]), ("method", "magic"), ("causal", "maybe"), ("text", 3), ("head", None)]:
        assert decode(name, raw) is None, (name, raw)
    assert decode("text", "字" * (state.URL_TEXT_CHARS * 3)) == "字" * (state.URL_TEXT_CHARS * 3)  # no link limit


def _restart_note_script():
    import streamlit as st

    from sparse_attn.ui import state

    state.init_state()
    note = state.text_restart_note(state.lang())
    if note:
        st.caption(note)


@pytest.mark.parametrize("lang", LANGS)
def test_the_text_box_says_what_keeps_long_text_exactly_when_it_is_long(lang):
    at = AppTest.from_function(_restart_note_script, default_timeout=60)
    at.query_params.update({"lang": lang, "source": "model"})
    at.run()
    ok(at)
    assert not at.caption
    want = t("restart.text_kept", lang, limit=state.URL_TEXT_CHARS)
    assert str(state.URL_TEXT_CHARS) in want
    for n, shown in ((state.URL_TEXT_CHARS, False), (state.URL_TEXT_CHARS + 1, True)):
        at.session_state["text"] = "字" * n
        at.run()
        assert [c.value for c in at.caption] == ([want] if shown else [])
    at.session_state["source"] = "synthetic"
    at.run()
    assert not at.caption

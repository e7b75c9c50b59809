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

"""The classroom notebooks: built from their sources, bilingual in step, and true when run.

Executing them is the point: every claim in the prose is followed by an
``assert`` cell, so running a notebook checks what it says, and every
exercise's solution runs through the self-check a student uses, which must
also reject a plausible wrong answer.
"""
from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import importlib.util
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat import v4

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"
BUILD = NB / "build.py"
LANGS = ("en", "zh")
PER_NOTEBOOK_LIMIT_S = 30.0

# Loaded by path under its own name: "build" is also the name of a packaging tool.
_spec = importlib.util.spec_from_file_location("notebooks_build", BUILD)
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)
cells = sys.modules["_cells"]  # build.py put notebooks/src on the path and imported it

CHAPTERS = build.load_chapters()
SLUGS = [ch.SLUG for ch in CHAPTERS]
CJK = re.compile(r"[\u4e00-\u9fff]")


def _read(lang: str, slug: str) -> nbformat.NotebookNode:
    return nbformat.read(NB / lang / f"{slug}.ipynb", as_version=4)


def _chapter(slug: str):
    return CHAPTERS[SLUGS.index(slug)]


def _of_type(ch, kind) -> list:
    return [item for item in ch.CELLS if isinstance(item, kind)]


# --- the build --------------------------------------------------------------------------------


def test_build_reproduces_committed_notebooks():
    """`build.py --check` fails when a source changed and the notebooks were not rebuilt."""
    proc = subprocess.run([sys.executable, str(BUILD), "--check"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, "run `python notebooks/build.py`:\n" + proc.stderr


def test_check_notices_a_changed_notebook(monkeypatch, capsys):
    # The up-to-date test must be able to fail: corrupt one built file and --check must say so.
    target = NB / "en" / f"{SLUGS[0]}.ipynb"
    original = target.read_text(encoding="utf-8")
    files = build.expected_files()
    assert files[target] == original
    monkeypatch.setattr(build, "expected_files", lambda: {**files, target: original + " "})
    assert build.main(["--check"]) == 1
    assert f"out of date: notebooks/en/{SLUGS[0]}.ipynb" in capsys.readouterr().err


def test_chapters_are_numbered_one_to_n():
    assert [ch.NUMBER for ch in CHAPTERS] == list(range(1, len(CHAPTERS) + 1))
    assert all(ch.SLUG.startswith(f"ch{ch.NUMBER}_") for ch in CHAPTERS)


def test_build_refuses_headings_that_differ(monkeypatch):
    ch = CHAPTERS[0]
    i = next(i for i, item in enumerate(ch.CELLS) if isinstance(item, cells.Md))
    original = ch.CELLS[i]
    en = "## A heading\n\n" + original.en
    monkeypatch.setattr(ch, "CELLS", [*ch.CELLS[:i], cells.Md(en=en, zh=original.zh), *ch.CELLS[i + 1:]])
    glossary = build.load_glossary()
    with pytest.raises(ValueError, match=rf"chapter {ch.NUMBER} .*cell c\d+: headings differ"):
        build.check_parity(ch, build.build_notebook(ch, "en", glossary), build.build_notebook(ch, "zh", glossary))
    monkeypatch.setattr(build, "load_chapters", lambda: [ch])
    with pytest.raises(ValueError, match="headings differ"):
        build.expected_files()


def test_build_refuses_code_that_differs():
    ch = CHAPTERS[0]
    glossary = build.load_glossary()
    en, zh = build.build_notebook(ch, "en", glossary), build.build_notebook(ch, "zh", glossary)
    code = next(c for c in zh.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", []))
    code.source += "\nprint('only in zh')"
    with pytest.raises(ValueError, match=rf"chapter {ch.NUMBER} .*cell {code.id}: code differs"):
        build.check_parity(ch, en, zh)


def test_build_refuses_a_term_the_prose_does_not_use(monkeypatch):
    ch = CHAPTERS[0]
    monkeypatch.setattr(ch, "TERMS", [*ch.TERMS, "pooling"])
    with pytest.raises(ValueError, match="never uses"):
        build.build_notebook(ch, "en", build.load_glossary())


def test_the_zh_line_joiner_keeps_spaces_next_to_latin_text_and_code():
    md = cells.Md(en="x", zh="""
        在这些键上重新做
        softmax 归一化，并和
        `[SEP]` 比较；误差为
        ‖o‖。汉字之间
        不留空格，（括号
        ）与标点旁也不留。
        """)
    assert md.zh == "在这些键上重新做 softmax 归一化，并和 `[SEP]` 比较；误差为 ‖o‖。汉字之间不留空格，（括号）与标点旁也不留。"
    items = cells.Md(en="x", zh="""
        - 第一项的
          `code` 与
          文字
        - 第二项
        """)
    assert items.zh == "- 第一项的 `code` 与文字\n- 第二项"  # list items join their wrapped lines too


def test_an_exercise_needs_a_check_that_its_solution_calls():
    fields = dict(en="t", zh="题", hint_en="h", hint_zh="提示", solution_en="s", solution_zh="解",
                  self_check="def check_ex1(answer):\n    assert answer == 1", solution_code="check_ex1(1)",
                  wrong_answer="2")
    one = cells.Exercise(**fields)
    cells.Exercises(items=(one, cells.Exercise(**{**fields, "self_check": fields["self_check"].replace("1(", "2("),
                                                  "solution_code": "check_ex2(1)"})))
    with pytest.raises(ValueError, match="check_ex2"):
        cells.Exercises(items=(one, one))  # the second must define check_ex2
    with pytest.raises(ValueError, match="empty"):
        cells.Exercise(**{**fields, "hint_zh": " "})
    with pytest.raises(ValueError, match="2 or 3"):
        cells.Exercises(items=(one,))


# --- the notebooks as built ---------------------------------------------------------------------


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("slug", SLUGS)
def test_notebook_is_valid_and_clean(slug, lang):
    nb = _read(lang, slug)
    nbformat.validate(nb)
    ids = [c.id for c in nb.cells]
    assert all(ids) and len(set(ids)) == len(ids)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{slug}/{lang} cell {cell.id} stores output"
    assert nb.metadata.sparse_attn == {"chapter": _chapter(slug).NUMBER, "lang": lang}


@pytest.mark.parametrize("slug", SLUGS)
def test_en_and_zh_have_the_same_cells_headings_and_code(slug):
    en, zh = _read("en", slug), _read("zh", slug)
    assert [(c.cell_type, c.id, c.metadata.get("tags")) for c in en.cells] == \
           [(c.cell_type, c.id, c.metadata.get("tags")) for c in zh.cells]
    for a, b in zip(en.cells, zh.cells):
        if a.cell_type != "code":
            assert a.source != b.source or not a.source.strip(), f"{slug} cell {a.id}: prose not translated"
            assert build.headings(a.source) == build.headings(b.source), f"{slug} cell {a.id}: headings differ"
        elif "parameters" in a.metadata.get("tags", []):
            # The one cell allowed to differ, and only in the language it sets.
            assert a.source == build.PARAMETERS.format(lang="en") and b.source == build.PARAMETERS.format(lang="zh")
        else:
            assert a.source == b.source, f"{slug} cell {a.id}: code differs between en and zh"


@pytest.mark.parametrize("slug", SLUGS)
def test_chapter_has_objectives_summary_references_and_exercises(slug):
    ch = _chapter(slug)
    assert len(_of_type(ch, cells.Objectives)) == 1, f"{slug}: learning objectives"
    assert len(_of_type(ch, cells.Summary)) == 1, f"{slug}: a summary"
    refs = _of_type(ch, cells.References)
    assert len(refs) == 1 and refs[0].items, f"{slug}: references"
    (exercises,) = _of_type(ch, cells.Exercises)
    assert 2 <= len(exercises.items) <= 3
    nb = _read("en", slug)
    assert nb.cells[1].metadata.get("tags") == ["objectives"], f"{slug}: objectives right after the header"
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    for kind in ("exercise", "self-check", "hint", "solution-text", "solution"):
        assert sum(kind in t for t in tags) == len(exercises.items), (slug, kind)
    for c in nb.cells:
        if "solution" in c.metadata.get("tags", []):
            assert c.cell_type == "code" and c.metadata.jupyter.source_hidden is True
    for lang, word in (("en", "Hint"), ("zh", "提示")):
        hints = [c.source for c in _read(lang, slug).cells if "hint" in c.metadata.get("tags", [])]
        assert all(h.startswith(f"<details><summary>{word}</summary>") for h in hints)


def _bound_is_loose(test: ast.expr) -> str | None:
    """Why an assert's test is a one-sided bound against a number, or None if it is not.

    Allowed: equalities, two-sided (chained) bounds, |x - v| < tol, comparisons of two
    measured values, and bounds below 1e-3 (exact up to rounding) or at 0 (a sign)."""
    if isinstance(test, ast.BoolOp):
        return next((why for v in test.values if (why := _bound_is_loose(v))), None)
    if not isinstance(test, ast.Compare) or len(test.ops) != 1:
        return None
    if not isinstance(test.ops[0], (ast.Lt, ast.LtE, ast.Gt, ast.GtE)):
        return None
    sides = (test.left, test.comparators[0])
    if any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "abs" for s in sides for n in ast.walk(s)):
        return None
    for side in sides:
        try:
            value = ast.literal_eval(side)
        except ValueError:
            continue
        if isinstance(value, (int, float)) and abs(value) > 1e-3:
            return ast.unparse(test)
    return None


@pytest.mark.parametrize("slug", SLUGS)
def test_every_claim_is_followed_by_its_assert_with_a_tolerance(slug):
    nb = _read("en", slug)
    claims = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and "claim" in c.metadata.get("tags", [])]
    assert claims, f"{slug} states no checked claim"
    loose = []
    for i in claims:
        nxt = nb.cells[i + 1]
        assert nxt.cell_type == "code" and "assert " in nxt.source and "claim" in nxt.metadata.tags
        for node in ast.walk(ast.parse(nxt.source)):
            if isinstance(node, ast.Assert) and (why := _bound_is_loose(node.test)):
                loose.append(why)
    assert not loose, (f"{slug}: one-sided bounds against a number; state the measured value with a tolerance "
                       f"(abs(x - value) < tol, or lo < x < hi): {loose}")


@pytest.mark.parametrize("slug", SLUGS)
def test_glossary_terms_are_used_in_both_languages(slug):
    glossary = build.load_glossary()
    ch = _chapter(slug)
    for lang in LANGS:
        prose = " ".join(" ".join(c.source for c in _read(lang, slug).cells[:-1] if c.cell_type == "markdown").split())
        for term in ch.TERMS:
            word = term if lang == "en" else glossary[term]
            assert word.lower() in prose.lower(), f"{slug}/{lang}: the term {word!r} is listed but never used"
        assert f"| {ch.TERMS[0]} | {glossary[ch.TERMS[0]]} |" in _read(lang, slug).cells[-1].source


def test_glossary_page_follows_the_app_glossary():
    page = (ROOT / "docs" / "glossary.md").read_text(encoding="utf-8")
    for en, zh in build.load_glossary().items():
        assert f"| {en} | {zh} |" in page


def test_readme_maps_every_chapter_and_its_app_links_open_their_view():
    """The teacher's guide lists every chapter in both languages, and each app link's settings
    survive the app's own URL parsing (a value out of bounds would silently fall back)."""
    from urllib.parse import parse_qsl, urlsplit

    from sparse_attn.ui import state

    readme = (NB / "README.md").read_text(encoding="utf-8")
    for ch in CHAPTERS:
        assert f"(en/{ch.SLUG}.ipynb)" in readme and f"(zh/{ch.SLUG}.ipynb)" in readme, ch.SLUG
    urls = re.findall(r"http://localhost:8501/\?[^`\s]+", readme)
    assert len(urls) >= len(CHAPTERS)
    names = {state.url_key(name): name for name in state.specs()}
    for url in urls:
        query = dict(parse_qsl(urlsplit(url).query))
        unknown = set(query) - set(names)
        assert not unknown, (url, unknown)
        settings = state.from_query(query)
        for key, raw in query.items():
            assert str(settings[names[key]]).lower() == raw.lower(), f"{url}: {key}={raw} is not accepted"


# Words a translation leaves behind, with what a Chinese technical writer would say.
TRANSLATIONESE = {
    "持有": "占用 / 存放 / 保留",
    "滚动": "动态维护 / 逐块更新",
    "最宽张量": "最大的张量 / 最多的值",
    "合格的注意力": "（改写）",
    "这正是要点所在": "（删去或改写）",
    "汇聚": "注意力汇点 (attention sink)；汇聚 is d2l-zh's pooling",
    "保留的注意力质量": "权重占比 (mass kept)",
}


def _zh_prose(source: str) -> str:
    """A zh prose cell without its code, formulas, links' targets and HTML tags."""
    text = re.sub(r"```.*?```", " ", source, flags=re.DOTALL)
    text = re.sub(r"\$\$.*?\$\$", " ", text, flags=re.DOTALL)
    text = re.sub(r"`[^`]*`", "`c`", text)
    text = re.sub(r"\$[^$]*\$", "$m$", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return re.sub(r"<[^>]+>", " ", text)


@pytest.mark.parametrize("slug", SLUGS)
def test_zh_prose_reads_as_written_in_chinese(slug):
    problems = []
    for cell in _read("zh", slug).cells:
        if cell.cell_type != "markdown" or "references" in cell.metadata.get("tags", []):
            continue
        prose = _zh_prose(cell.source)
        problems += [f"{cell.id}: {word!r} -> {better}" for word, better in TRANSLATIONESE.items() if word in prose]
        if re.search(r"第 ?0 ?[个层头行列块]", prose):
            problems.append(f"{cell.id}: a 0-based index read as an ordinal (第 0 …); write 编号为 0 的… or 索引 0")
        if '"' in prose:
            problems.append(f"{cell.id}: ASCII quotes in Chinese prose, use “”: {prose[max(0, prose.index(chr(34)) - 20):][:50]!r}")
        for m in re.finditer(r"[\u4e00-\u9fff][A-Za-z0-9`$]|[A-Za-z0-9`$][\u4e00-\u9fff]", prose):
            problems.append(f"{cell.id}: no space between Chinese and Latin text or code: {prose[max(0, m.start() - 8):m.end() + 8]!r}")
    assert not problems, f"{slug}:\n" + "\n".join(problems)


# --- running them -------------------------------------------------------------------------------


def _probe(n: int, wrong: str) -> str:
    """A cell, run after exercise n's solution, that hands the self-check a wrong answer."""
    return (
        "import re as _re\n"
        "try:\n"
        f"    check_ex{n}({wrong})\n"
        "except AssertionError as _e:\n"
        "    _msg = str(_e)\n"
        "else:\n"
        f"    raise RuntimeError('check_ex{n} accepted the wrong answer ' + {wrong!r})\n"
        f"assert _msg.strip(), 'check_ex{n} rejected a wrong answer without saying why'\n"
        "assert LANG != 'zh' or _re.search('[\\u4e00-\\u9fff]', _msg), "
        f"'check_ex{n} must explain in Chinese in the zh notebook: ' + _msg\n"
    )


def _with_probes(nb: nbformat.NotebookNode, ch) -> nbformat.NotebookNode:
    (exercises,) = _of_type(ch, cells.Exercises)
    wrong = [ex.wrong_answer for ex in exercises.items]
    out, n = [], 0
    for cell in nb.cells:
        out.append(cell)
        if "solution" in cell.metadata.get("tags", []):
            n += 1
            probe = v4.new_code_cell(_probe(n, wrong[n - 1]))
            probe.id = f"probe{n}"
            out.append(probe)
    assert n == len(wrong), f"{ch.SLUG}: {n} solution cells for {len(wrong)} exercises"
    nb.cells = out
    return nb


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _execute(path: Path, nb: nbformat.NotebookNode) -> tuple[float, float, BaseException | None]:
    """Run the notebook; return its wall time, the CPU time of its kernel (a child process, counted
    once it exits) and the error, if any."""
    client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    start, cpu = time.perf_counter(), _children_cpu_s()
    try:
        # A fresh thread has no event loop, whatever other tests (a browser driver) left running in this one.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(asyncio.run, client.async_execute()).result()
        err = None
    except Exception as e:  # noqa: BLE001 - reported below
        err = e
    return time.perf_counter() - start, _children_cpu_s() - cpu, err


def _english_outputs(nb: nbformat.NotebookNode) -> list[str]:
    """Printed lines and table headers of a zh notebook that are English sentences or snake_case names."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                found.append(f"{cell.id}: stderr {out.text[:80]!r}")
            text = out.get("text", "") if out.get("output_type") == "stream" else ""
            for line in text.splitlines():
                if not CJK.search(line) and re.search(r"[A-Za-z]{3,}(?: [A-Za-z]{2,}){2,}", line):
                    found.append(f"{cell.id}: {line[:80]!r}")
            html = out.get("data", {}).get("text/html", "") if "data" in out else ""
            for th in re.findall(r"<th[^>]*>([^<]*)</th>", "".join(html)):
                if re.fullmatch(r"[a-z]+(?:_[a-z0-9]+)+", th.strip()):
                    found.append(f"{cell.id}: column {th.strip()!r}")
    return found


@pytest.mark.slow
@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("slug", SLUGS)
def test_notebook_runs_top_to_bottom_and_its_exercises_check(slug, lang, monkeypatch):
    """The notebook executes without error within the classroom budget; every exercise's solution
    passes its self-check and the self-check rejects the exercise's wrong answer."""
    # The kernel must import this checkout's sparse_attn, whatever is installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("PLOTLY_RENDERER", "json")  # no plotly.js bundle in every output
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a shared machine: one thread is what a busy core gives anyway
    path = NB / lang / f"{slug}.ipynb"
    nb = _with_probes(_read(lang, slug), _chapter(slug))
    elapsed, cpu, err = _execute(path, nb)
    print(f"{lang}/{slug}: {elapsed:.1f} s wall, {cpu:.1f} s kernel CPU")
    assert err is None, f"{lang}/{slug} failed after {elapsed:.1f} s: {err}"
    assert elapsed < PER_NOTEBOOK_LIMIT_S, (f"{lang}/{slug} took {elapsed:.1f} s, over {PER_NOTEBOOK_LIMIT_S:.0f} s "
                                            f"({cpu:.1f} s of it on the CPU)")
    if lang == "zh":
        english = _english_outputs(nb)
        assert not english, f"zh/{slug} prints English (use tr(en, zh), rename columns):\n" + "\n".join(english)

"""The classroom notebooks: built from their sources, bilingual in step, and true when run.

Executing them is the point: every claim in the prose is followed by an
``assert`` cell, so running a notebook checks what it says.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"
BUILD = NB / "build.py"
LANGS = ("en", "zh")
PER_NOTEBOOK_LIMIT_S = 30.0
WORKERS = 2

# Loaded by path under its own name: "build" is also the name of a packaging tool.
_spec = importlib.util.spec_from_file_location("notebooks_build", BUILD)
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

CHAPTERS = build.load_chapters()
SLUGS = [ch.SLUG for ch in CHAPTERS]


def _read(lang: str, slug: str) -> nbformat.NotebookNode:
    return nbformat.read(NB / lang / f"{slug}.ipynb", as_version=4)


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
    assert nb.metadata.sparse_attn == {"chapter": CHAPTERS[SLUGS.index(slug)].NUMBER, "lang": lang}


@pytest.mark.parametrize("slug", SLUGS)
def test_en_and_zh_have_the_same_cells(slug):
    en, zh = _read("en", slug), _read("zh", slug)
    assert [(c.cell_type, c.id, c.metadata.get("tags")) for c in en.cells] == \
           [(c.cell_type, c.id, c.metadata.get("tags")) for c in zh.cells]
    for a, b in zip(en.cells, zh.cells):
        if a.cell_type != "code":
            assert a.source != b.source or not a.source.strip(), f"{slug} cell {a.id}: prose not translated"
        elif "parameters" in a.metadata.get("tags", []):
            # The one cell allowed to differ, and only in the language it sets.
            assert a.source == build.PARAMETERS.format(lang="en") and b.source == build.PARAMETERS.format(lang="zh")
        else:
            assert a.source == b.source, f"{slug} cell {a.id}: code differs between en and zh"


@pytest.mark.parametrize("slug", SLUGS)
def test_every_claim_is_followed_by_its_assert(slug):
    cells = _read("en", slug).cells
    claims = [i for i, c in enumerate(cells) if c.cell_type == "markdown" and "claim" in c.metadata.get("tags", [])]
    assert claims, f"{slug} states no checked claim"
    for i in claims:
        nxt = cells[i + 1]
        assert nxt.cell_type == "code" and "assert " in nxt.source and "claim" in nxt.metadata.tags


@pytest.mark.parametrize("slug", SLUGS)
def test_glossary_terms_are_used_in_both_languages(slug):
    glossary = build.load_glossary()
    ch = CHAPTERS[SLUGS.index(slug)]
    for lang in LANGS:
        prose = " ".join(" ".join(c.source for c in _read(lang, slug).cells[:-1] if c.cell_type == "markdown").split())
        for term in ch.TERMS:
            word = term if lang == "en" else glossary[term]
            assert word.lower() in prose.lower(), f"{slug}/{lang}: the term {word!r} is listed but never used"
        assert f"| {ch.TERMS[0]} | {glossary[ch.TERMS[0]]} |" in _read(lang, slug).cells[-1].source


def test_build_refuses_a_term_the_prose_does_not_use(monkeypatch):
    ch = CHAPTERS[0]
    monkeypatch.setattr(ch, "TERMS", [*ch.TERMS, "pooling"])
    with pytest.raises(ValueError, match="never uses"):
        build.build_notebook(ch, "en", build.load_glossary())


def test_glossary_page_follows_the_app_glossary():
    page = (ROOT / "docs" / "glossary.md").read_text(encoding="utf-8")
    for en, zh in build.load_glossary().items():
        assert f"| {en} | {zh} |" in page


async def _execute_all(paths: list[Path]) -> dict[Path, tuple[float, BaseException | None]]:
    gate = asyncio.Semaphore(WORKERS)
    results = {}

    async def one(path: Path):
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=120, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        async with gate:
            start = time.perf_counter()
            try:
                await client.async_execute()
                err = None
            except Exception as e:  # noqa: BLE001 - reported per notebook below
                err = e
            results[path] = (time.perf_counter() - start, err)

    await asyncio.gather(*(one(p) for p in paths))
    return results


@pytest.mark.slow
def test_every_notebook_runs_top_to_bottom(monkeypatch):
    """Both languages of every chapter execute without error, each within the classroom budget."""
    # The kernel must import this checkout's sparse_attn, whatever is installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("PLOTLY_RENDERER", "json")  # no plotly.js bundle in every output
    # Two notebooks share two cores: one thread each, or their thread pools fight over both.
    monkeypatch.setenv("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))
    paths = [NB / lang / f"{slug}.ipynb" for slug in SLUGS for lang in LANGS]
    # A fresh thread has no event loop, whatever other tests (a browser driver) left running in this one.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        results = pool.submit(asyncio.run, _execute_all(paths)).result()
    report = "\n".join(f"{p.relative_to(NB)}: {t:.1f} s" + (f"  FAILED: {e}" if e else "") for p, (t, e) in results.items())
    print(report)
    failed = {p: e for p, (_, e) in results.items() if e is not None}
    assert not failed, report
    slow = {p: t for p, (t, _) in results.items() if t > PER_NOTEBOOK_LIMIT_S}
    assert not slow, f"over {PER_NOTEBOOK_LIMIT_S:.0f} s:\n{report}"

"""Build the classroom notebooks: notebooks/src/ch*.py -> notebooks/{en,zh}/*.ipynb, and docs/glossary.md.

    python notebooks/build.py           # write the notebooks and the glossary page
    python notebooks/build.py --check   # exit 1 and name the files that differ from a fresh build
    python notebooks/build.py --only ch3_topk   # one chapter (or several) while you work on it

Every chapter becomes two notebooks with the same cells in the same order.
Code cells are identical, except the one tagged ``parameters`` that sets
``LANG``, which picks the language of plot titles and axis labels. A
``Claim`` becomes a prose cell and the ``assert`` cell that proves it. The
build refuses a chapter whose two languages differ in their headings (the
same levels in the same order, cell by cell) or in any code cell.

A chapter's page: the header, its learning objectives, the cells in order
(summary and references among them), then the exercises, each with its task,
a self-check cell, a collapsed hint, a collapsed worked solution and the
solution's code (tagged ``solution``, its source hidden until opened), and
last the table of the terms it uses.

Notebooks are written without outputs and with fixed cell ids, so a rebuild
of unchanged sources gives byte-identical files.

The terminology comes from ``sparse_attn/i18n/glossary.json``, the glossary
the app's catalogs follow; ``docs/glossary.md`` is generated from it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

import nbformat
from nbformat import v4

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SRC = HERE / "src"
GLOSSARY_JSON = ROOT / "sparse_attn" / "i18n" / "glossary.json"
GLOSSARY_MD = ROOT / "docs" / "glossary.md"
LANGS = ("en", "zh")

sys.path.insert(0, str(SRC))
from _cells import Claim, Code, Exercises, Md, Objectives, References, Summary  # noqa: E402

WORDS = {
    "chapter": {"en": "Chapter {n}", "zh": "第 {n} 章"},
    "other": {"en": "[中文版](../zh/{slug}.ipynb)", "zh": "[English version](../en/{slug}.ipynb)"},
    "how": {
        "en": "Run the cells top to bottom. Every sentence that states a number or a comparison "
              "is followed by a cell whose `assert` checks it on the numbers computed here.",
        "zh": "请从上到下依次运行各单元格。每一句给出数字或比较的陈述之后，都紧跟一个代码单元格，"
              "用 `assert` 在本笔记本算出的数字上检验它。",
    },
    "objectives": {"en": "Learning objectives", "zh": "学习目标"},
    "objectives_lead": {"en": "After this chapter you can:", "zh": "学完本章，你将能够："},
    "summary": {"en": "Summary", "zh": "小结"},
    "references": {"en": "References", "zh": "参考文献"},
    "exercises": {"en": "Exercises", "zh": "练习"},
    "exercise": {"en": "Exercise {n}", "zh": "练习 {n}"},
    "exercises_how": {
        "en": "Each exercise has a self-check cell: run it once to define `check_exN`, then call "
              "`check_exN(your_answer)`. Try first; the hint and the worked solution are folded below "
              "each task, and the solution's code cell is collapsed.",
        "zh": "每道练习都配有一个自测单元格：先运行它以定义 `check_exN`，再调用 `check_exN(你的答案)`。"
              "请先自己动手；提示和参考答案折叠在题目下方，参考代码所在的单元格也已折叠。",
    },
    "hint": {"en": "Hint", "zh": "提示"},
    "solution": {"en": "Solution", "zh": "参考答案"},
    "terms": {"en": "Terms used in this chapter", "zh": "本章术语"},
}
PARAMETERS = 'LANG = "{lang}"  # language of plot titles and axis labels: "en" or "zh"'


def load_glossary() -> dict[str, str]:
    with open(GLOSSARY_JSON, encoding="utf-8") as f:
        return json.load(f)


def load_chapters() -> list:
    chapters = []
    for path in sorted(SRC.glob("ch*.py")):
        spec = importlib.util.spec_from_file_location(f"_chapter_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        chapters.append(mod)
    numbers = [c.NUMBER for c in chapters]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"two chapters share a number: {numbers}")
    return sorted(chapters, key=lambda c: c.NUMBER)


def _md(text: str, tags=()) -> nbformat.NotebookNode:
    cell = v4.new_markdown_cell(text)
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def _code(source: str, tags=(), hidden: bool = False) -> nbformat.NotebookNode:
    cell = v4.new_code_cell(source)
    if tags:
        cell.metadata["tags"] = list(tags)
    if hidden:
        cell.metadata["jupyter"] = {"source_hidden": True}
    return cell


def _details(summary: str, body: str) -> str:
    return f"<details><summary>{summary}</summary>\n\n{body}\n\n</details>"


def _exercise_cells(exercises: Exercises, lang: str) -> list:
    cells = []
    cells.append(_md(f"## {WORDS['exercises'][lang]}\n\n{WORDS['exercises_how'][lang]}"))
    for n, ex in enumerate(exercises.items, 1):
        task = ex.en if lang == "en" else ex.zh
        hint = ex.hint_en if lang == "en" else ex.hint_zh
        solution = ex.solution_en if lang == "en" else ex.solution_zh
        cells.append(_md(f"### {WORDS['exercise'][lang].format(n=n)}\n\n{task}", tags=["exercise"]))
        cells.append(_code(ex.self_check, tags=["self-check"]))
        cells.append(_md(_details(WORDS["hint"][lang], hint), tags=["hint"]))
        cells.append(_md(_details(WORDS["solution"][lang], solution), tags=["solution-text"]))
        cells.append(_code(ex.solution_code, tags=["solution"], hidden=True))
    return cells


def build_notebook(ch, lang: str, glossary: dict[str, str]) -> nbformat.NotebookNode:
    missing = [term for term in ch.TERMS if term not in glossary]
    if missing:
        raise ValueError(f"chapter {ch.NUMBER}: terms {missing} are not in {GLOSSARY_JSON.name}")
    head = f"# {WORDS['chapter'][lang].format(n=ch.NUMBER)} · {ch.TITLE[lang]}\n\n"
    head += f"*{WORDS['other'][lang].format(slug=ch.SLUG)}*\n\n{WORDS['how'][lang]}"
    cells = [_md(head)]
    objectives = [item for item in ch.CELLS if isinstance(item, Objectives)]
    if len(objectives) > 1:
        raise ValueError(f"chapter {ch.NUMBER} has {len(objectives)} Objectives, at most one")
    if objectives:
        goals = "\n".join(f"- {text}" for text in getattr(objectives[0], lang))
        cells.append(_md(f"## {WORDS['objectives'][lang]}\n\n{WORDS['objectives_lead'][lang]}\n\n{goals}",
                         tags=["objectives"]))
    cells.append(_code(PARAMETERS.format(lang=lang), tags=["parameters"]))
    exercises = None
    for item in ch.CELLS:
        if isinstance(item, Objectives):
            continue
        if isinstance(item, Summary):  # before Md: a Summary is an Md with its heading
            cells.append(_md(f"## {WORDS['summary'][lang]}\n\n{getattr(item, lang)}", tags=["summary"]))
        elif isinstance(item, Md):
            cells.append(_md(getattr(item, lang)))
        elif isinstance(item, Code):
            cells.append(_code(item.source))
        elif isinstance(item, Claim):
            cells.append(_md(getattr(item, lang), tags=["claim"]))
            cells.append(_code(item.check, tags=["claim"]))
        elif isinstance(item, References):
            refs = "\n".join(f"- [{text}]({url})" if url else f"- {text}" for text, url in item.items)
            cells.append(_md(f"## {WORDS['references'][lang]}\n\n{refs}", tags=["references"]))
        elif isinstance(item, Exercises):
            if exercises is not None:
                raise ValueError(f"chapter {ch.NUMBER} has two Exercises")
            exercises = item
        else:
            raise TypeError(f"chapter {ch.NUMBER}: unknown cell {item!r}")
    if exercises is None:
        raise ValueError(f"chapter {ch.NUMBER} has no Exercises")
    cells += _exercise_cells(exercises, lang)
    rows = "\n".join(f"| {term} | {glossary[term]} |" for term in ch.TERMS)
    cells.append(_md(f"## {WORDS['terms'][lang]}\n\n| English | 中文 |\n| --- | --- |\n{rows}"))

    prose = " ".join(" ".join(c.source for c in cells[:-1] if c.cell_type == "markdown").lower().split())
    unused = [t for t in ch.TERMS if (t if lang == "en" else glossary[t]).lower() not in prose]
    if unused:
        raise ValueError(f"chapter {ch.NUMBER} ({lang}): the prose never uses the listed terms "
                         f"{[t if lang == 'en' else glossary[t] for t in unused]}")

    for i, cell in enumerate(cells):
        cell.id = f"c{i:03d}"  # fixed ids: a rebuild gives the same bytes, and en/zh cells pair up by id
    nb = v4.new_notebook(cells=cells)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "sparse_attn": {"chapter": ch.NUMBER, "lang": lang},
    }
    nbformat.validate(nb)
    return nb


_FENCE = re.compile(r"^\s*```")
_HEADING = re.compile(r"^(#{1,6})\s")


def headings(markdown: str) -> list[int]:
    """The levels of the markdown headings in a cell, in order (lines inside code fences skipped)."""
    levels, fenced = [], False
    for line in markdown.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := _HEADING.match(line)):
            levels.append(len(m.group(1)))
    return levels


def check_parity(ch, en: nbformat.NotebookNode, zh: nbformat.NotebookNode) -> None:
    """Refuse a chapter whose two notebooks differ in structure: cell kinds and tags, heading
    levels cell by cell, or any code cell but the ``parameters`` one."""
    if len(en.cells) != len(zh.cells):
        raise ValueError(f"chapter {ch.NUMBER}: {len(en.cells)} cells in en, {len(zh.cells)} in zh")
    for a, b in zip(en.cells, zh.cells):
        where = f"chapter {ch.NUMBER} ({ch.SLUG}), cell {a.id}"
        if a.cell_type != b.cell_type or a.metadata.get("tags") != b.metadata.get("tags"):
            raise ValueError(f"{where}: a {a.cell_type} cell in en, a {b.cell_type} cell in zh")
        if a.cell_type == "markdown":
            if headings(a.source) != headings(b.source):
                raise ValueError(f"{where}: headings differ, en {headings(a.source)} vs zh {headings(b.source)} "
                                 f"(levels in order); en starts {a.source[:60]!r}, zh starts {b.source[:60]!r}")
        elif "parameters" not in a.metadata.get("tags", []) and a.source != b.source:
            raise ValueError(f"{where}: code differs between en and zh")


def glossary_page(glossary: dict[str, str]) -> str:
    rows = "\n".join(f"| {en} | {zh} |" for en, zh in glossary.items())
    return (
        "# Glossary / 术语表\n\n"
        "The terms the app's English and Chinese catalogs and the classroom notebooks use. "
        "Generated by `python notebooks/build.py` from `sparse_attn/i18n/glossary.json`: edit the JSON, "
        "then rebuild.\n\n"
        "应用的中英文界面文字与课堂笔记本统一使用下列术语。本页由 `python notebooks/build.py` 根据 "
        "`sparse_attn/i18n/glossary.json` 生成：请修改 JSON 后重新生成。\n\n"
        f"| English | 中文 |\n| --- | --- |\n{rows}\n"
    )


def expected_files(only: list[str] | None = None) -> dict[Path, str]:
    """Every file the build owns, path -> exact text; with ``only``, those chapters' notebooks (by slug)."""
    glossary = load_glossary()
    files = {GLOSSARY_MD: glossary_page(glossary)}
    problems = []
    chapters = load_chapters()
    unknown = sorted(set(only or ()) - {ch.SLUG for ch in chapters})
    if unknown:
        raise ValueError(f"no chapter {unknown}; the chapters are {[ch.SLUG for ch in chapters]}")
    for ch in chapters:
        if only and ch.SLUG not in only:
            continue
        try:  # every chapter's first problem, in one report
            notebooks = {lang: build_notebook(ch, lang, glossary) for lang in LANGS}
            check_parity(ch, notebooks["en"], notebooks["zh"])
        except ValueError as e:
            problems.append(str(e))
            continue
        for lang, nb in notebooks.items():
            files[HERE / lang / f"{ch.SLUG}.ipynb"] = nbformat.writes(nb) + "\n"
    if problems:
        raise ValueError("the build refuses:\n" + "\n".join(problems))
    return files


def stale_notebooks(files: dict[Path, str]) -> list[Path]:
    """Notebooks on disk that no chapter builds any more."""
    return [p for lang in LANGS for p in sorted((HERE / lang).glob("*.ipynb")) if p not in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if any built file differs")
    parser.add_argument("--only", nargs="+", metavar="SLUG", help="build only these chapters, e.g. ch3_topk")
    args = parser.parse_args(argv)
    files = expected_files(args.only) if args.only else expected_files()
    if args.check:
        differ = [p for p, text in files.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
        differ += [] if args.only else stale_notebooks(files)
        for p in differ:
            print(f"out of date: {p.relative_to(ROOT)}", file=sys.stderr)
        return 1 if differ else 0
    for p in [] if args.only else stale_notebooks(files):
        p.unlink()
    for p, text in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())

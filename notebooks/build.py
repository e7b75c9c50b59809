"""Build the classroom notebooks: notebooks/src/ch*.py -> notebooks/{en,zh}/*.ipynb, and docs/glossary.md.

    python notebooks/build.py           # write the notebooks and the glossary page
    python notebooks/build.py --check   # exit 1 and name the files that differ from a fresh build

Every chapter becomes two notebooks with the same cells in the same order.
Code cells are identical, except the one tagged ``parameters`` that sets
``LANG``, which picks the language of plot titles and axis labels. A
``Claim`` becomes a prose cell and the ``assert`` cell that proves it.
Notebooks are written without outputs and with fixed cell ids, so a rebuild
of unchanged sources gives byte-identical files.

The terminology comes from ``sparse_attn/i18n/glossary.json``, the glossary
the app's catalogs follow; ``docs/glossary.md`` is generated from it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
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
from _cells import Claim, Code, Exercises, Md  # noqa: E402

WORDS = {
    "chapter": {"en": "Chapter {n}", "zh": "第 {n} 章"},
    "other": {"en": "[中文版](../zh/{slug}.ipynb)", "zh": "[English version](../en/{slug}.ipynb)"},
    "how": {
        "en": "Run the cells top to bottom. Every sentence that states a number or a comparison "
              "is followed by a cell whose `assert` checks it on the numbers computed here.",
        "zh": "请从上到下依次运行各单元格。每一句给出数字或比较的陈述之后，都紧跟一个代码单元格，"
              "用 `assert` 在本笔记本算出的数字上检验它。",
    },
    "exercises": {"en": "Exercises", "zh": "练习"},
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


def _code(source: str, tags=()) -> nbformat.NotebookNode:
    cell = v4.new_code_cell(source)
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def build_notebook(ch, lang: str, glossary: dict[str, str]) -> nbformat.NotebookNode:
    missing = [term for term in ch.TERMS if term not in glossary]
    if missing:
        raise ValueError(f"chapter {ch.NUMBER}: terms {missing} are not in {GLOSSARY_JSON.name}")
    head = f"# {WORDS['chapter'][lang].format(n=ch.NUMBER)} · {ch.TITLE[lang]}\n\n"
    head += f"*{WORDS['other'][lang].format(slug=ch.SLUG)}*\n\n{WORDS['how'][lang]}"
    cells = [_md(head), _code(PARAMETERS.format(lang=lang), tags=["parameters"])]
    exercises = None
    for item in ch.CELLS:
        if isinstance(item, Md):
            cells.append(_md(getattr(item, lang)))
        elif isinstance(item, Code):
            cells.append(_code(item.source))
        elif isinstance(item, Claim):
            cells.append(_md(getattr(item, lang), tags=["claim"]))
            cells.append(_code(item.check, tags=["claim"]))
        elif isinstance(item, Exercises):
            exercises = item
        else:
            raise TypeError(f"chapter {ch.NUMBER}: unknown cell {item!r}")
    if exercises is None:
        raise ValueError(f"chapter {ch.NUMBER} has no Exercises")
    items = "\n".join(f"{i}. {text}" for i, text in enumerate(getattr(exercises, lang), 1))
    cells.append(_md(f"## {WORDS['exercises'][lang]}\n\n{items}"))
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


def expected_files() -> dict[Path, str]:
    """Every file the build owns, path -> exact text."""
    glossary = load_glossary()
    files = {GLOSSARY_MD: glossary_page(glossary)}
    for ch in load_chapters():
        for lang in LANGS:
            files[HERE / lang / f"{ch.SLUG}.ipynb"] = nbformat.writes(build_notebook(ch, lang, glossary)) + "\n"
    return files


def stale_notebooks(files: dict[Path, str]) -> list[Path]:
    """Notebooks on disk that no chapter builds any more."""
    return [p for lang in LANGS for p in sorted((HERE / lang).glob("*.ipynb")) if p not in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if any built file differs")
    args = parser.parse_args(argv)
    files = expected_files()
    if args.check:
        differ = [p for p, text in files.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
        differ += stale_notebooks(files)
        for p in differ:
            print(f"out of date: {p.relative_to(ROOT)}", file=sys.stderr)
        return 1 if differ else 0
    for p in stale_notebooks(files):
        p.unlink()
    for p, text in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every ``python -m ...`` command that README.md and docs/*.md show still names a module and subcommand that exist.

The commands are read from the documents themselves (fenced code blocks,
indented command lines and inline code, backslash continuations joined), so a
renamed module or subcommand fails here before a reader finds out. Each
distinct (module, subcommand) runs once, from the repository root, as
``python -m MODULE [SUBCOMMAND] --help``: a full run of these commands is long
(benchmarks, sweeps, GPU tables, the test suite itself), while ``--help``
still imports the module and makes its argument parser accept the subcommand.
Commands that are not ``python -m`` (``streamlit run``, ``pip``, scripts run
by path) are not checked here.

The Python examples are checked too: every ``import`` of the library that a
``python`` code block shows must import.
"""
from __future__ import annotations

import concurrent.futures
import functools
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "notebooks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT_S = 120

_FENCE = re.compile(r"^[ \t]*(```|~~~)")
_INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)*)`")  # may wrap, never across a blank line
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}


class Command(NamedTuple):
    module: str
    subcommand: str | None  # the first positional argument, kept so that a renamed subcommand fails
    args: tuple[str, ...]   # what follows the module, as the document shows it
    where: str              # file:line

    @property
    def text(self) -> str:
        return " ".join(["python -m", self.module, *self.args])

    @property
    def key(self) -> tuple[str, str | None]:
        return self.module, self.subcommand

    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module, *([self.subcommand] if self.subcommand else []), "--help"]


def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join lines ending in a backslash with the next one; keep the first line's number."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in lines:
        if pending is not None:
            number, line = pending[0], pending[1] + " " + line.strip()
            pending = None
        if line.rstrip().endswith("\\"):
            pending = (number, line.rstrip()[:-1].rstrip())
        else:
            out.append((number, line))
    if pending is not None:
        out.append(pending)
    return out


def _parse(text: str, where: str) -> list[Command]:
    """The ``python -m`` commands in one shell line (several if joined by ``&&``, ``;``, ``|``)."""
    text = re.sub(r"(^|\s)#.*$", "", text.strip().removeprefix("$ "))  # a shell comment starts a word
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: not a shell command
        return []
    segments, current = [], []
    for tok in tokens:
        if tok in _OPERATORS:
            segments.append(current)
            current = []
        else:
            current.append(tok)
    segments.append(current)
    commands = []
    for seg in segments:
        while seg and _ENV.match(seg[0]):
            seg = seg[1:]  # VAR=value python -m ...
        if len(seg) < 3 or not re.fullmatch(r"python(3(\.\d+)?)?", seg[0]) or seg[1] != "-m":
            continue
        rest = seg[3:]
        # A subcommand is a bare word (`topk`, `OUT`); a path (`tests/browser`) or an option is an argument.
        sub = rest[0] if rest and re.fullmatch(r"[A-Za-z_][\w-]*", rest[0]) else None
        commands.append(Command(seg[2], sub, tuple(rest), where))
    return commands


def extract_commands(markdown: str, name: str = "<text>") -> list[Command]:
    """Every ``python -m`` command in a markdown text: in fenced blocks, on indented lines, in inline code."""
    lines = markdown.splitlines()
    fenced: list[tuple[int, str]] = []
    prose: list[tuple[int, str]] = []
    fence = None
    for number, line in enumerate(lines, 1):
        m = _FENCE.match(line)
        if m and (fence is None or m.group(1) == fence):
            fence = m.group(1) if fence is None else None
            prose.append((number, ""))  # a fence ends any inline code span
            continue
        (fenced if fence else prose).append((number, line))
    found = []
    for number, line in _join_continuations(fenced):
        found += _parse(line, f"{name}:{number}")
    # Outside fences: a command on a line of its own (an indented code block) ...
    for number, line in _join_continuations(prose):
        if re.match(r"^\s*(\$ )?([A-Za-z_][A-Za-z0-9_]*=\S*\s+)*python3?\s+-m\s", line):
            found += _parse(line, f"{name}:{number}")
    # ... and inline code, which may wrap onto the next line of a paragraph.
    text = "\n".join(line for _, line in prose)
    starts = [0]
    for line in text.split("\n"):
        starts.append(starts[-1] + len(line) + 1)
    for m in _INLINE.finditer(text):
        span = " ".join(m.group(1).split())
        if "python" in span and " -m " in f" {span} ":
            number = prose[sum(1 for s in starts[1:] if s <= m.start())][0]
            found += _parse(span, f"{name}:{number}")
    return found


def doc_commands() -> list[Command]:
    found = []
    for path in DOCS:
        found += extract_commands(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    return found


def unique_commands() -> list[Command]:
    """One command per (module, subcommand), the first place it is shown."""
    seen: dict[tuple[str, str | None], Command] = {}
    for c in doc_commands():
        seen.setdefault(c.key, c)
    return list(seen.values())


COMMANDS = unique_commands()


# ---- the extractor itself --------------------------------------------------------------------

SAMPLE = """
Run `python -m pkg.tool` (see docs/x.md#anchor) or, wrapped in a paragraph, `python -m
pkg.other report` there.

```bash
python -m pkg.sweep --pattern flat \\
    --budgets 8 16   # a comment
SOME_VAR=1 python -m pytest tests/browser
pip install -e . && python -m pkg.bench topk --lengths 1024
streamlit run app.py
python tools/script.py
python -c "import pkg"
```

    python -m pkg.indented run --x 1
"""


def test_extractor_finds_every_form_of_command():
    found = {(c.module, c.subcommand): c for c in extract_commands(SAMPLE)}
    assert set(found) == {
        ("pkg.tool", None), ("pkg.other", "report"), ("pkg.sweep", None), ("pytest", None),
        ("pkg.bench", "topk"), ("pkg.indented", "run"),
    }
    assert found["pkg.sweep", None].text == "python -m pkg.sweep --pattern flat --budgets 8 16"
    assert found["pkg.bench", "topk"].argv()[1:] == ["-m", "pkg.bench", "topk", "--help"]
    assert found["pkg.sweep", None].where == "<text>:6"
    assert found["pkg.other", "report"].where == "<text>:2"


def test_the_docs_show_commands():
    # A broken extractor must not pass by finding nothing.
    modules = {c.module for c in COMMANDS}
    assert {"sparse_attn.sweep", "benchmarks"} <= modules, sorted(modules)


# ---- the commands ----------------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = dict(os.environ)
    # This checkout's modules, whatever is installed; never a download.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    return env


def _run_help(command: Command) -> tuple[int | None, str]:
    """(exit code, what it printed) of ``python -m MODULE [SUBCOMMAND] --help``; exit code None on a timeout."""
    try:
        proc = subprocess.run(command.argv(), check=False, cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, ""
    return proc.returncode, proc.stdout + proc.stderr


@functools.cache
def _all_helps() -> dict[tuple[str, str | None], tuple[int | None, str]]:
    # Each run mostly waits for imports (torch): run them side by side, once for all the tests below.
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip([c.key for c in COMMANDS], pool.map(_run_help, COMMANDS)))


def _help(command: Command) -> str:
    """What ``python -m MODULE [SUBCOMMAND] --help`` prints; fails the test if it did not run cleanly."""
    sys.path.insert(0, str(ROOT))
    try:
        spec = importlib.util.find_spec(command.module)
    except ModuleNotFoundError:
        spec = None
    finally:
        sys.path.remove(str(ROOT))
    assert spec is not None, f"{command.where}: no module named {command.module!r} in `{command.text}`"
    shown = "python " + " ".join(command.argv()[1:])
    code, said = _all_helps()[command.key]
    if code is None:
        pytest.fail(f"{command.where}: `{shown}` ran past {TIMEOUT_S} s (does the module read --help?), "
                    f"shown as `{command.text}`")
    assert "No module named" not in said and "ImportError" not in said, f"{command.where}: `{shown}`:\n{said[-2000:]}"
    assert code == 0, f"{command.where}: `{shown}` exited {code}, shown as `{command.text}`:\n{said[-2000:]}"
    assert "usage" in said.lower(), f"{command.where}: `{shown}` printed no usage:\n{said[-2000:]}"
    return said


_IDS = [" ".join(filter(None, c.key)) for c in COMMANDS]


@pytest.mark.parametrize("command", COMMANDS, ids=_IDS)
def test_doc_command_runs(command: Command):
    """The module exists and its command line accepts the subcommand (run with --help)."""
    _help(command)


@pytest.mark.parametrize("command", COMMANDS, ids=_IDS)
def test_doc_command_options_exist(command: Command):
    """Every ``--option`` the documents pass to this module and subcommand is one its --help lists."""
    said = _help(command)
    listed = set(re.findall(r"(?<![\w-])--[A-Za-z0-9][\w-]*", said))
    unknown = {(c.where, opt) for c in doc_commands() if c.key == command.key
               for opt in (a.split("=", 1)[0] for a in c.args) if opt.startswith("--") and opt != "--"
               if opt not in listed}
    assert not unknown, f"options that `{command.module} {command.subcommand or ''}` does not list: {sorted(unknown)}"


def test_doc_method_names_are_registry_keys():
    """``--methods`` take the registry's keys and ``--proposals`` the sampling proposals, wherever shown.

    The decode benchmark also times SDPA and grouped Quest beside the registry's decoders: its own list.
    """
    from benchmarks.decode import METHODS_TIMED
    from sparse_attn.methods import METHODS
    from sparse_attn.ops.sampling import PROPOSALS

    wrong = []
    for c in doc_commands():
        methods = METHODS_TIMED if c.module == "benchmarks.decode" else METHODS
        allowed = {"--methods": set(methods), "--proposals": set(PROPOSALS)}
        option = None
        for arg in c.args:
            if arg.startswith("-"):
                option = arg if arg in allowed else None
            elif option is not None and arg not in allowed[option]:
                wrong.append(f"{c.where}: {option} {arg}")
    assert not wrong, "not names the library knows: " + "; ".join(wrong)



def test_doc_gpu_sections_exist():
    """``python -m benchmarks.gpu OUT SECTION ...``: every section shown is one the driver runs."""
    from benchmarks.gpu import SECTIONS

    shown = [(c.where, a) for c in doc_commands() if c.module == "benchmarks.gpu"
             for a in c.args[1:] if not a.startswith("-")]
    assert shown, "the docs show no GPU section"
    wrong = [f"{where}: {a}" for where, a in shown if a not in SECTIONS]
    assert not wrong, f"not sections of benchmarks.gpu ({list(SECTIONS)}): " + "; ".join(wrong)

# ---- the Python examples ---------------------------------------------------------------------

def _python_blocks(markdown: str):
    block, lang = None, ""
    for number, line in enumerate(markdown.splitlines(), 1):
        m = re.match(r"^[ \t]*```(\w*)", line)
        if m and block is None:
            block, lang, start = [], m.group(1), number
        elif m:
            if lang in ("python", "py"):
                yield start, "\n".join(block)
            block = None
        elif block is not None:
            block.append(line)


def doc_imports() -> list[tuple[str, str, tuple[str, ...]]]:
    """(where, module, names) for every ``import``/``from ... import`` of the project in a python block."""
    found = []
    for path in DOCS:
        for start, code in _python_blocks(path.read_text(encoding="utf-8")):
            # `from x import (a,\n b)` on one line, keeping the line count so `where` stays right.
            code = re.sub(r"import\s*\(([^)]*)\)",
                          lambda m: "import " + " ".join(m.group(1).split()) + "\n" * m.group(0).count("\n"), code)
            for offset, line in enumerate(code.splitlines(), 1):
                where = f"{path.relative_to(ROOT)}:{start + offset}"
                m = re.match(r"^\s*from\s+(\S+)\s+import\s+(.+)$", line)
                if m and m.group(1).split(".")[0] in ("sparse_attn", "benchmarks"):
                    names = tuple(n.split(" as ")[0].strip() for n in m.group(2).split("#")[0].split(","))
                    found.append((where, m.group(1), tuple(n for n in names if n)))
                m = re.match(r"^\s*import\s+(sparse_attn\S*|benchmarks\S*)", line)
                if m:
                    found.append((where, m.group(1).rstrip(","), ()))
    return found


IMPORTS = doc_imports()


def test_the_docs_show_imports():
    assert any(module == "sparse_attn" for _, module, _ in IMPORTS), IMPORTS


@pytest.mark.parametrize("where, module, names", IMPORTS, ids=[w for w, _, _ in IMPORTS])
def test_doc_import_works(where, module, names):
    mod = importlib.import_module(module)
    for name in names:
        if not hasattr(mod, name):
            importlib.import_module(f"{module}.{name}")  # a submodule: from pkg import sub

"""The layout docs/architecture.md describes, checked: data flows one way and one vocabulary names the methods."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_attn.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sparse_attn"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (imports inside functions count too)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from pkg import submodule` imports the submodule; `from mod import name` imports mod.
            subs = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
            found.update(subs or [target])
    return found


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    return {_module_name(f): {m for m in _imports(f) if m == "sparse_attn" or m.startswith("sparse_attn.")}
            for f in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_scan_sees_relative_and_nested_imports(tmp_path):
    imports = _imports(PACKAGE / "ops" / "topk.py")
    assert {"sparse_attn._checks", "sparse_attn.kernels.dispatch", "sparse_attn.ops.dense"} <= imports
    assert "sparse_attn.kernels.topk_fused" in imports  # imported inside the function that dispatches


def test_no_import_cycle_in_the_package():
    graph = _graph()
    assert len(graph) > 30  # the scan saw the package
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_streamlit_only_in_the_ui_and_benchmarks_never_in_the_package():
    for path in sorted(PACKAGE.rglob("*.py")):
        top = {m.split(".")[0] for m in _imports(path)}
        assert "benchmarks" not in top, f"{path.relative_to(ROOT)} imports the benchmarks"
        if PACKAGE / "ui" not in path.parents:
            assert "streamlit" not in top, f"{path.relative_to(ROOT)} imports Streamlit outside sparse_attn/ui"


def test_importing_the_library_loads_neither_streamlit_nor_the_benchmarks():
    code = ("import sys, sparse_attn, sparse_attn.methods, sparse_attn.sweep, sparse_attn.viz, sparse_attn.sources; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('streamlit', 'benchmarks')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- one vocabulary: every front end accepts registry keys and nothing else -----------------------

NOT_KEYS = ["sdpa", "full_topk", "streaming_topk", "sampled", "sampled:lsh", "hybrid:uniform", "prefilter_topk", ""]


def test_the_sweep_accepts_registry_keys_only():
    from sparse_attn.sweep import main, sweepable

    assert sweepable() and set(sweepable()) <= set(METHODS)
    for bad in NOT_KEYS:
        with pytest.raises(SystemExit):
            main(["--methods", bad, "--length", "8", "--budgets", "2"])


def test_the_app_accepts_registry_keys_only():
    from sparse_attn.methods import choices
    from sparse_attn.ui import state

    parse = state.specs()["method"].parse
    for key in choices("method"):
        assert parse(key) == key and key in METHODS
    for bad in NOT_KEYS + ["dense", "nsa_selected"]:  # real keys, but not methods a student picks
        with pytest.raises(ValueError):
            parse(bad)


def test_the_benchmark_cli_accepts_registry_keys_only(capsys):
    from benchmarks.__main__ import main

    for sub in ("topk", "sweep"):
        for bad in NOT_KEYS:
            with pytest.raises(SystemExit):
                main([sub, "--methods", bad, "--lengths", "8"])
    err = capsys.readouterr().err
    assert "topk_full" in err  # the refusal lists the registry's keys


def test_every_config_field_reaches_every_front_end():
    """A new Config field fails here until the app and the benchmark command line know it (docs/architecture.md)."""
    from dataclasses import fields

    from benchmarks.cli import _SETTINGS
    from sparse_attn.i18n import LANGS, t
    from sparse_attn.methods import Config
    from sparse_attn.ui import compute, state

    names = [f.name for f in fields(Config)]
    # The app fixes the softmax scale and the compression stride (no slider); every other field has a widget.
    assert set(compute.CONFIG_KEYS) == set(names) - {"scale", "compress_block_sliding_stride"}
    for name in compute.CONFIG_KEYS:
        widget = state.widget_of(name)
        assert widget in state.specs(), f"Config.{name} has no setting in sparse_attn/ui/state.py"
        for lang in LANGS:
            assert t(f"setting.{widget}", lang)
    # causal and seed are flags of their own there; the scale stays SDPA's default.
    missing = set(names) - {"causal", "seed", "scale"} - set(_SETTINGS)
    assert not missing, f"benchmarks/cli.py has no flag for {sorted(missing)}"

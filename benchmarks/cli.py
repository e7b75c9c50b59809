"""Time and peak memory of attention methods: the ``python -m benchmarks`` command line.

    python -m benchmarks topk --lengths 1024 4096 16384 --heads 8 \
        --head-dim 64 --top-k 64 --chunk-size 1024 --dtype float32 --device cpu

    python -m benchmarks sweep --methods dense topk nsa_selected nsa \
        --lengths 1024 4096 --heads 8 --kv-heads 2 --top-k 64 --chunk-size 256 1024 \
        --dtypes float32 --devices cpu --out results/run   # -> run.csv, run.json, run.html

    python -m benchmarks report results/run.json          # -> results/run.html

Methods are the keys of ``sparse_attn.methods.METHODS``; settings are named
as ``sparse_attn.methods.Config``'s fields (``--top-k``, ``--num-samples``,
``--selection-block-size``, ...). ``dense`` is SDPA; ``--sdpa-backends``
pins it to backends of ``torch.nn.attention.sdpa_kernel``.

Peak memory is measured, never estimated: on CUDA with the allocator's peak
counter, on the CPU as the resident set's high-water mark of a fresh
subprocess that runs the case once. A sweep runs every combination of its
lists (in ``sweep`` every setting takes one or more values), with a progress
bar; a case that cannot run (no CUDA, a length whose estimated memory does
not fit the device, a backend that refuses the shapes) becomes a row with a
``note`` and the sweep goes on. ``report`` rebuilds the HTML from a JSON
file (for results made where plotly is not installed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

import torch

from sparse_attn.methods import METHODS, check_method
from sparse_attn.ops.sampling import PROPOSALS

from .cases import DEFAULT_CONFIG, DTYPES, SDPA_BACKENDS, Case, sweep_cases
from .report import format_table, report_html, write_results
from .runner import measure_case, run_case_subprocess, run_sweep

__all__ = ["main"]

# The Config fields a benchmark can set, with what they mean; ``causal`` has its own flag.
_SETTINGS = {
    "top_k": (int, "keys kept per query"),
    "num_samples": (int, "keys drawn per query"),
    "proposal": (str, "where sampling draws keys from"),
    "chunk_size": (int, "query block and key chunk of the streaming top-k"),
    "selection_block_size": (int, "tokens per NSA selection block"),
    "num_selected_blocks": (int, "NSA selection blocks per query"),
    "compress_block_size": (int, "tokens per NSA compression block"),
    "compress_block_sliding_stride": (int, "stride between NSA compression blocks"),
    "num_initial_blocks": (int, "NSA blocks every query selects at the start of the sequence"),
    "num_local_blocks": (int, "NSA blocks every query selects, ending at its own block"),
    "sliding_window_size": (int, "keys of the sliding window (NSA's third branch, StreamingLLM's window)"),
    "num_sink_tokens": (int, "StreamingLLM's attention sinks: the first keys every query reads"),
    "token_budget": (int, "Quest's tokens per query, read as whole pages"),
    "page_size": (int, "tokens per Quest page"),
}


def _method(name: str) -> str:
    try:
        return check_method(name).key
    except ValueError as e:  # argparse shows this message as it is
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_methods(p, default: list[str]) -> None:
    p.add_argument("--methods", nargs="+", type=_method, default=default, metavar="METHOD",
                   help=f"keys of sparse_attn.methods.METHODS: {', '.join(METHODS)} (default: {' '.join(default)})")
    p.add_argument("--sdpa-backends", nargs="+", choices=list(SDPA_BACKENDS), default=["default"],
                   help="SDPA backends to time dense with (torch.nn.attention.sdpa_kernel); default lets PyTorch pick")


def _add_settings(p, *, many: bool) -> None:
    g = p.add_argument_group("method settings (sparse_attn.methods.Config; a method ignores those it does not read)")
    for name, (kind, text) in _SETTINGS.items():
        readers = [k for k, m in METHODS.items() if name in m.params]
        default = getattr(DEFAULT_CONFIG, name)
        help_ = f"{text}{' (' + ', '.join(readers) + ')' if readers else ''}; default {default}"
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=[default] if many else default,
                       nargs="+" if many else None, choices=PROPOSALS if name == "proposal" else None,
                       help=help_ + ("; several values: one case each" if many else ""))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("topk", help="dense SDPA vs the seed's top-k vs full-score and streaming top-k: time and peak memory")
    _add_methods(p, ["dense", "seed_topk", "topk_full", "topk"])
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and of the method's own randomness")
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument("--min-runs", type=int, default=5)
    p.add_argument("--json", dest="json_out", default=None, help="also write the rows to this JSON file")
    _add_settings(p, many=False)

    w = sub.add_parser("sweep", help="every combination of methods, lengths, settings, heads, dtypes, devices")
    _add_methods(w, ["dense", "topk"])
    w.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096])
    w.add_argument("--batch", type=int, default=1)
    w.add_argument("--heads", nargs="+", type=int, default=[8])
    w.add_argument("--kv-heads", nargs="+", type=int, default=[0], help="0 = same as heads")
    w.add_argument("--head-dims", nargs="+", type=int, default=[64])
    w.add_argument("--dtypes", nargs="+", default=["float32"])
    w.add_argument("--devices", nargs="+", default=["cpu"])
    w.add_argument("--causal", choices=["no", "yes", "both"], default="no")
    w.add_argument("--seed", type=int, default=0, help="seed of the inputs and of the method's own randomness")
    w.add_argument("--min-run-time", type=float, default=0.5)
    w.add_argument("--min-runs", type=int, default=5)
    w.add_argument("--out", default="bench_results", help="path stem: writes STEM.csv, STEM.json, STEM.html")
    w.add_argument("--no-progress", action="store_true")
    _add_settings(w, many=True)

    r = sub.add_parser("report", help="build the HTML report from a sweep's JSON file")
    r.add_argument("json_file")
    r.add_argument("--out", default=None, help="the HTML file to write (default: JSON_FILE with .html)")
    return parser


def _case_parser() -> argparse.ArgumentParser:
    # Internal (run_case_subprocess): kept out of the public parser, whose help would list it.
    c = argparse.ArgumentParser(prog="python -m benchmarks _case", description="measure one case in this process")
    c.add_argument("case", help="a row as Case.to_row writes it, as JSON; prints the measured row")
    c.add_argument("--no-timing", action="store_true")
    return c


def main(argv: list[str] | None = None) -> int:
    """The ``python -m benchmarks`` command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_case"]:
        args = _case_parser().parse_args(argv[1:])
        print(json.dumps(measure_case(Case.from_row(json.loads(args.case)), timing=not args.no_timing)))
        return 0
    args = _parser().parse_args(argv)

    if args.command == "report":
        with open(args.json_file) as f:
            data = json.load(f)
        rows, meta = (data["rows"], data.get("meta")) if isinstance(data, dict) else (data, None)
        out = args.out or os.path.splitext(args.json_file)[0] + ".html"
        page = report_html(rows, meta)
        with open(out, "w") as f:
            f.write(page)
        print(out)
        return 0

    if args.command == "sweep":
        causal = {"no": (False,), "yes": (True,), "both": (False, True)}[args.causal]
        vary = {name: getattr(args, name) for name in _SETTINGS} | {"causal": causal}
        cases = sweep_cases(args.methods, args.lengths, batch=args.batch, heads=args.heads,
                            kv_heads=[h or None for h in args.kv_heads], head_dims=args.head_dims,
                            dtypes=args.dtypes, devices=args.devices, sdpa_backends=args.sdpa_backends, vary=vary,
                            seed=args.seed, min_run_time=args.min_run_time, min_runs=args.min_runs)
        rows = run_sweep(cases, progress=not args.no_progress)
        print(format_table(rows))
        for path in write_results(rows, args.out):
            print(path)
        return 0

    cfg = replace(DEFAULT_CONFIG, causal=args.causal, **{name: getattr(args, name) for name in _SETTINGS})
    cases = sweep_cases(args.methods, args.lengths, batch=args.batch, heads=(args.heads,), kv_heads=(args.kv_heads,),
                        head_dims=(args.head_dim,), dtypes=(args.dtype,), devices=(args.device,),
                        sdpa_backends=args.sdpa_backends, config=cfg, seed=args.seed,
                        min_run_time=args.min_run_time, min_runs=args.min_runs)
    rows = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.label} L={case.length} ...", file=sys.stderr, flush=True)
        rows.append(run_case_subprocess(case))
    settings = ", ".join(f"{name}={getattr(cfg, name)}" for name in _SETTINGS)
    print(f"torch {torch.__version__}, {args.device}, {args.dtype}, B={args.batch}, H={args.heads}, "
          f"Hkv={args.kv_heads or args.heads}, D={args.head_dim}, causal={args.causal}, {settings}, "
          f"threads={torch.get_num_threads()}")
    print(format_table(rows))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0

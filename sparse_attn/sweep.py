"""Budget sweep: error, mass kept and time of each sparse method at each keys-per-query budget.

    python -m sparse_attn.sweep --pattern flat --length 1024 --heads 4 \
        --budgets 8 16 32 64 128 --methods topk sampling hybrid --proposals uniform lsh \
        --seeds 8 --csv sweep.csv

A *budget* is the number of keys whose score and value a query reads; each
method's registry entry (``sparse_attn.methods``) says how a budget sets its
``Config`` (``Method.at_budget``, given the key length):

- ``"topk"``, ``"topk_full"``: ``top_k = budget``;
- ``"sampling"``: ``num_samples = budget`` draws from the proposal;
- ``"hybrid"``: ``top_k = budget // 2`` exact keys plus ``budget - top_k``
  draws from the tail, as vAttention splits it (no point below a budget of 2);
- ``"nsa"``: compressed keys + selected blocks' tokens + sliding window
  within the budget, block sizes fixed (no point below the compressed keys
  and the forced blocks);
- ``"streaming_llm"``: the sinks as set, the window takes the rest;
- ``"quest"``: ``token_budget = budget``, read as whole pages (rounded up).

The ``keys_attended`` column says what each row really read, so a budget can
be checked: sampling draws with replacement (fewer distinct keys than draws),
Quest rounds up to pages, and NSA's effective weights reach every key under a
compressed block it reads (the budget counts such a block as one key).
Methods that read a proposal run once per entry of ``proposals`` (the
command line's default is ``uniform``, as vAttention samples its tail). Each
method runs once per seed; the table reports the mean and standard deviation
over seeds of the per-query metrics averaged over all query rows
(deterministic methods run once: their spread is 0).

A caller that must stay responsive (the app, with a student waiting) passes
``should_stop`` and ``deadline``: the sweep checks them before every run of
one seed and returns the rows it finished, saying why it stopped in
``table.attrs``. ``on_step`` reports progress, and ``reference`` lets a sweep
done in pieces compute the dense reference once.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time as _time
from dataclasses import replace

import torch

from ._checks import check_choice, check_int, check_qkv
from .methods import METHODS, Config
from .metrics import error_vs_uniform, kl_divergence, mass_kept, relative_error, total_variation
from .ops.dense import dense_attention
from .ops.sampling import PROPOSALS
from .timing import time_fn

__all__ = ["COLUMNS", "sweepable", "default_methods", "budget_sweep", "format_table", "main"]

COLUMNS = [
    "method", "proposal", "budget", "seeds", "error_mean", "error_std", "error_vs_uniform_mean",
    "error_vs_uniform_std", "mass_kept_mean", "mass_kept_std", "tv_mean", "kl_finite", "kl_mean", "keys_attended",
    "time_ms", "time_iqr_ms",
]


def sweepable() -> list[str]:
    """Registry keys that a budget can drive (``Method.at_budget`` is set), in registration order."""
    return [key for key, m in METHODS.items() if m.at_budget is not None and m.run is not None]


def default_methods() -> list[str]:
    """The sweepable methods a reader picks (role "method"): ``sweepable()`` without timing twins such as topk_full."""
    return [key for key in sweepable() if METHODS[key].role == "method"]


def budget_sweep(q, k, v, methods, budgets, *, proposals=None, seeds=(0, 1, 2, 3, 4), causal: bool = False,
                 scale: float | None = None, time: bool = False, min_run_time: float = 0.1,
                 config: Config | None = None, should_stop=None, deadline: float | None = None, on_step=None,
                 reference=None):
    """A tidy table: one row per (method, proposal, budget), metrics aggregated over seeds.

    Args:
        q, k, v: as ``dense_attention`` (B, H, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv).
        methods: registry keys from ``sweepable()``.
        budgets: keys per query, each >= 1 (beyond Lk means all keys).
        proposals: for methods that read a proposal, each is run once per
            entry (from ``sparse_attn.ops.sampling.PROPOSALS``); default
            ``config.proposal``.
        seeds: ints, one run each (``Config.seed``, which seeds a
            ``torch.Generator`` on q's device).
        causal, scale: as ``dense_attention``.
        time: also time one call per row with ``sparse_attn.timing.time_fn``
            (median and IQR in ms); otherwise NaN.
        config: the other settings (chunk size, sinks, page size, ...); default ``Config()``.
        should_stop: a callable taking nothing, asked before every run of one
            seed; True stops the sweep (e.g. the student who asked left).
        deadline: a ``time.monotonic()`` instant; no run starts after it.
        on_step: called after every run of one seed as ``on_step(done, total,
            method, budget)`` (runs counted over the whole sweep).
        reference: ``dense_attention(q, k, v, causal=causal, scale=scale,
            return_weights=True)`` for these inputs, when the caller has it.

    Returns:
        pandas DataFrame with columns ``COLUMNS``. ``proposal`` is "" for
        methods without one. Per query row, averaged over all rows, then mean
        and std over seeds: ``error`` is ``metrics.relative_error`` (against
        the zero output: it can exceed 1 when the dense output nearly
        cancels), ``error_vs_uniform`` is ``metrics.error_vs_uniform``
        (against attending to every allowed key equally; rows where that is
        exact are left out), ``mass_kept`` the dense mass on the distinct keys
        attended, ``tv`` the total variation between dense and effective
        rows. KL is infinite on every row that drops a key with weight, so it
        is not averaged: ``kl_finite`` is the share of rows (over seeds) with
        finite KL and ``kl_mean`` the mean KL over those rows (NaN when there
        is none). ``keys_attended`` is the mean number of distinct keys per
        query. A budget too small for a method (``at_budget`` returns None,
        e.g. the hybrid at 1) has no row. A method whose picture has a twin
        that selects the same keys (``Method.same_result_as``) is measured
        through it; ``time`` times the method itself.

        ``table.attrs``: ``stopped`` is None for a complete sweep, else
        "deadline" or "should_stop" (only rows whose every seed ran are
        kept); ``runs`` is (runs done, runs planned).
    """
    import pandas as pd  # the table is for display; the methods need only torch

    check_qkv(q, k, v)
    methods = [check_choice(m, "method", sweepable()) for m in methods]  # the methods a budget drives
    budgets = [check_int(b, "budget", minimum=1) for b in budgets]
    seeds = [check_int(s, "seed", minimum=0) for s in seeds]
    if not seeds:
        raise ValueError("seeds must hold at least one seed, got none")
    base = replace(config or Config(), causal=causal, scale=scale)
    proposals = [base.proposal] if proposals is None else [check_choice(p, "proposal", PROPOSALS) for p in proposals]
    if deadline is not None and not isinstance(deadline, (int, float)):
        raise TypeError(f"deadline must be a time.monotonic() instant (a number), got {type(deadline).__name__}")
    for name, fn in (("should_stop", should_stop), ("on_step", on_step)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")
    Lk = k.shape[2]
    # Every (method, proposal, budget) row with its config and seeds, planned first so progress has a total.
    plan = []
    for key in methods:
        method = METHODS[key]
        random = "proposal" in method.params
        for proposal in proposals if random else [""]:
            for budget in budgets:
                cfg = method.at_budget(replace(base, proposal=proposal or base.proposal), budget, num_keys=Lk)
                if cfg is not None:
                    plan.append((key, proposal, budget, cfg, seeds if random else seeds[:1]))
    total = sum(len(run_seeds) for *_, run_seeds in plan)
    done, stopped = 0, None

    def halt():
        if should_stop is not None and should_stop():
            return "should_stop"
        if deadline is not None and _time.monotonic() >= deadline:
            return "deadline"
        return None

    stopped = halt()  # before the dense reference, which costs a run of its own
    if stopped is None:
        ref, p = reference if reference is not None else dense_attention(q, k, v, causal=causal, scale=scale,
                                                                          return_weights=True)
    rows = []
    for key, proposal, budget, cfg, run_seeds in plan if stopped is None else []:
        method = METHODS[key]
        errs, unis, masses, tvs, keys = [], [], [], [], []
        kl_rows = kl_count = 0
        kl_sum = 0.0
        for seed in run_seeds:
            stopped = halt()
            if stopped:
                break
            with torch.no_grad():
                r = method.run_for_picture(q, k, v, replace(cfg, seed=seed))
            errs.append(relative_error(r.output, ref, reduce="all").item())
            unis.append(error_vs_uniform(r.output, ref, v, causal=causal, reduce="all").item())
            masses.append(mass_kept(p, r.mask, reduce="all").item())
            w = r.weights.to(p.dtype)
            tvs.append(total_variation(p, w, reduce="all").item())
            kl = kl_divergence(p, w)
            finite = torch.isfinite(kl)
            kl_rows += kl.numel()
            kl_count += int(finite.sum())
            kl_sum += torch.where(finite, kl, 0.0).sum().item()
            keys.append(r.mask.sum(-1).double().mean().item())
            done += 1
            if on_step is not None:
                on_step(done, total, key, budget)
        if stopped:
            break  # the row's seeds did not all run: leave it out rather than average fewer
        t_ms = iqr_ms = float("nan")
        if time:
            t = time_fn(method.timed(q, k, v, replace(cfg, seed=seeds[0])), min_run_time=min_run_time,
                        min_runs=3)
            t_ms, iqr_ms = t.median * 1e3, t.iqr * 1e3
        rows.append({
            "method": key, "proposal": proposal, "budget": budget, "seeds": len(run_seeds),
            "error_mean": statistics.fmean(errs), "error_std": statistics.pstdev(errs),
            "error_vs_uniform_mean": statistics.fmean(unis), "error_vs_uniform_std": statistics.pstdev(unis),
            "mass_kept_mean": statistics.fmean(masses), "mass_kept_std": statistics.pstdev(masses),
            "tv_mean": statistics.fmean(tvs),
            "kl_finite": kl_count / max(kl_rows, 1),
            "kl_mean": kl_sum / kl_count if kl_count else float("nan"),
            "keys_attended": statistics.fmean(keys),
            "time_ms": t_ms, "time_iqr_ms": iqr_ms,
        })
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.attrs.update(stopped=stopped, runs=(done, total))
    return table


def format_table(table, *, time: bool = False):
    """The sweep's table for reading: each mean and std as one "mean ± std" column (std left out at one seed).

    Columns: method, proposal, budget, seeds, error, error_vs_uniform,
    mass_kept, tv, kl_finite, kl_mean ("-" where no row is finite),
    keys_attended, and with ``time`` time_ms ("median ± IQR").
    """
    import pandas as pd

    def num(x: float) -> str:
        return "-" if x != x else f"{x:.4g}"  # x != x: NaN

    def spread(mean: str, std: str, iqr: bool = False):
        return [num(m) if (n == 1 and not iqr) or s != s else f"{num(m)} ± {num(s)}"
                for m, s, n in zip(table[mean], table[std], table["seeds"])]

    out = pd.DataFrame({
        "method": table["method"], "proposal": table["proposal"], "budget": table["budget"], "seeds": table["seeds"],
        "error": spread("error_mean", "error_std"),
        "error_vs_uniform": spread("error_vs_uniform_mean", "error_vs_uniform_std"),
        "mass_kept": spread("mass_kept_mean", "mass_kept_std"),
        "tv": table["tv_mean"].map(num), "kl_finite": table["kl_finite"].map(num),
        "kl_mean": table["kl_mean"].map(num), "keys_attended": table["keys_attended"].map(num),
    })
    if time:
        out["time_ms"] = spread("time_ms", "time_iqr_ms", iqr=True)
    return out


def main(argv=None) -> int:
    """The ``python -m sparse_attn.sweep`` command line; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m sparse_attn.sweep", description=__doc__.split("\n")[0])
    ap.add_argument("--pattern", default="flat", help="a synthetic pattern from sparse_attn.sources (default flat)")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="a pattern parameter, e.g. --param temperature=2 (repeatable)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic q, k, v")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--methods", nargs="+", default=default_methods(), choices=sweepable(), metavar="METHOD",
                    help=f"from {sweepable()} (default {default_methods()})")
    ap.add_argument("--proposals", nargs="+", default=["uniform"], choices=PROPOSALS,
                    help="proposals of the sampling methods, each run on its own (default uniform, the tail "
                         "vAttention samples; e.g. --proposals uniform lsh oracle to compare them)")
    ap.add_argument("--budgets", nargs="+", type=int, default=[8, 16, 32, 64, 128])
    ap.add_argument("--seeds", type=int, default=5, help="number of sampling seeds (0..N-1)")
    ap.add_argument("--time", action="store_true", help="also time each method (torch.utils.benchmark)")
    ap.add_argument("--csv", default=None, help="write the table to this CSV file")
    args = ap.parse_args(argv)

    params = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--param must be NAME=VALUE, got {item!r}")
        params[name] = float(value) if any(c in value for c in ".e") else int(value)
    from .sources.synthetic import synthetic_qkv  # the command line's input; the sweep itself takes any q, k, v

    q, k, v = synthetic_qkv(args.pattern, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
                            length=args.length, head_dim=args.head_dim, seed=args.data_seed, **params)
    dtype = getattr(torch, args.dtype)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    table = budget_sweep(q, k, v, args.methods, args.budgets, proposals=args.proposals, seeds=range(args.seeds),
                         causal=args.causal, time=args.time)
    print(f"# pattern={args.pattern} {params or ''} B={args.batch} H={args.heads} L={args.length} "
          f"D={args.head_dim} dtype={args.dtype} causal={args.causal} seeds={args.seeds} torch={torch.__version__}")
    print("# mean ± std over seeds; error: ||o - o_ref|| / ||o_ref||; error_vs_uniform: / ||o_uniform - o_ref||; "
          "kl_mean: over the kl_finite share of rows (KL is inf where a key with weight is dropped)")
    print(format_table(table, time=args.time).to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

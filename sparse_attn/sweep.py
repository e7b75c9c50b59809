"""Budget sweep: error, mass kept and time of each sparse method at each keys-per-query budget.

    python -m sparse_attn.sweep --pattern flat --length 1024 --heads 4 \
        --budgets 8 16 32 64 128 --methods topk hybrid sampled:uniform sampled:lsh \
        --seeds 8 --csv sweep.csv

A *budget* is the number of keys whose score and value a query reads:

- ``"topk"``: ``topk_attention(top_k=budget)``;
- ``"sampled:<proposal>"``: ``sampled_attention(num_samples=budget, proposal=...)``;
- ``"hybrid"`` / ``"hybrid:<proposal>"``: ``top_k = budget // 2`` exact keys
  plus ``budget - top_k`` draws from the tail (default proposal ``"uniform"``,
  as vAttention samples its tail).

Sampling draws with replacement, so a budget can attend to fewer distinct keys
than it reads. Each method runs once per seed; the table reports the mean and
standard deviation over seeds of the per-query metrics averaged over all
query rows (deterministic methods run once: their spread is 0).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from ._checks import check_int, check_qkv
from .attention import dense_attention, topk_attention
from .metrics import mass_kept, relative_error, total_variation
from .sampling import PROPOSALS, sampled_attention

__all__ = ["HYBRID_DEFAULT_PROPOSAL", "parse_method", "run_method", "budget_sweep", "main"]

HYBRID_DEFAULT_PROPOSAL = "uniform"
COLUMNS = [
    "method", "budget", "seeds", "error_mean", "error_std", "mass_kept_mean", "mass_kept_std",
    "tv_mean", "keys_attended", "time_ms", "time_iqr_ms",
]


def parse_method(method: object) -> tuple[str, str | None]:
    """``"topk"`` -> ("topk", None); ``"sampled:lsh"`` -> ("sampled", "lsh"); ``"hybrid"`` -> ("hybrid", "uniform")."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, got {type(method).__name__}")
    kind, _, proposal = method.partition(":")
    allowed = f"'topk', 'sampled:<p>' or 'hybrid[:<p>]' with <p> in {PROPOSALS}"
    if kind == "topk" and not proposal:
        return "topk", None
    if kind == "hybrid" and not proposal:
        return "hybrid", HYBRID_DEFAULT_PROPOSAL
    if kind in ("sampled", "hybrid") and proposal in PROPOSALS:
        return kind, proposal
    raise ValueError(f"method must be {allowed}, got {method!r}")


def run_method(q, k, v, method: str, budget: int, *, causal=False, scale=None, generator=None):
    """(out, Selection) of ``method`` at ``budget`` keys per query (see the module docstring)."""
    kind, proposal = parse_method(method)
    check_int(budget, "budget", minimum=1)
    if kind == "topk":
        return topk_attention(q, k, v, budget, causal=causal, scale=scale, return_selection=True)
    top_k = budget // 2 if kind == "hybrid" else 0
    return sampled_attention(q, k, v, budget - top_k, proposal=proposal, top_k=top_k, causal=causal,
                             scale=scale, generator=generator, return_selection=True)


def budget_sweep(q, k, v, methods, budgets, *, seeds=(0, 1, 2, 3, 4), causal: bool = False,
                 scale: float | None = None, time: bool = False, min_run_time: float = 0.1):
    """A tidy table: one row per (method, budget), metrics aggregated over seeds.

    Args:
        q, k, v: as ``dense_attention`` (B, H, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv).
        methods: names as ``parse_method`` accepts.
        budgets: keys per query, each >= 1 (beyond Lk means all keys).
        seeds: ints seeding a ``torch.Generator`` on q's device, one run each.
        causal, scale: as ``dense_attention``.
        time: also time one call per (method, budget) with
            ``sparse_attn.bench.time_fn`` (median and IQR in ms); otherwise NaN.

    Returns:
        pandas DataFrame with columns ``method, budget, seeds, error_mean,
        error_std, mass_kept_mean, mass_kept_std, tv_mean, keys_attended,
        time_ms, time_iqr_ms``. ``error`` is the relative output error per
        query row (``metrics.relative_error``) averaged over rows; ``mass_kept``
        the dense mass on the distinct keys attended; ``tv`` the total variation
        between dense and effective rows; ``keys_attended`` the mean number of
        distinct keys per query.
    """
    import pandas as pd  # the table is for display; the methods need only torch

    check_qkv(q, k, v)
    methods = list(methods)
    for m in methods:
        parse_method(m)
    budgets = [check_int(b, "budget", minimum=1) for b in budgets]
    seeds = [check_int(s, "seed", minimum=0) for s in seeds]
    if not seeds:
        raise ValueError("seeds must hold at least one seed, got none")
    Lk = k.shape[2]
    ref, p = dense_attention(q, k, v, causal=causal, scale=scale, return_weights=True)
    rows = []
    for method in methods:
        kind, _ = parse_method(method)
        for budget in budgets:
            run_seeds = seeds[:1] if kind == "topk" else seeds
            errs, masses, tvs, keys = [], [], [], []
            for seed in run_seeds:
                g = torch.Generator(device=q.device).manual_seed(seed)
                out, sel = run_method(q, k, v, method, budget, causal=causal, scale=scale, generator=g)
                mask = sel.mask(Lk)
                errs.append(relative_error(out, ref).mean().item())
                masses.append(mass_kept(p, mask).mean().item())
                tvs.append(total_variation(p, sel.to_dense(Lk).to(p.dtype)).mean().item())
                keys.append(mask.sum(-1).double().mean().item())
            t_ms = iqr_ms = float("nan")
            if time:
                from .bench import time_fn

                g = torch.Generator(device=q.device).manual_seed(seeds[0])
                t = time_fn(lambda: run_method(q, k, v, method, budget, causal=causal, scale=scale, generator=g),
                            device=q.device, min_run_time=min_run_time, min_runs=3)
                t_ms, iqr_ms = t.median * 1e3, t.iqr * 1e3
            rows.append({
                "method": method, "budget": budget, "seeds": len(run_seeds),
                "error_mean": statistics.fmean(errs), "error_std": statistics.pstdev(errs),
                "mass_kept_mean": statistics.fmean(masses), "mass_kept_std": statistics.pstdev(masses),
                "tv_mean": statistics.fmean(tvs), "keys_attended": statistics.fmean(keys),
                "time_ms": t_ms, "time_iqr_ms": iqr_ms,
            })
    return pd.DataFrame(rows, columns=COLUMNS)


def _load_synthetic():
    try:
        from .sources import synthetic_qkv
    except ImportError:
        from .sources.synthetic import synthetic_qkv
    return synthetic_qkv


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
    ap.add_argument("--methods", nargs="+", default=["topk", "hybrid", "sampled:uniform", "sampled:lsh", "sampled:oracle"])
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
    q, k, v = _load_synthetic()(args.pattern, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
                                length=args.length, head_dim=args.head_dim, seed=args.data_seed, **params)
    dtype = getattr(torch, args.dtype)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    table = budget_sweep(q, k, v, args.methods, args.budgets, seeds=range(args.seeds), causal=args.causal, time=args.time)
    print(f"# pattern={args.pattern} {params or ''} B={args.batch} H={args.heads} L={args.length} "
          f"D={args.head_dim} dtype={args.dtype} causal={args.causal} seeds={args.seeds} torch={torch.__version__}")
    with_time = args.time
    cols = [c for c in COLUMNS if with_time or not c.startswith("time")]
    print(table[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

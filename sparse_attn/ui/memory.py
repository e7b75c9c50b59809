"""The app's memory budget: refuse settings whose estimated memory would exhaust a shared server.

Policy, not library: the methods' cost models (``Method.cost``) estimate what a
call needs; this module adds what the app holds to draw the picture and says
which setting to lower. The budget is 2 GiB per view by default, or
``SPARSE_ATTN_MEMORY_BUDGET_MB``.
"""
from __future__ import annotations

import os
from dataclasses import replace

from sparse_attn.methods import METHODS, Config, Method, SettingError, Shape, check_method

__all__ = ["BUDGET_ENV", "BudgetError", "default_budget_bytes", "estimate_view_memory", "check_budget"]

BUDGET_ENV = "SPARSE_ATTN_MEMORY_BUDGET_MB"


class BudgetError(SettingError):
    """The estimated memory exceeds the budget; ``params['setting']`` is the one to lower."""


def mib_from_env(name: str) -> int | None:
    """The environment variable ``name`` as bytes (a positive number of MiB), or None when unset or not positive."""
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of MiB, got {raw!r}") from None
    return int(mb * 2**20) if mb > 0 else None


def default_budget_bytes() -> int:
    """2 GiB (a laptop shared with a browser), or ``SPARSE_ATTN_MEMORY_BUDGET_MB`` when set."""
    found = mib_from_env(BUDGET_ENV)
    return 2 * 2**30 if found is None else found


def estimate_view_memory(s: Shape) -> float:
    """Bytes the picture needs on top of the methods: dense and sparse weights, their difference and the mask (float32)."""
    return float(s.B * s.H * s.Lq * s.Lk * (4 * 3 + 1))


def _total(method: Method, s: Shape, cfg: Config, itemsize: int, with_view: bool) -> float:
    need = method.cost(s, cfg, itemsize).memory_bytes
    if with_view:
        need += METHODS["dense"].cost(s, cfg, itemsize).memory_bytes + estimate_view_memory(s)
        need += method.picture_maps * s.B * s.H * s.Lq * s.Lk * itemsize
    need += s.B * (s.H * s.Lq * s.D + s.Hkv * s.Lk * (s.D + s.Dv)) * itemsize  # q, k, v themselves
    return need


def _halve(s: Shape, cfg: Config, setting: str) -> tuple[Shape, Config]:
    if setting == "seq_len":
        return s._replace(Lq=max(1, s.Lq // 2), Lk=max(1, s.Lk // 2)), cfg
    if setting == "heads":
        hkv = max(1, s.Hkv // 2)
        return s._replace(H=max(hkv, s.H // 2), Hkv=hkv), cfg
    if setting == "head_dim":
        return s._replace(D=max(1, s.D // 2), Dv=max(1, s.Dv // 2)), cfg
    value = getattr(cfg, setting)
    return s, replace(cfg, **{setting: max(1, value // 2)})


def check_budget(method: str, shape: Shape, cfg: Config, itemsize: int = 4, *,
                 budget_bytes: int | None = None, with_view: bool = True) -> float:
    """Return the estimated bytes, or raise ``BudgetError`` naming the setting to lower.

    ``with_view`` adds what the app holds to draw the maps (dense reference and
    the (B, H, Lq, Lk) pictures). The setting named is the one whose halving
    saves the most memory; its ``params`` are need_mb, budget_mb and setting
    (one of seq_len, heads, head_dim or a Config field such as chunk_size).
    """
    m = check_method(method, roles=("reference", "method", "timing"))
    budget = default_budget_bytes() if budget_bytes is None else budget_bytes
    need = _total(m, shape, cfg, itemsize, with_view)
    if need <= budget:
        return need
    candidates = ["seq_len", "heads", "head_dim", *[p for p in m.params if isinstance(getattr(cfg, p), int)]]
    saved = {c: need - _total(m, *_halve(shape, cfg, c), itemsize, with_view) for c in candidates}
    setting = max(candidates, key=lambda c: saved[c])  # ties keep the first (sequence length)
    need_mb, budget_mb = round(need / 2**20), round(budget / 2**20)
    raise BudgetError(
        "budget",
        f"these settings need about {need_mb} MiB, more than the {budget_mb} MiB budget; lower {setting}",
        need_mb=need_mb, budget_mb=budget_mb, setting=setting,
    )

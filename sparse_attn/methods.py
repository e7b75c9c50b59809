"""One registry entry per attention method, each with a uniform result and a cost model.

The app, the sweeps and the notebooks loop over ``METHODS`` instead of
knowing each method: adding a method is one ``register(Method(...))`` call.

Every method has
- ``forward(q, k, v, cfg)``: the plain output (B, H, Lq, Dv); this is what gets timed;
- ``run(q, k, v, cfg)``: a ``MethodResult`` with the output, the effective
  (B, H, Lq, Lk) attention weights, the selection mask, keys scored / attended
  per query, and estimated FLOPs and memory;
- ``cost(shape, cfg, itemsize)``: the same estimates without running anything,
  which ``check_budget`` uses to refuse settings before they can exhaust memory.

Settings a method cannot use are ignored. Bad settings raise ``SettingError``
(a ValueError with a ``code`` and ``params`` the app translates).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ._checks import check_qkv
from .attention import dense_attention, topk_attention
from .nsa import nsa_attention
from .sampling import sampled_attention

__all__ = [
    "Config", "Shape", "Cost", "MethodResult", "Method", "SettingError", "BudgetError",
    "METHODS", "register", "choices", "shape_of", "check_budget", "estimate_view_memory",
    "default_budget_bytes",
]


class SettingError(ValueError):
    """A setting the app should explain: ``code`` names a message, ``params`` fill it."""

    def __init__(self, code: str, message: str, **params: object):
        super().__init__(message)
        self.code = code
        self.params = params


class BudgetError(SettingError):
    """The estimated memory exceeds the budget; ``params['setting']`` is the one to lower."""


@dataclass(frozen=True)
class Config:
    """Method settings; each method reads only the ones it needs."""

    top_k: int = 32
    num_samples: int = 64
    chunk_size: int | None = 64
    block_size: int = 16
    num_blocks: int = 4
    window: int = 32
    proposal: str = "lsh"
    causal: bool = False
    scale: float | None = None
    seed: int = 0


class Shape(NamedTuple):
    """Sizes of one q/k/v triple, as ``check_qkv`` reads them: q (B, H, Lq, D), k/v (B, Hkv, Lk, D/Dv)."""

    B: int
    H: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    Dv: int


class Cost(NamedTuple):
    """Estimates per call: ``keys_scored`` / ``keys_attended`` are means per query."""

    flops: float
    memory_bytes: float
    keys_scored: float
    keys_attended: float


@dataclass
class MethodResult:
    """What ``Method.run`` returns, the same for every method.

    output (B, H, Lq, Dv); weights (B, H, Lq, Lk) effective attention (0 off
    the selection; rows sum to 1 for exact-softmax methods, to an estimate of
    1 for sampling); mask (B, H, Lq, Lk) bool, True where a key was used.
    """

    output: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor
    cost: Cost


@dataclass(frozen=True)
class Method:
    key: str                      # stable id, used in URLs and catalogs ("method.<key>")
    forward: Callable             # (q, k, v, cfg) -> output
    run: Callable                 # (q, k, v, cfg) -> MethodResult
    cost: Callable                # (Shape, cfg, itemsize) -> Cost
    params: tuple[str, ...] = ()  # Config fields it reads (the sidebar shows these)
    budget_param: str | None = None  # the Config field an accuracy-vs-budget sweep varies
    role: str = "method"          # "reference", "method" (user picks it), "timing" (timed only)
    validate: Callable | None = None
    # Another entry that selects exactly the same keys, faster on small inputs: pictures and
    # sweeps may run it instead (streaming top-k's chunk size changes speed and memory, never the result).
    same_result_as: str | None = None
    # Extra (B, H, Lq, Lk) maps ``run`` holds beyond the weights and mask (NSA's per-branch maps).
    picture_maps: int = 0

    def run_for_picture(self, q, k, v, cfg: Config) -> MethodResult:
        """``run`` through ``same_result_as`` when set, with this method's own cost estimate."""
        if self.same_result_as is None:
            return self.run(q, k, v, cfg)
        if self.validate is not None:
            self.validate(cfg)
        r = METHODS[self.same_result_as].run(q, k, v, cfg)
        r.cost = self.cost(shape_of(q, k, v), cfg, q.element_size())._replace(keys_attended=r.cost.keys_attended)
        return r


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry under ``method.key`` (a later entry with the same key replaces it)."""
    METHODS[method.key] = method
    return method


def choices(role: str = "method") -> list[str]:
    """Keys of the registered methods with ``role``, in registration order."""
    return [k for k, m in METHODS.items() if m.role == role]


def shape_of(q, k, v) -> Shape:
    """The ``Shape`` of q, k, v; raises ``ValueError``/``TypeError`` as ``check_qkv`` does."""
    B, H, Hkv, Lq, Lk, D, Dv = check_qkv(q, k, v)
    return Shape(B, H, Hkv, Lq, Lk, D, Dv)


def allowed_pairs(Lq: int, Lk: int, causal: bool) -> int:
    """Number of (query, key) pairs the mask allows: causal query i sees keys 0..i."""
    if not causal:
        return Lq * Lk
    n = min(Lq, Lk)  # rows 0..n-1 see i+1 keys; later rows see all Lk
    return n * (n + 1) // 2 + (Lq - n) * Lk


def _attended_pairs(Lq: int, Lk: int, causal: bool, K: int) -> int:
    if not causal:
        return Lq * min(K, Lk)
    n = min(Lq, Lk, K)  # rows 0..n-1 see fewer than K keys
    return n * (n + 1) // 2 + (Lq - n) * min(K, Lk)


def _check_positive(cfg: Config, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingError("must_be_positive", f"{name} must be an int >= 1, got {value!r}", setting=name, value=value)


# ---- dense: the reference (SDPA when timed) -------------------------------------------------

def _dense_forward(q, k, v, cfg: Config):
    return F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal, scale=cfg.scale, enable_gqa=q.shape[1] != k.shape[1])


def _dense_cost(s: Shape, cfg: Config, itemsize: int) -> Cost:
    pairs = allowed_pairs(s.Lq, s.Lk, cfg.causal)
    per_q = pairs / max(s.Lq, 1)
    flops = s.B * s.H * pairs * (2 * s.D + 2 * s.Dv + 5)  # QK^T, PV, softmax
    memory = s.B * s.H * s.Lq * s.Lk * itemsize * 2 + s.B * s.H * s.Lq * s.Dv * itemsize  # scores, weights, out
    return Cost(float(flops), float(memory), per_q, per_q)


def _dense_run(q, k, v, cfg: Config) -> MethodResult:
    out, w = dense_attention(q, k, v, causal=cfg.causal, scale=cfg.scale, return_weights=True)
    return MethodResult(out, w, w > 0, _dense_cost(shape_of(q, k, v), cfg, q.element_size()))


# ---- top-k: full-score (timed only) and streaming over key chunks ---------------------------

def _topk_cost(s: Shape, cfg: Config, itemsize: int, chunk: int | None) -> Cost:
    K = min(cfg.top_k, s.Lk)
    rows = s.B * s.H
    if chunk is None:
        scored = allowed_pairs(s.Lq, s.Lk, cfg.causal)
        work = rows * s.Lq * (s.Lk * (itemsize + 8))  # the whole score matrix and topk's workspace
    else:
        scored = 0
        for i0 in range(0, s.Lq, chunk):
            nq = min(chunk, s.Lq - i0)
            # Causal key chunks that start after the block's last query are skipped.
            keys = s.Lk if not cfg.causal else min(s.Lk, math.ceil((i0 + nq) / chunk) * chunk)
            scored += nq * keys
        # topk_attention's bound: peak grows with Lq * (top_k + chunk_size), never Lq * Lk. One tile
        # alone would underestimate: on an H200 (bf16, H=8, chunk 1024, L=16384) the peak was 681 MiB,
        # 3x a one-tile estimate; this bound gives 1.4 GiB.
        work = rows * s.Lq * (K + min(chunk, s.Lk)) * (itemsize + 8)
    attended = _attended_pairs(s.Lq, s.Lk, cfg.causal, K)
    q_rows = s.Lq if chunk is None else min(chunk, s.Lq)
    gathered = rows * q_rows * K * (s.D + s.Dv) * itemsize
    flops = rows * (scored * 2 * s.D + attended * (2 * s.Dv + 5))
    memory = work + gathered + rows * s.Lq * s.Dv * itemsize
    return Cost(float(flops), float(memory), scored / max(s.Lq, 1), attended / max(s.Lq, 1))


def _topk_validate(cfg: Config) -> None:
    if isinstance(cfg.top_k, bool) or not isinstance(cfg.top_k, int) or cfg.top_k < 1:
        raise SettingError("k_too_small", f"top_k must be an int >= 1, got {cfg.top_k!r}", value=cfg.top_k)
    if cfg.chunk_size is not None:
        _check_positive(cfg, "chunk_size")


def _topk_run(chunked: bool):
    def run(q, k, v, cfg: Config) -> MethodResult:
        _topk_validate(cfg)
        chunk = cfg.chunk_size if chunked else None
        out, sel = topk_attention(q, k, v, cfg.top_k, causal=cfg.causal, scale=cfg.scale, chunk_size=chunk, return_selection=True)
        Lk = k.shape[2]
        cost = _topk_cost(shape_of(q, k, v), cfg, q.element_size(), chunk)
        return MethodResult(out, sel.to_dense(Lk), sel.mask(Lk), cost)

    return run


def _topk_forward(chunked: bool):
    def forward(q, k, v, cfg: Config):
        _topk_validate(cfg)
        return topk_attention(q, k, v, cfg.top_k, causal=cfg.causal, scale=cfg.scale, chunk_size=cfg.chunk_size if chunked else None)

    return forward


register(Method("dense", _dense_forward, _dense_run, _dense_cost, role="reference"))
register(Method(
    "topk", _topk_forward(True), _topk_run(True),
    lambda s, cfg, n: _topk_cost(s, cfg, n, cfg.chunk_size),
    params=("top_k", "chunk_size"), budget_param="top_k", validate=_topk_validate, same_result_as="topk_full",
))
register(Method(
    "topk_full", _topk_forward(False), _topk_run(False),
    lambda s, cfg, n: _topk_cost(s, cfg, n, None),
    params=("top_k",), budget_param="top_k", role="timing", validate=_topk_validate,
))


# ---- importance sampling, and the hybrid that keeps the exact top-k first -------------------

def _generator(q, seed: int) -> torch.Generator:
    return torch.Generator(device=q.device).manual_seed(int(seed))


def _sampling_validate(hybrid: bool):
    def validate(cfg: Config) -> None:
        if hybrid:
            _topk_validate(cfg)
        _check_positive(cfg, "num_samples")

    return validate


def _sampling_cost(hybrid: bool):
    def cost(s: Shape, cfg: Config, itemsize: int) -> Cost:
        kk = cfg.top_k if hybrid else 0
        pairs = allowed_pairs(s.Lq, s.Lk, cfg.causal)
        attended = min(pairs, _attended_pairs(s.Lq, s.Lk, cfg.causal, kk + cfg.num_samples))
        # LSH picks keys from hash buckets; exact top-k and the oracle proposal score every key.
        scored = pairs if (hybrid or cfg.proposal == "oracle") else attended
        rows = s.B * s.H
        flops = rows * (scored * 2 * s.D + attended * (2 * s.Dv + 5))
        # The reference forms the proposal densely, (Lq, Lk) per head.
        # A budget of Lk or more runs dense attention, so the draws never outnumber the keys.
        memory = rows * s.Lq * (s.Lk * (itemsize + 8) + min(kk + cfg.num_samples, s.Lk) * (s.D + s.Dv + 3) * itemsize)
        return Cost(float(flops), float(memory), scored / max(s.Lq, 1), attended / max(s.Lq, 1))

    return cost


def _sampling_forward(hybrid: bool):
    def forward(q, k, v, cfg: Config):
        _sampling_validate(hybrid)(cfg)
        return sampled_attention(q, k, v, cfg.num_samples, proposal=cfg.proposal, top_k=cfg.top_k if hybrid else 0,
                                 causal=cfg.causal, scale=cfg.scale, generator=_generator(q, cfg.seed))

    return forward


def _sampling_run(hybrid: bool):
    def run(q, k, v, cfg: Config) -> MethodResult:
        _sampling_validate(hybrid)(cfg)
        out, sel = sampled_attention(q, k, v, cfg.num_samples, proposal=cfg.proposal, top_k=cfg.top_k if hybrid else 0,
                                     causal=cfg.causal, scale=cfg.scale, generator=_generator(q, cfg.seed),
                                     return_selection=True)
        Lk = k.shape[2]
        mask = sel.mask(Lk)
        cost = _sampling_cost(hybrid)(shape_of(q, k, v), cfg, q.element_size())
        # Draws with replacement repeat keys: report the distinct keys actually used.
        cost = cost._replace(keys_attended=float(mask.sum(-1).float().mean()) if mask.numel() else 0.0)
        return MethodResult(out, sel.to_dense(Lk), mask, cost)

    return run


for _hybrid, _key, _params in ((False, "sampling", ("num_samples", "proposal")),
                               (True, "hybrid", ("top_k", "num_samples", "proposal"))):
    register(Method(_key, _sampling_forward(_hybrid), _sampling_run(_hybrid), _sampling_cost(_hybrid),
                    params=_params, budget_param="num_samples", validate=_sampling_validate(_hybrid)))


# ---- NSA-style blocks: compressed + selected + sliding, equal gates -------------------------

def _nsa_validate(cfg: Config) -> None:
    for name in ("block_size", "num_blocks", "window"):
        _check_positive(cfg, name)


def _nsa_kwargs(cfg: Config) -> dict:
    return dict(gates=(1 / 3, 1 / 3, 1 / 3), sliding_window_size=cfg.window, compress_block_size=cfg.block_size,
                selection_block_size=cfg.block_size, num_selected_blocks=cfg.num_blocks, causal=cfg.causal,
                scale=cfg.scale)


def _nsa_cost(s: Shape, cfg: Config, itemsize: int) -> Cost:
    half = 0.5 if cfg.causal else 1.0
    n_cmp = (s.Lk // cfg.block_size) * half
    # Blocks or a window beyond the keys there are add nothing (selection and the sliding band stop at Lk):
    # counting them refused the largest NSA settings even at L = 256 and named the wrong setting to lower.
    near = min(cfg.num_blocks, -(-s.Lk // cfg.block_size)) * cfg.block_size + min(cfg.window, s.Lk)
    attended = min(s.Lk * half, n_cmp + near)
    scored = n_cmp + near  # compressed scores also rank the blocks
    rows = s.B * s.H * s.Lq
    flops = rows * (scored * 2 * s.D + attended * (2 * s.Dv + 5))
    memory = rows * (n_cmp * 2 + near * (s.D + s.Dv)) * itemsize
    return Cost(float(flops), float(memory), float(scored), float(attended))


def _nsa_forward(q, k, v, cfg: Config):
    _nsa_validate(cfg)
    return nsa_attention(q, k, v, **_nsa_kwargs(cfg))


def _nsa_run(q, k, v, cfg: Config) -> MethodResult:
    _nsa_validate(cfg)
    out, maps = nsa_attention(q, k, v, **_nsa_kwargs(cfg), return_maps=True)
    mask = maps.combined > 0
    cost = _nsa_cost(shape_of(q, k, v), cfg, q.element_size())
    cost = cost._replace(keys_attended=float(mask.sum(-1).float().mean()) if mask.numel() else 0.0)
    return MethodResult(out, maps.combined, mask, cost)


register(Method("nsa", _nsa_forward, _nsa_run, _nsa_cost, params=("block_size", "num_blocks", "window"),
                budget_param="num_blocks", validate=_nsa_validate, picture_maps=6))


# ---- memory budget ---------------------------------------------------------------------------

def default_budget_bytes() -> int:
    """2 GiB (a laptop shared with a browser), or ``SPARSE_ATTN_MEMORY_BUDGET_MB`` when set."""
    raw = os.environ.get("SPARSE_ATTN_MEMORY_BUDGET_MB")
    if raw:
        try:
            mb = float(raw)
        except ValueError:
            raise ValueError(f"SPARSE_ATTN_MEMORY_BUDGET_MB must be a number of MiB, got {raw!r}") from None
        if mb > 0:
            return int(mb * 2**20)
    return 2 * 2**30


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
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    m = METHODS[method]
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

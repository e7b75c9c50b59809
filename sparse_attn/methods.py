"""One registry of attention methods: a name, the settings it reads, a uniform result and a cost model each.

The app, the accuracy-vs-budget sweep, the benchmark command line and the
notebooks loop over ``METHODS`` instead of knowing each method, and refuse a
name that is not a key: adding a method is one ``register(Method(...))`` call
(docs/architecture.md).

Every method has
- ``forward(q, k, v, cfg)``: the plain output (B, H, Lq, Dv); this is what gets timed;
- ``run(q, k, v, cfg)``: a ``MethodResult`` with the output, the effective
  (B, H, Lq, Lk) attention weights, the selection mask, keys scored / attended
  per query, and estimated FLOPs and memory;
- ``cost(shape, cfg, itemsize)``: the same estimates without running anything,
  which the app uses to refuse settings before they can exhaust memory.

Stages and baselines (NSA's branches alone, the seed's top-k) have only a
``forward``: they are there to be timed. Settings a method cannot use are
ignored. Bad settings raise ``SettingError`` (a ``CodedError`` the app translates).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from ._checks import CodedError, check_choice, check_int, check_qkv, resolve_scale
from .ops.dense import allowed_pairs, causal_mask, dense_attention
from .ops.indexed import QUERY_CHUNK
from .ops.nsa import check_nsa_options, compress_kv, compressed_attention, nsa_attention, random_block_indices, selected_block_attention
from .ops.quest import quest_attention
from .ops.sampling import PROPOSALS, sampled_attention
from .ops.seed_topk import seed_topk_attention
from .ops.sliding_window import sliding_window_attention
from .ops.streaming_llm import streaming_llm_attention, streaming_llm_pairs, streaming_llm_width
from .ops.topk import topk_attention

__all__ = [
    "Config", "Shape", "Cost", "MethodResult", "Method", "SettingError", "ROLES",
    "METHODS", "register", "choices", "check_method", "shape_of",
]


class SettingError(CodedError):
    """A method setting the app should explain: ``code`` names a message, ``params`` fill it."""


@dataclass(frozen=True)
class Config:
    """Method settings, named as the ops' keyword arguments; each method reads only the ones it needs.

    ``sliding_window_size`` is read by NSA (its third branch) and by
    StreamingLLM (the window after its sinks). Quest reads its own
    ``token_budget``, not ``top_k``: it reads whole pages, so its keys per
    query are ``token_budget`` rounded up to a multiple of ``page_size``.
    ``num_initial_blocks`` and ``num_local_blocks`` are NSA's forced blocks,
    counted inside ``num_selected_blocks``.
    """

    top_k: int = 32
    num_samples: int = 64
    proposal: str = "lsh"
    chunk_size: int | None = 64
    compress_block_size: int = 16
    compress_block_sliding_stride: int | None = None  # None: compress_block_size (no overlap)
    selection_block_size: int = 16
    num_selected_blocks: int = 4
    num_initial_blocks: int = 1  # the NSA paper always selects the first block ...
    num_local_blocks: int = 2    # ... and the two blocks nearest the query
    sliding_window_size: int = 32
    num_sink_tokens: int = 4     # StreamingLLM keeps 4 attention sinks
    token_budget: int = 32
    page_size: int = 16          # Quest's pages
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
    extras: what only this method has, for pictures that explain it: NSA's
    ``"nsa"`` (its ``NSAMaps``: every branch, the blocks picked, the gates);
    the hybrid's ``"exact_mask"`` (B, H, Lq, Lk) bool, True on the keys kept
    exactly (top-k, or every key of a row short enough to be exact), so the
    rest of ``mask`` is the sampled tail.
    """

    output: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor
    cost: Cost
    extras: dict = field(default_factory=dict)


# "reference": dense attention; "method": a student picks it; "timing": timed beside its twin;
# "stage": one piece of a method, timed alone; "baseline": what the library is measured against.
ROLES = ("reference", "method", "timing", "stage", "baseline")


@dataclass(frozen=True)
class Method:
    key: str                      # the one name: URLs, catalogs ("method.<key>"), sweeps, benchmarks
    forward: Callable             # (q, k, v, cfg) -> output
    run: Callable | None = None   # (q, k, v, cfg) -> MethodResult; None for stages and baselines
    cost: Callable | None = None  # (Shape, cfg, itemsize) -> Cost
    params: tuple[str, ...] = ()  # Config fields it reads (the sidebar shows these)
    role: str = "method"          # one of ROLES
    validate: Callable | None = None
    # How a budget of keys per query sets this method's Config: at_budget(cfg, budget, num_keys=None),
    # num_keys the key length when the caller knows it (NSA counts its compressed keys with it);
    # returns None where the budget is too small for the method.
    at_budget: Callable[..., Config | None] | None = None
    # (q, k, v, cfg) -> a zero-argument call to time, when inputs must be prepared first
    # (random block indices for the selected branch); default: forward on the given inputs.
    prepare: Callable | None = None
    # Another entry that selects exactly the same keys, faster on small inputs: pictures and
    # sweeps may run it instead (streaming top-k's chunk size changes speed and memory, never the result).
    same_result_as: str | None = None
    # Extra (B, H, Lq, Lk) maps ``run`` holds beyond the weights and mask (NSA's per-branch maps).
    picture_maps: int = 0

    def timed(self, q, k, v, cfg: Config) -> Callable[[], torch.Tensor]:
        """A zero-argument call that computes this method's output on q, k, v: what benchmarks time."""
        if self.validate is not None:
            self.validate(cfg)
        if self.prepare is not None:
            return self.prepare(q, k, v, cfg)
        return lambda: self.forward(q, k, v, cfg)

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
    if method.role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {method.role!r}")
    METHODS[method.key] = method
    return method


def choices(role: str = "method") -> list[str]:
    """Keys of the registered methods with ``role``, in registration order."""
    return [k for k, m in METHODS.items() if m.role == role]


def check_method(name: object, *, roles=ROLES, argument: str = "method") -> "Method":
    """The registered method called ``name`` (with one of ``roles``); else a ValueError listing the allowed names."""
    return METHODS[check_choice(name, argument, [k for k, m in METHODS.items() if m.role in roles])]


def shape_of(q, k, v) -> Shape:
    """The ``Shape`` of q, k, v; raises ``ValueError``/``TypeError`` as ``check_qkv`` does."""
    B, H, Hkv, Lq, Lk, D, Dv = check_qkv(q, k, v)
    return Shape(B, H, Hkv, Lq, Lk, D, Dv)


def _attended_pairs(Lq: int, Lk: int, causal: bool, K: int) -> int:
    if not causal:
        return Lq * min(K, Lk)
    n = min(Lq, Lk, K)  # rows 0..n-1 see fewer than K keys
    return n * (n + 1) // 2 + (Lq - n) * min(K, Lk)


def _check_at_least(cfg: Config, name: str, minimum: int = 1) -> None:
    value = getattr(cfg, name)
    try:
        check_int(value, name, minimum=minimum)
    except (TypeError, ValueError):
        code = "must_be_positive" if minimum == 1 else "must_be_non_negative"
        raise SettingError(code, f"{name} must be an int >= {minimum}, got {value!r}", setting=name,
                           value=value) from None


def _window_keys(sliding_window_size: int, causal: bool) -> int:
    """Keys a sliding window holds away from the edges: causal reads back only, otherwise both ways (|i - j| < w)."""
    return sliding_window_size if causal else 2 * sliding_window_size - 1


def _window_for(keys: int, causal: bool) -> int:
    """The largest sliding_window_size whose window holds at most ``keys`` keys (``keys`` >= 1)."""
    return keys if causal else (keys + 1) // 2


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
        # alone underestimates the measured GPU peak (docs/benchmarks.md); this bound covers it.
        work = rows * s.Lq * (K + min(chunk, s.Lk)) * (itemsize + 8)
    attended = _attended_pairs(s.Lq, s.Lk, cfg.causal, K)
    q_rows = s.Lq if chunk is None else min(chunk, s.Lq)
    gathered = rows * q_rows * K * (s.D + s.Dv) * itemsize
    flops = rows * (scored * 2 * s.D + attended * (2 * s.Dv + 5))
    memory = work + gathered + rows * s.Lq * s.Dv * itemsize
    return Cost(float(flops), float(memory), scored / max(s.Lq, 1), attended / max(s.Lq, 1))


def _topk_validate(cfg: Config) -> None:
    try:
        check_int(cfg.top_k, "top_k", minimum=1)
    except (TypeError, ValueError):
        raise SettingError("k_too_small", f"top_k must be an int >= 1, got {cfg.top_k!r}", value=cfg.top_k) from None
    if cfg.chunk_size is not None:
        _check_at_least(cfg, "chunk_size")


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


def _topk_at_budget(cfg: Config, budget: int, *, num_keys: int | None = None) -> Config:
    return replace(cfg, top_k=budget)


register(Method("dense", _dense_forward, _dense_run, _dense_cost, role="reference"))
register(Method(
    "topk", _topk_forward(True), _topk_run(True),
    lambda s, cfg, n: _topk_cost(s, cfg, n, cfg.chunk_size),
    params=("top_k", "chunk_size"), validate=_topk_validate, at_budget=_topk_at_budget, same_result_as="topk_full",
))
register(Method(
    "topk_full", _topk_forward(False), _topk_run(False),
    lambda s, cfg, n: _topk_cost(s, cfg, n, None),
    params=("top_k",), role="timing", validate=_topk_validate, at_budget=_topk_at_budget,
))


# ---- importance sampling, and the hybrid that keeps the exact top-k first -------------------

def _generator(q, seed: int) -> torch.Generator:
    return torch.Generator(device=q.device).manual_seed(int(seed))


def _sampling_validate(hybrid: bool):
    def validate(cfg: Config) -> None:
        if hybrid:
            _topk_validate(cfg)
        _check_at_least(cfg, "num_samples")
        if cfg.proposal not in PROPOSALS:
            raise SettingError("unknown_proposal", f"proposal must be one of {PROPOSALS}, got {cfg.proposal!r}",
                               value=cfg.proposal, allowed=PROPOSALS)

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


def _sampling_call(hybrid: bool, q, k, v, cfg: Config, **kw):
    _sampling_validate(hybrid)(cfg)
    return sampled_attention(q, k, v, cfg.num_samples, proposal=cfg.proposal, top_k=cfg.top_k if hybrid else 0,
                             causal=cfg.causal, scale=cfg.scale, generator=_generator(q, cfg.seed), **kw)


def _sampling_run(hybrid: bool):
    def run(q, k, v, cfg: Config) -> MethodResult:
        out, sel = _sampling_call(hybrid, q, k, v, cfg, return_selection=True)
        Lk = k.shape[2]
        mask = sel.mask(Lk)
        cost = _sampling_cost(hybrid)(shape_of(q, k, v), cfg, q.element_size())
        # Draws with replacement repeat keys: report the distinct keys actually used.
        cost = cost._replace(keys_attended=float(mask.sum(-1).float().mean()) if mask.numel() else 0.0)
        extras = {"exact_mask": _exact_part(sel, cfg.top_k, Lk, cfg.causal)} if hybrid else {}
        return MethodResult(out, sel.to_dense(Lk), mask, cost, extras)

    return run


def _exact_part(sel, top_k: int, Lk: int, causal: bool) -> torch.Tensor:
    """The keys the hybrid kept exactly: its first ``top_k`` slots, or the whole row where it ran exact."""
    B, H, Lq, S = sel.indices.shape
    kept = sel._replace(indices=sel.indices[..., :top_k], weights=sel.weights[..., :top_k]).mask(Lk)
    dev = sel.indices.device
    allowed = causal_mask(Lq, Lk, dev).sum(-1) if causal else torch.full((Lq,), Lk, device=dev)
    exact_rows = (allowed <= S).view(1, 1, Lq, 1)  # as sampled_attention decides it
    return torch.where(exact_rows, sel.mask(Lk), kept)


def _sampling_at_budget(cfg: Config, budget: int, *, num_keys: int | None = None) -> Config:
    return replace(cfg, num_samples=budget)


def _hybrid_at_budget(cfg: Config, budget: int, *, num_keys: int | None = None) -> Config | None:
    # Half the budget exact, the rest drawn from the tail (as vAttention splits it).
    top_k = budget // 2
    return None if top_k < 1 else replace(cfg, top_k=top_k, num_samples=budget - top_k)


for _hybrid, _key, _params, _at in ((False, "sampling", ("num_samples", "proposal"), _sampling_at_budget),
                                    (True, "hybrid", ("top_k", "num_samples", "proposal"), _hybrid_at_budget)):
    register(Method(_key, lambda q, k, v, cfg, h=_hybrid: _sampling_call(h, q, k, v, cfg), _sampling_run(_hybrid),
                    _sampling_cost(_hybrid), params=_params, validate=_sampling_validate(_hybrid), at_budget=_at))


# ---- NSA-style blocks: compressed + selected + sliding, equal gates -------------------------

_NSA_SIZES = ("compress_block_size", "selection_block_size", "num_selected_blocks", "sliding_window_size")
_NSA_FORCED = ("num_initial_blocks", "num_local_blocks")
_NSA_PARAMS = _NSA_SIZES + _NSA_FORCED


def _nsa_validate(cfg: Config) -> None:
    # The app's sliders start at 1 (no selected branch at 0 is for the op, not a picture): coded errors first.
    for name in _NSA_SIZES:
        _check_at_least(cfg, name)
    for name in _NSA_FORCED:  # 0 and 0 turn forcing off
        _check_at_least(cfg, name, minimum=0)
    forced = cfg.num_initial_blocks + cfg.num_local_blocks
    if forced > cfg.num_selected_blocks:  # NSA counts its forced blocks inside the n it selects
        raise SettingError("forced_blocks", f"num_selected_blocks ({cfg.num_selected_blocks}) must be at least "
                           f"num_initial_blocks + num_local_blocks ({forced})", setting="num_selected_blocks",
                           value=cfg.num_selected_blocks, forced=forced)
    try:
        check_nsa_options(cfg.sliding_window_size, cfg.compress_block_size, cfg.compress_block_sliding_stride,
                          cfg.selection_block_size, cfg.num_selected_blocks,
                          num_initial_blocks=cfg.num_initial_blocks, num_local_blocks=cfg.num_local_blocks)
    except (TypeError, ValueError) as e:
        raise SettingError("invalid_setting", str(e), detail=str(e)) from None


def _nsa_kwargs(cfg: Config) -> dict:
    return dict(sliding_window_size=cfg.sliding_window_size, compress_block_size=cfg.compress_block_size,
                compress_block_sliding_stride=cfg.compress_block_sliding_stride,
                selection_block_size=cfg.selection_block_size, num_selected_blocks=cfg.num_selected_blocks,
                num_initial_blocks=cfg.num_initial_blocks, num_local_blocks=cfg.num_local_blocks,
                causal=cfg.causal, scale=cfg.scale)


def _nsa_compressed_keys(Lk: int, cfg: Config) -> float:
    """Compressed keys a query reads, on average: every whole block, half of them under causal."""
    half = 0.5 if cfg.causal else 1.0
    stride = cfg.compress_block_sliding_stride or cfg.compress_block_size
    return (max(Lk - cfg.compress_block_size, -stride) // stride + 1) * half


def _nsa_cost(s: Shape, cfg: Config, itemsize: int) -> Cost:
    half = 0.5 if cfg.causal else 1.0
    n_cmp = _nsa_compressed_keys(s.Lk, cfg)
    # Blocks or a window beyond the keys there are add nothing (selection and the sliding band stop at Lk):
    # counting them would refuse the largest settings even at small L, naming the wrong setting to lower.
    sel = cfg.selection_block_size
    window = min(_window_keys(cfg.sliding_window_size, cfg.causal), s.Lk)
    near = min(cfg.num_selected_blocks, -(-s.Lk // sel)) * sel + window
    attended = min(s.Lk * half, n_cmp + near)
    scored = n_cmp + near  # compressed scores also rank the blocks
    rows = s.B * s.H * s.Lq
    flops = rows * (scored * 2 * s.D + attended * (2 * s.Dv + 5))
    memory = rows * (n_cmp * 2 + near * (s.D + s.Dv)) * itemsize
    return Cost(float(flops), float(memory), float(scored), float(attended))


_EQUAL_GATES = (1 / 3, 1 / 3, 1 / 3)


def _nsa_forward(q, k, v, cfg: Config):
    _nsa_validate(cfg)
    return nsa_attention(q, k, v, gates=_EQUAL_GATES, **_nsa_kwargs(cfg))


def _nsa_run(q, k, v, cfg: Config) -> MethodResult:
    _nsa_validate(cfg)
    out, maps = nsa_attention(q, k, v, gates=_EQUAL_GATES, **_nsa_kwargs(cfg), return_maps=True)
    mask = maps.combined > 0
    cost = _nsa_cost(shape_of(q, k, v), cfg, q.element_size())
    cost = cost._replace(keys_attended=float(mask.sum(-1).float().mean()) if mask.numel() else 0.0)
    return MethodResult(out, maps.combined, mask, cost, {"nsa": maps})


def _nsa_at_budget(cfg: Config, budget: int, *, num_keys: int | None = None) -> Config | None:
    """compressed keys + selected tokens + window <= budget, with the block sizes fixed.

    The forced blocks (at least one block: the registry's selected branch is
    never off) come first; the window keeps its size when the rest of the
    budget allows it and shrinks otherwise; whole blocks fill what is left.
    Without ``num_keys`` the compressed keys are not counted.
    """
    compressed = 0 if num_keys is None else math.ceil(_nsa_compressed_keys(num_keys, cfg))
    blocks = max(1, cfg.num_initial_blocks + cfg.num_local_blocks)
    forced_keys = blocks * cfg.selection_block_size
    if num_keys is not None:  # a short input has fewer blocks (and keys) than there are forced slots
        forced_keys = min(forced_keys, num_keys)
    room = budget - compressed - forced_keys
    if room < 1:  # not even the forced blocks and a window of one key
        return None
    window = min(cfg.sliding_window_size, _window_for(room, cfg.causal))
    blocks += (room - _window_keys(window, cfg.causal)) // cfg.selection_block_size
    return replace(cfg, num_selected_blocks=blocks, sliding_window_size=window)


register(Method("nsa", _nsa_forward, _nsa_run, _nsa_cost, params=_NSA_PARAMS, validate=_nsa_validate,
                at_budget=_nsa_at_budget, picture_maps=6))


# ---- NSA's branches alone, to time each stage -----------------------------------------------

def _nsa_compressed(q, k, v, cfg: Config):
    stride = cfg.compress_block_sliding_stride or cfg.compress_block_size
    bs = cfg.compress_block_size
    return compressed_attention(q, compress_kv(k, bs, stride), compress_kv(v, bs, stride), bs, stride,
                                causal=cfg.causal, scale=resolve_scale(cfg.scale, q.shape[-1]))[0]


def _nsa_selected_blocks(q, k, cfg: Config) -> torch.Tensor:
    # Random distinct visible blocks: the selected branch timed on its own, as other NSA kernels are.
    return random_block_indices(q.shape[0], k.shape[1], q.shape[2], k.shape[2], cfg.num_selected_blocks,
                                cfg.selection_block_size, cfg.causal, cfg.seed, q.device)


def _nsa_selected(q, k, v, cfg: Config, block_indices=None):
    idx = _nsa_selected_blocks(q, k, cfg) if block_indices is None else block_indices
    return selected_block_attention(q, k, v, idx, cfg.selection_block_size, causal=cfg.causal, scale=cfg.scale)


def _nsa_selected_prepare(q, k, v, cfg: Config):
    idx = _nsa_selected_blocks(q, k, cfg)
    return lambda: _nsa_selected(q, k, v, cfg, idx)


register(Method("nsa_compressed", _nsa_compressed, params=("compress_block_size",), role="stage",
                validate=_nsa_validate))
register(Method("nsa_selected", _nsa_selected, params=("selection_block_size", "num_selected_blocks"), role="stage",
                validate=_nsa_validate, prepare=_nsa_selected_prepare))
register(Method("nsa_sliding", lambda q, k, v, cfg: sliding_window_attention(
    q, k, v, cfg.sliding_window_size, causal=cfg.causal, scale=cfg.scale), params=("sliding_window_size",),
    role="stage", validate=_nsa_validate))


# ---- StreamingLLM: attention sinks + a sliding window (static) --------------------------------

def _streaming_llm_validate(cfg: Config) -> None:
    for name in ("num_sink_tokens", "sliding_window_size"):
        _check_at_least(cfg, name, minimum=0)
    if cfg.num_sink_tokens == 0 and cfg.sliding_window_size == 0:
        raise SettingError("no_keys", "num_sink_tokens and sliding_window_size are both 0: no key to attend to",
                           setting="num_sink_tokens")


def _streaming_llm_cost(s: Shape, cfg: Config, itemsize: int) -> Cost:
    # The pattern is known before any score: the keys scored are the keys attended.
    pairs = streaming_llm_pairs(s.Lq, s.Lk, cfg.num_sink_tokens, cfg.sliding_window_size, causal=cfg.causal)
    K = streaming_llm_width(s.Lk, cfg.num_sink_tokens, cfg.sliding_window_size, causal=cfg.causal)
    rows, block = s.B * s.H, min(s.Lq, QUERY_CHUNK)
    flops = rows * pairs * (2 * s.D + 2 * s.Dv + 5)
    # The positions; per block of queries the keys gathered once per KV group, and per query head the
    # scores, weights and three index copies; the output.
    memory = (s.Lq * K * 8 + s.B * s.Hkv * block * K * s.D * itemsize + rows * block * K * (3 * itemsize + 3 * 8)
              + rows * s.Lq * s.Dv * itemsize)
    per_q = pairs / max(s.Lq, 1)
    return Cost(float(flops), float(memory), per_q, per_q)


def _streaming_llm_call(q, k, v, cfg: Config, **kw):
    _streaming_llm_validate(cfg)
    return streaming_llm_attention(q, k, v, cfg.num_sink_tokens, cfg.sliding_window_size, causal=cfg.causal,
                                   scale=cfg.scale, **kw)


def _streaming_llm_run(q, k, v, cfg: Config) -> MethodResult:
    out, sel = _streaming_llm_call(q, k, v, cfg, return_selection=True)
    Lk = k.shape[2]
    cost = _streaming_llm_cost(shape_of(q, k, v), cfg, q.element_size())
    return MethodResult(out, sel.to_dense(Lk), sel.mask(Lk), cost)


def _streaming_llm_at_budget(cfg: Config, budget: int, *, num_keys: int | None = None) -> Config | None:
    # The sinks stay as set; the window takes the rest (None: the sinks alone fill the budget).
    room = budget - cfg.num_sink_tokens
    return None if room < 1 else replace(cfg, sliding_window_size=_window_for(room, cfg.causal))


register(Method("streaming_llm", _streaming_llm_call, _streaming_llm_run, _streaming_llm_cost,
                params=("num_sink_tokens", "sliding_window_size"), validate=_streaming_llm_validate,
                at_budget=_streaming_llm_at_budget))


# ---- Quest: pages ranked by an upper bound of their scores ------------------------------------

def _quest_validate(cfg: Config) -> None:
    _check_at_least(cfg, "token_budget")
    _check_at_least(cfg, "page_size")


def _quest_check_length(cfg: Config, Lk: int) -> None:
    if cfg.page_size > Lk:
        raise SettingError("page_too_large", f"page_size ({cfg.page_size}) must be at most the key length ({Lk})",
                           setting="page_size", value=cfg.page_size, length=Lk)


def _quest_cost(s: Shape, cfg: Config, itemsize: int) -> Cost:
    P = cfg.page_size
    pages = -(-s.Lk // P)
    S = min(-(-cfg.token_budget // P), pages)
    i = torch.arange(s.Lq)
    # Under causal query i may pick pages that start at or before it, and reads no key after it.
    eligible = (i // P + 1).clamp(max=pages) if cfg.causal else torch.full_like(i, pages)
    allowed = (i + 1).clamp(max=s.Lk) if cfg.causal else torch.full_like(i, s.Lk)
    attended = float(allowed.clamp(max=S * P).sum())  # at most: a short last page holds fewer tokens
    bounded = float(eligible.sum())
    rows, block = s.B * s.H, min(s.Lq, QUERY_CHUNK)
    scored = 2 * bounded + attended  # two bound vectors (min, max) per page, then the picked tokens exactly
    # Page min and max; per query two D-long products per page, then exact attention on the picked tokens.
    flops = s.B * s.Hkv * s.Lk * s.D * 2 + rows * (bounded * 4 * s.D + attended * (2 * s.D + 2 * s.Dv + 5))
    # Held throughout: the page min and max, every query's picked tokens. Then the larger of two phases:
    # picking (a block's bounds: two matmuls, their sum, the masked copy; under causal the running min and
    # max of every key) and attending (a block's gathered keys, scores, weights, index copies; the output).
    held = 2 * s.B * s.Hkv * pages * s.D * itemsize + rows * s.Lq * S * P * 8
    picking = rows * block * pages * (4 * itemsize + 2)
    if cfg.causal:
        picking += 2 * s.B * s.Hkv * s.Lk * s.D * itemsize + rows * block * s.D * itemsize
    attending = rows * block * S * P * (s.D * itemsize + 3 * itemsize + 3 * 8) + rows * s.Lq * s.Dv * itemsize
    memory = held + max(picking, attending)
    return Cost(float(flops), float(memory), scored / max(s.Lq, 1), attended / max(s.Lq, 1))


def _quest_call(q, k, v, cfg: Config, **kw):
    _quest_validate(cfg)
    _quest_check_length(cfg, k.shape[2])
    return quest_attention(q, k, v, cfg.token_budget, cfg.page_size, causal=cfg.causal, scale=cfg.scale, **kw)


def _quest_run(q, k, v, cfg: Config) -> MethodResult:
    out, sel = _quest_call(q, k, v, cfg, return_selection=True)
    Lk = k.shape[2]
    mask = sel.mask(Lk)
    cost = _quest_cost(shape_of(q, k, v), cfg, q.element_size())
    # The cost model's count is an upper bound (a short last page); report the keys actually read.
    cost = cost._replace(keys_attended=float(mask.sum(-1).double().mean()) if mask.numel() else 0.0)
    return MethodResult(out, sel.to_dense(Lk), mask, cost)


def _quest_at_budget(cfg: Config, budget: int, *, num_keys: int | None = None) -> Config | None:
    if num_keys is not None and cfg.page_size > num_keys:  # not one whole page: the method cannot run
        return None
    return replace(cfg, token_budget=budget)


register(Method("quest", _quest_call, _quest_run, _quest_cost, params=("token_budget", "page_size"),
                validate=_quest_validate, at_budget=_quest_at_budget))


# ---- the seed's top-k: the baseline -----------------------------------------------------------

register(Method("seed_topk", lambda q, k, v, cfg: seed_topk_attention(q, k, v, cfg.top_k, causal=cfg.causal),
                params=("top_k",), role="baseline", validate=_topk_validate))

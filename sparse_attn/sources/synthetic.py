"""Synthetic q, k, v whose attention has one planted, known structure.

Random Gaussian q and k give nearly uniform attention, where every sparse
method looks equally bad. Each pattern here plants one structure real heads
have, so a learner can see what a method keeps and what it loses:

=============  =================================================================
pattern        what the attention looks like (softmax(q k^T / sqrt(D)))
=============  =================================================================
random         i.i.d. Gaussian logits with std 1/temperature: low temperature
               sharpens rows, high temperature flattens them.
flat           near-uniform rows with a flat tail: random at temperature 4
               (logit std 0.25), so every key keeps a share of the mass.
peaked         one key per query holds almost all the mass (retrieval with one
               match): the easy case for top-k, the hard one for sampling.
local          a band around the diagonal: weights fall with distance like a
               Gaussian of std ``window`` tokens; far keys sit ``strength``
               logits below the diagonal (random Fourier features, RoPE-like).
sink_local     local, plus the first ``num_sinks`` keys that every query
               attends to strongly (the "attention sink" of real models).
retrieval      each query matches ``num_matches`` random keys strongly; every
               other logit is noise.
periodic       keys whose distance to the query is a multiple of ``period``
               take the mass (a Dirichlet kernel of ``period // 2`` harmonics).
=============  =================================================================

The structure is planted through q . k alone (v is Gaussian noise), so it
survives any method that computes true scores. It is clean for head_dim >= 32;
with fewer dimensions the random features are noisier (``weak_plant`` note).
All patterns are deterministic by seed and built in float32 on the CPU.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from einops import rearrange, repeat

from .._checks import check_int, check_number
from .errors import SourceError

__all__ = ["PATTERNS", "pattern_params", "synthetic_qkv"]

CLEAN_HEAD_DIM = 32  # below this the planted structures blur (see module docstring)


def _bad(name: str, value: object, allowed: str) -> SourceError:
    return SourceError("bad_argument", f"{name} must be {allowed}, got {value!r}", name=name, value=value, allowed=allowed)


def _positive(name: str, value: object) -> float:
    try:
        return check_number(value, name, positive=True)
    except (TypeError, ValueError):
        raise _bad(name, value, "a finite number > 0") from None


def _count(name: str, value: object, minimum: int = 1) -> int:
    try:
        return check_int(value, name, minimum=minimum)
    except (TypeError, ValueError):
        raise _bad(name, value, f"an int >= {minimum}") from None


def _to_query_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """(B, Hkv, L, F) -> (B, H, L, F): query head h reads kv head h // (H // Hkv)."""
    return repeat(x, "b hk l f -> b (hk g) l f", g=H // x.shape[1])


def _fill(x: torch.Tensor, D: int) -> torch.Tensor:
    """Zero-pad the feature axis to D (patterns that use fewer dims than the head has)."""
    return torch.nn.functional.pad(x, (0, D - x.shape[-1]))


def _rff(g: torch.Generator, B: int, Hkv: int, L: int, dims: int, window: float) -> torch.Tensor:
    """Random Fourier features (B, Hkv, L, dims) with phi(i) . phi(j) ~= exp(-(i-j)^2 / (2 window^2)).

    Frequencies ~ N(0, 1/window^2) per batch and head, so heads differ in detail
    but share the Gaussian kernel in expectation (Rahimi & Recht, 2007).
    """
    F = dims // 2
    omega = torch.randn(B, Hkv, 1, F, generator=g) / window
    angle = torch.arange(L, dtype=torch.float32).view(1, 1, L, 1) * omega
    return torch.cat([angle.cos(), angle.sin()], dim=-1) / math.sqrt(F)


def random(g, B, H, Hkv, L, D, *, temperature: float = 1.0):
    """Gaussian q and k; logits are N(0, 1/temperature^2). Temperature > 0."""
    t = _positive("temperature", temperature)
    q = torch.randn(B, H, L, D, generator=g) / t
    k = torch.randn(B, Hkv, L, D, generator=g)
    return q, k


def flat(g, B, H, Hkv, L, D, *, temperature: float = 4.0):
    """Near-uniform rows: random q, k at a high temperature (logit std 1/temperature)."""
    return random(g, B, H, Hkv, L, D, temperature=temperature)


def local(g, B, H, Hkv, L, D, *, window: float = 4.0, strength: float = 12.0):
    """Weights ~ exp(-(i-j)^2 / (2 window^2)) near the diagonal; far keys ``strength`` logits down.

    Logits are strength * exp(-(i-j)^2 / (2 l^2)) with l = window * sqrt(strength):
    near the diagonal that is strength - (i-j)^2 / (2 window^2), a Gaussian
    of std ``window`` tokens after the softmax, whatever the strength.
    """
    window, strength = _positive("window", window), _positive("strength", strength)
    if D < 2:
        raise _bad("head_dim", D, "at least 2 for the local pattern")
    k = _local_keys(g, B, Hkv, L, D, D, window, strength)
    return _to_query_heads(k, H).clone(), k


def _local_keys(g, B, Hkv, L, D, dims, window, strength):
    """(B, Hkv, L, D) keys (= queries) with q . k / sqrt(D) = the local logits, using ``dims`` features."""
    c = math.sqrt(strength * math.sqrt(D))
    return _fill(c * _rff(g, B, Hkv, L, dims, window * math.sqrt(strength)), D)


def sink_local(g, B, H, Hkv, L, D, *, num_sinks: int = 4, sink_strength: float = 14.0, window: float = 4.0, strength: float = 12.0):
    """Local, plus keys 0..num_sinks-1 that every query sees with logit + sink_strength.

    One feature dim is set aside as the "sink direction": every query has it,
    only the sink keys do (and nothing else), so every query gives each sink
    the logit sink_strength, against ``strength`` for its own position.
    With the defaults the sinks hold about three quarters of each row's mass
    and the local band most of the rest.
    """
    num_sinks = _count("num_sinks", num_sinks, minimum=0)
    sink_strength, window, strength = (_positive(n, x) for n, x in (("sink_strength", sink_strength), ("window", window), ("strength", strength)))
    if D < 3:
        raise _bad("head_dim", D, "at least 3 for the sink_local pattern")
    k = _local_keys(g, B, Hkv, L, D, D - 1, window, strength)
    a = math.sqrt(sink_strength * math.sqrt(D))
    # Sink keys carry only the sink direction, so every query sees them at
    # exactly sink_strength and the local features add no noise to it.
    k[:, :, :num_sinks] = 0.0
    k[:, :, :num_sinks, -1] = a
    q = _to_query_heads(k, H).clone()
    q[..., -1] = a
    return q, k


def retrieval(g, B, H, Hkv, L, D, *, num_matches: int = 3, strength: float = 16.0, causal: bool = False):
    """Each query matches ``num_matches`` random keys with logit ~= strength; the rest is noise.

    Keys are Gaussian; query i is the shortest vector whose logit with each of
    its matches is exactly ``strength``. A non-matching logit is then about
    N(0, strength^2 * num_matches / D), so the matches dominate when D is large
    against num_matches (num_matches <= D). With
    ``causal=True`` matches are drawn from keys 0..i, so they survive a causal
    mask. Matches are drawn with replacement (early causal rows may repeat one).
    """
    num_matches = _count("num_matches", num_matches)
    strength = _positive("strength", strength)
    if not isinstance(causal, bool):
        raise _bad("causal", causal, "a bool")
    if num_matches > D:
        raise _bad("num_matches", num_matches, f"at most head_dim ({D})")
    k = torch.randn(B, Hkv, L, D, generator=g)
    u = torch.rand(B, H, L, num_matches, generator=g)
    upper = (torch.arange(L) + 1).view(1, 1, L, 1) if causal else L
    match = (u * upper).long().clamp(max=L - 1)  # uniform over 0..i (causal) or 0..L-1
    kq = _to_query_heads(k, H).double()
    K = rearrange(torch.gather(kq, 2, repeat(match, "b h l m -> b h (l m) d", d=D)), "b h (l m) d -> b h l m d", m=num_matches)
    # Least-norm q with q . k_m = strength * sqrt(D) for every match m exactly:
    # q = K^T (K K^T)^-1 t. The small ridge keeps repeated matches solvable.
    gram = K @ K.transpose(-1, -2) + 1e-6 * D * torch.eye(num_matches, dtype=torch.float64)
    target = torch.full((*K.shape[:-1], 1), strength * math.sqrt(D), dtype=torch.float64)
    q = (K.transpose(-1, -2) @ torch.linalg.solve(gram, target)).squeeze(-1)
    return q.float(), k


def peaked(g, B, H, Hkv, L, D, *, strength: float = 16.0, causal: bool = False):
    """Sharply peaked rows: one key per query holds almost all the mass (retrieval, one match)."""
    return retrieval(g, B, H, Hkv, L, D, num_matches=1, strength=strength, causal=causal)


def periodic(g, B, H, Hkv, L, D, *, period: int = 16, strength: float = 8.0):
    """Logit(i, j) = strength on keys with (i - j) % period == 0, <= 0 elsewhere.

    Features are the harmonics h = 1..min(period // 2, D // 2) of the period;
    their normalised sum is a Dirichlet kernel, 1 at multiples of the period.
    period >= 2.
    """
    period = _count("period", period, minimum=2)
    strength = _positive("strength", strength)
    if D < 2:
        raise _bad("head_dim", D, "at least 2 for the periodic pattern")
    n = min(period // 2, D // 2)
    h = torch.arange(1, n + 1, dtype=torch.float64)
    angle = torch.arange(L, dtype=torch.float64).view(L, 1) * h * (2 * math.pi / period)
    phi = torch.cat([angle.cos(), angle.sin()], dim=-1).float() / math.sqrt(n)
    k = _fill(math.sqrt(strength * math.sqrt(D)) * phi, D).expand(B, Hkv, L, D).contiguous()
    return _to_query_heads(k, H).clone(), k


PATTERNS: dict[str, Callable] = {
    "random": random,
    "flat": flat,
    "peaked": peaked,
    "local": local,
    "sink_local": sink_local,
    "retrieval": retrieval,
    "periodic": periodic,
}


def pattern_params(pattern: str) -> dict[str, object]:
    """The tunable parameters of ``pattern`` and their defaults, e.g. {"window": 4.0, "strength": 8.0}."""
    fn = _pattern(pattern)
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}


def _pattern(pattern: object) -> Callable:
    if pattern not in PATTERNS:
        allowed = ", ".join(PATTERNS)
        raise SourceError("unknown_pattern", f"pattern must be one of {allowed}, got {pattern!r}", pattern=pattern, allowed=allowed)
    return PATTERNS[pattern]


def synthetic_qkv(
    pattern: str = "random",
    *,
    batch: int = 1,
    heads: int = 4,
    kv_heads: int | None = None,
    length: int = 256,
    head_dim: int = 64,
    seed: int = 0,
    **params,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (batch, heads, length, head_dim), k and v (batch, kv_heads, length, head_dim), float32, CPU.

    ``kv_heads`` (default ``heads``) must divide ``heads`` (grouped-query
    attention). ``params`` are the pattern's own (see ``pattern_params``).
    The same arguments and seed always give the same tensors.
    """
    fn = _pattern(pattern)
    B, H, L, D = (_count(n, x) for n, x in (("batch", batch), ("heads", heads), ("length", length), ("head_dim", head_dim)))
    Hkv = H if kv_heads is None else _count("kv_heads", kv_heads)
    if H % Hkv:
        raise _bad("kv_heads", kv_heads, f"a divisor of heads ({H})")
    seed = _count("seed", seed, minimum=0)
    allowed = pattern_params(pattern)
    for name in params:
        if name not in allowed:
            raise _bad(name, params[name], f"one of the {pattern} parameters {', '.join(allowed) or '(none)'}")
    g = torch.Generator().manual_seed(seed)
    q, k = fn(g, B, H, Hkv, L, D, **params)
    v = torch.randn(B, Hkv, L, D, generator=g)
    return q.contiguous(), k.contiguous(), v

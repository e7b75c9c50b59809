"""What one benchmark case is: a registry method on one set of shapes, with a ``Config``; and sweeps of cases.

A case's row (``Case.to_row``) is flat: the case's own fields, then the
``Config`` fields named as the ops' keyword arguments, then whatever was
measured. ``Case.from_row`` reads such a row back, which is how a case
travels to a fresh process (``python -m benchmarks _case ROW``) and how
results can be rerun.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields, replace
from typing import Iterable, Mapping, Sequence

import torch

from sparse_attn.methods import Config

__all__ = ["DTYPES", "SDPA_BACKENDS", "CUDA_ONLY_BACKENDS", "SDPA_METHODS", "DEFAULT_CONFIG", "CONFIG_FIELDS",
           "RESULT_FIELDS", "Case", "sweep_cases"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

# Backends ``dense`` can be pinned to with ``torch.nn.attention.sdpa_kernel`` (names of ``SDPBackend``);
# "default" leaves the choice to PyTorch.
SDPA_BACKENDS = {"default": None, "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
CUDA_ONLY_BACKENDS = ("flash", "cudnn", "efficient")
# The registry entries whose timed call is SDPA itself: the only ones an SDPA backend applies to.
SDPA_METHODS = ("dense",)

# Larger than the app's defaults (which suit a picture of a few hundred tokens): these are the settings
# the numbers in docs/benchmarks.md were measured with. Sampling draws uniformly, as it always did here.
DEFAULT_CONFIG = Config(top_k=64, num_samples=64, proposal="uniform", chunk_size=1024, compress_block_size=32,
                        compress_block_sliding_stride=16, selection_block_size=64, num_selected_blocks=16,
                        sliding_window_size=512)

# A case's seed is the Config's seed too (one seed per row), so the row holds it once, as a case field.
CONFIG_FIELDS = tuple(f.name for f in fields(Config) if f.name != "seed")
# What measuring adds to a row; ``from_row`` leaves these out.
RESULT_FIELDS = ("peak_rss_bytes", "peak_extra_bytes", "median_s", "iqr_s", "runs", "speedup_vs_dense", "note",
                 "error")


@dataclass
class Case:
    """One benchmark case: the method (a key of ``sparse_attn.methods.METHODS``), shapes, and its settings.

    q is (batch, heads, length, head_dim); k and v have ``kv_heads`` heads (None: ``heads``).
    ``seed`` makes the inputs and seeds the method's own randomness (it replaces ``config.seed``).
    ``sdpa_backend`` pins ``dense`` to one SDPA backend (a key of ``SDPA_BACKENDS``).
    """

    method: str
    length: int
    batch: int = 1
    heads: int = 8
    kv_heads: int | None = None
    head_dim: int = 64
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    min_run_time: float = 0.5
    min_runs: int = 5
    sdpa_backend: str = "default"
    config: Config = field(default=DEFAULT_CONFIG)

    def __post_init__(self):
        if self.config.seed != self.seed:
            self.config = replace(self.config, seed=self.seed)

    @classmethod
    def build(cls, **settings) -> "Case":
        """A case from case fields and ``Config`` fields given side by side (``top_k=8``), over ``DEFAULT_CONFIG``."""
        cfg = {k: settings.pop(k) for k in list(settings) if k in CONFIG_FIELDS}
        base = settings.pop("config", DEFAULT_CONFIG)
        return cls(**settings, config=replace(base, **cfg))

    @classmethod
    def from_row(cls, row: Mapping) -> "Case":
        """The case a row (``to_row``, plus any results) was measured from."""
        return cls.build(**{k: v for k, v in row.items() if k not in RESULT_FIELDS})

    def to_row(self) -> dict:
        """The case as a flat dict: case fields, then the Config's fields (JSON-safe)."""
        row = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config"}
        row.update({name: getattr(self.config, name) for name in CONFIG_FIELDS})
        return row

    @property
    def label(self) -> str:
        """The method's name, with the SDPA backend when one is pinned."""
        return self.method if self.sdpa_backend == "default" else f"{self.method} ({self.sdpa_backend})"

    def inputs(self):
        """q, k, v of this case's shapes, dtype and device, drawn on the CPU from ``seed`` (the same on any device)."""
        g = torch.Generator().manual_seed(self.seed)
        hkv = self.kv_heads or self.heads
        make = lambda h: torch.randn((self.batch, h, self.length, self.head_dim), generator=g).to(  # noqa: E731
            self.device, DTYPES[self.dtype])
        return make(self.heads), make(hkv), make(hkv)

    def tiny(self) -> "Case":
        """The same method and settings on 8 tokens: a warm-up call before the measured one.

        One-time costs (lazy library loads, allocator pools, kernel compilation) then
        do not count as the case's memory.
        """
        c = self.config
        cfg = replace(c, top_k=min(c.top_k, 8), num_samples=min(c.num_samples, 8),
                      chunk_size=None if c.chunk_size is None else 4, selection_block_size=4,
                      num_selected_blocks=max(2, c.num_initial_blocks + c.num_local_blocks),  # the forced ones fit
                      compress_block_size=4, compress_block_sliding_stride=2, sliding_window_size=4,
                      token_budget=min(c.token_budget, 8), page_size=min(c.page_size, 4))
        return replace(self, length=8, config=cfg)


def sweep_cases(methods: Iterable[str], lengths: Iterable[int], *, batch: int = 1, heads: Sequence[int] = (8,),
                kv_heads: Sequence[int | None] = (None,), head_dims: Sequence[int] = (64,),
                dtypes: Sequence[str] = ("float32",), devices: Sequence[str] = ("cpu",),
                sdpa_backends: Sequence[str] = ("default",), config: Config = DEFAULT_CONFIG,
                vary: Mapping[str, Sequence] | None = None, **fixed) -> list[Case]:
    """Every combination of the lists, as Cases.

    ``vary`` maps ``Config`` fields to the values to try (each is an axis; the others
    come from ``config``); ``sdpa_backends`` is an axis of the SDPA methods only;
    ``fixed`` sets other case fields (``min_runs``, ``seed``) for all.
    """
    vary = dict(vary or {})
    unknown = [name for name in vary if name not in CONFIG_FIELDS]
    if unknown:
        raise ValueError(f"vary takes Config fields {list(CONFIG_FIELDS)}, got {unknown}")
    causal = vary.pop("causal", (config.causal,))
    names = list(vary)
    variants = [(m, b) for m in methods for b in (sdpa_backends if m in SDPA_METHODS else ("default",))]
    cases = []
    for dev, dt, c, h, hkv, d, n, *values, (m, b) in itertools.product(
            devices, dtypes, causal, heads, kv_heads, head_dims, lengths, *vary.values(), variants):
        cfg = replace(config, causal=c, **dict(zip(names, values)))
        cases.append(Case(method=m, length=n, batch=batch, heads=h, kv_heads=hkv, head_dim=d, dtype=dt, device=dev,
                          sdpa_backend=b, config=cfg, **fixed))
    return cases

"""The gated-sum kernel of nsa_attention, checked on the CPU through Triton's interpreter.

Reference: the float64 sum of the three gated branch outputs. Triton decides
at import time whether it interprets, so the kernel tests run in a child
pytest started with TRITON_INTERPRET=1 (``test_gate_kernel_under_triton_interpreter``).
"""
from __future__ import annotations

import pytest
import torch

from sparse_attn.ops import nsa

triton = pytest.importorskip("triton")
from sparse_attn.kernels import gate_combine  # noqa: E402 (after the Triton check)

from tests.triton_interpreter import INTERPRETED, run_kernel_tests  # noqa: E402


def reference(c, s, w, g):
    c, s, w, g = (t.double() for t in (c, s, w, g))
    return g[..., 0:1] * c + g[..., 1:2] * s + g[..., 2:3] * w


if not INTERPRETED:

    def test_gate_kernel_under_triton_interpreter():
        run_kernel_tests(__file__, min_passed=4)


if INTERPRETED:

    @pytest.mark.parametrize("shape", [(1, 4, 33, 16), (2, 3, 7, 24)])
    def test_kernel_matches_float64(shape):
        c, s, w = (torch.randn(shape) for _ in range(3))
        g = torch.rand(*shape[:3], 3)
        out = gate_combine.gate_combine_triton(c, s, w, g, rows_per_program=8)
        assert out.shape == shape and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), reference(c, s, w, g), rtol=1e-6, atol=1e-6)

    def test_kernel_strided_inputs_and_expanded_gates():
        # A transposed branch output and gates that are one row of three, expanded (stride 0).
        c = torch.randn(1, 20, 4, 16).transpose(1, 2)
        s, w = torch.randn(1, 4, 20, 16), torch.randn(1, 4, 20, 16)
        g = torch.tensor([0.2, 0.5, 0.3]).expand(1, 4, 20, 3)
        out = gate_combine.gate_combine_triton(c, s, w, g)
        torch.testing.assert_close(out.double(), reference(c, s, w, g), rtol=1e-6, atol=1e-6)

    def test_kernel_through_nsa_dispatch(monkeypatch):
        # Only the gate kernel takes the CPU tensors (the other branches keep their references here).
        from sparse_attn.kernels import block_select, compressed, selected_block, sliding_flex

        for module in (block_select, compressed, selected_block):
            monkeypatch.setattr(module, "triton_supports", lambda *a: False)
        monkeypatch.setattr(sliding_flex, "triton_supports", lambda *a: False)
        calls = []
        real = gate_combine.gate_combine_triton
        monkeypatch.setattr(gate_combine, "gate_combine_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
        q, k, v = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
        gates = torch.rand(1, 4, 64, 3)
        kw = dict(gates=gates, sliding_window_size=8, compress_block_size=8, compress_block_sliding_stride=4,
                  selection_block_size=16, num_selected_blocks=3, causal=True)
        with torch.no_grad():
            out = nsa.nsa_attention(q, k, v, **kw)
        monkeypatch.undo()
        ref = nsa.nsa_attention(q.double(), k.double(), v.double(), **kw)
        assert calls == [1]
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5

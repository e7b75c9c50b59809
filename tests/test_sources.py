"""Sources: each synthetic pattern's planted structure, the real model's q/k/v, the file loader's rejections."""
from __future__ import annotations

import dataclasses
import json
import math
import pickle
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_attn.ops.dense import dense_attention
from sparse_attn.sources import (
    ERROR_CODES,
    PATTERNS,
    QKV,
    Source,
    SourceError,
    load,
    load_model,
    model_info,
    pattern_params,
    read_qkv_file,
    synthetic_qkv,
)

SENTENCE = "The quick brown fox jumps over the lazy dog, and the dog sleeps on."


def expect(code, fn, *args, **kwargs) -> SourceError:
    """fn must raise SourceError with this code and every param its code promises."""
    with pytest.raises(SourceError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.code == code, f"got {err.code}: {err}"
    assert set(ERROR_CODES[code]) <= set(err.params), (code, err.params)
    return err


def weights(q, k, *, causal=False):
    """Reference attention weights in float64."""
    v = torch.zeros(*k.shape[:-1], 1, dtype=torch.float64)
    return dense_attention(q.double(), k.double(), v, causal=causal, return_weights=True)[1]


def logits(q, k):
    """q k^T / sqrt(D) in float64, each query head against its kv head."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])


def offsets(L):
    i = torch.arange(L)
    return i.view(L, 1) - i.view(1, L)  # query minus key


# ---------------------------------------------------------------- synthetic


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_pattern_is_deterministic_by_seed_with_grouped_heads(pattern):
    a = synthetic_qkv(pattern, batch=2, heads=4, kv_heads=2, length=48, head_dim=32, seed=7)
    b = synthetic_qkv(pattern, batch=2, heads=4, kv_heads=2, length=48, head_dim=32, seed=7)
    c = synthetic_qkv(pattern, batch=2, heads=4, kv_heads=2, length=48, head_dim=32, seed=8)
    assert [t.shape for t in a] == [(2, 4, 48, 32), (2, 2, 48, 32), (2, 2, 48, 32)]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[2], c[2])  # v is always fresh noise per seed
    if pattern != "periodic":  # periodic q, k are a fixed function of position
        assert not torch.equal(a[1], c[1])


def test_random_temperature_sets_logit_spread_and_entropy():
    L, D = 256, 64
    entropies = []
    for t in (0.25, 1.0, 4.0):
        q, k, _ = synthetic_qkv("random", heads=2, length=L, head_dim=D, seed=1, temperature=t)
        assert logits(q, k).std().item() == pytest.approx(1 / t, rel=0.1)
        w = weights(q, k)
        entropies.append(-(w * w.clamp_min(1e-300).log()).sum(-1).mean().item())
    assert entropies[0] < entropies[1] < entropies[2] < math.log(L)


def test_flat_rows_are_near_uniform():
    L = 512
    q, k, _ = synthetic_qkv("flat", heads=4, kv_heads=1, length=L, seed=2)
    w = weights(q, k)
    assert w.max().item() < 4 / L and w.min().item() > 0.25 / L  # logits within ~5 std of 0.25
    entropy = -(w * w.log()).sum(-1)
    assert entropy.min().item() > 0.99 * math.log(L)


@pytest.mark.parametrize("causal", [False, True])
def test_peaked_rows_put_almost_all_mass_on_one_key(causal):
    q, k, _ = synthetic_qkv("peaked", heads=4, kv_heads=2, length=512, seed=3, causal=causal)
    w = weights(q, k, causal=causal)
    top1 = w.max(-1).values
    assert top1.mean().item() > 0.95 and top1.min().item() > 0.5


def test_local_mass_sits_in_a_gaussian_band_around_the_diagonal():
    L, window, strength = 1024, 4.0, 12.0
    q, k, _ = synthetic_qkv("local", heads=4, kv_heads=2, length=L, seed=4, window=window)
    w = weights(q, k)
    dist = offsets(L).abs()
    assert (w * (dist <= 3 * window)).sum(-1).min().item() > 0.97
    by_offset = [w[..., dist == d].mean().item() for d in range(0, int(3 * window))]
    assert all(a > b for a, b in zip(by_offset, by_offset[1:]))
    # Near the diagonal the weights are a Gaussian of std `window` tokens.
    ratio = by_offset[int(window)] / by_offset[0]
    assert ratio == pytest.approx(math.exp(-0.5), rel=0.15)
    # Logits follow strength * exp(-d^2 / (2 l^2)), l = window * sqrt(strength), up to feature noise.
    s = logits(q, k)
    ell = window * math.sqrt(strength)
    for d in (0, 4, 16, 40, 300):
        ideal = strength * math.exp(-(d**2) / (2 * ell**2))
        assert s[..., dist == d].mean().item() == pytest.approx(ideal, abs=0.5)


def test_sink_local_sink_columns_hold_most_mass_and_the_rest_is_local():
    L, sinks, window = 1024, 4, 4.0
    q, k, _ = synthetic_qkv("sink_local", heads=4, kv_heads=2, length=L, seed=5, num_sinks=sinks, window=window)
    w = weights(q, k)[..., 32:, :]  # queries whose local band does not reach the sinks
    sink_mass = w[..., :sinks].sum(-1)
    assert sink_mass.min().item() > 0.6
    rest = w[..., sinks:]
    band = offsets(L)[32:, sinks:].abs() <= 3 * window
    assert ((rest * band).sum(-1) / rest.sum(-1)).min().item() > 0.95
    # The sinks are what move the mass: the same seed without sinks has none there.
    q0, k0, _ = synthetic_qkv("sink_local", heads=4, length=L, seed=5, num_sinks=0, window=window)
    assert weights(q0, k0)[..., 32:, :sinks].sum(-1).max().item() < 0.01


def test_retrieval_matches_hold_the_mass_and_respect_causality():
    L, m = 512, 3
    q, k, _ = synthetic_qkv("retrieval", heads=4, kv_heads=2, length=L, seed=6, num_matches=m)
    w = weights(q, k)
    top = w.topk(m).values.sum(-1)
    assert top.mean().item() > 0.9
    # Only a few keys matter: the 4th-largest weight is small where the top three dominate.
    assert w.topk(m + 1).values[..., m].mean().item() < 0.05
    # causal=True draws matches from the past: a mask-free row already looks backwards.
    qc, kc, _ = synthetic_qkv("retrieval", heads=4, length=L, seed=6, num_matches=m, causal=True)
    wc = weights(qc, kc)[..., 16:, :]
    past = torch.tril(torch.ones(L, L, dtype=torch.bool))[16:]
    assert (wc * past).sum(-1).mean().item() > 0.9
    assert load(Source.synthetic("retrieval", causal=True, length=32)).causal


def test_periodic_mass_lands_on_multiples_of_the_period():
    L = 300
    for period in (7, 16):
        q, k, _ = synthetic_qkv("periodic", heads=2, length=L, seed=0, period=period)
        w = weights(q, k)
        on = offsets(L).remainder(period) == 0
        assert (w * on).sum(-1).min().item() > 0.95


def test_length_one_and_small_heads_still_work():
    for pattern in PATTERNS:
        q, k, v = synthetic_qkv(pattern, heads=2, kv_heads=1, length=1, head_dim=4, seed=0)
        out, w = dense_attention(q, k, v, return_weights=True)
        assert torch.allclose(w, torch.ones_like(w)) and torch.allclose(out, v.expand_as(out))


@settings(max_examples=25, deadline=None)
@given(
    pattern=st.sampled_from(sorted(PATTERNS)),
    B=st.integers(1, 2),
    kv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]),
    L=st.integers(1, 40),
    D=st.integers(3, 20),
    seed=st.integers(0, 2**31),
)
def test_any_shape_gives_finite_sdpa_tensors(pattern, B, kv, group, L, D, seed):
    qkv = load(Source.synthetic(pattern, batch=B, heads=kv * group, kv_heads=kv, length=L, head_dim=D, seed=seed))
    assert qkv.q.shape == (B, kv * group, L, D) and qkv.k.shape == qkv.v.shape == (B, kv, L, D)
    out = dense_attention(qkv.q, qkv.k, qkv.v, causal=qkv.causal)
    assert torch.isfinite(out).all()
    assert any(n.code == "weak_plant" for n in qkv.notes) == (pattern not in ("random", "flat"))


def test_synthetic_bad_arguments():
    expect("unknown_pattern", synthetic_qkv, "spiral")
    expect("bad_argument", synthetic_qkv, "local", windw=3)
    expect("bad_argument", synthetic_qkv, "random", temperature=0)
    expect("bad_argument", synthetic_qkv, "random", temperature=float("nan"))
    expect("bad_argument", synthetic_qkv, "random", heads=4, kv_heads=3)
    expect("bad_argument", synthetic_qkv, "random", length=0)
    expect("bad_argument", synthetic_qkv, "random", seed=-1)
    expect("bad_argument", synthetic_qkv, "periodic", period=1)
    expect("bad_argument", synthetic_qkv, "sink_local", head_dim=2)
    expect("bad_argument", synthetic_qkv, "retrieval", head_dim=4, num_matches=5)
    assert pattern_params("sink_local") == {"num_sinks": 4, "sink_strength": 14.0, "window": 4.0, "strength": 12.0}


# ---------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def minilm():
    return load_model()


def test_extracted_qk_reproduce_the_models_attention(minilm):
    from sparse_attn.sources.model import _encode, _run

    qkv = load(Source.model(SENTENCE, layer=0))
    enc, _ = _encode(minilm, SENTENCE, minilm.max_tokens)
    with torch.no_grad():
        ref = minilm.model(**enc, output_attentions=True).attentions
    assert len(ref) == minilm.num_layers == 6
    for layer in range(minilm.num_layers):
        qkv = load(Source.model(SENTENCE, layer=layer))
        assert qkv.q.shape == (1, 12, len(qkv.tokens), 32)
        _, w = dense_attention(qkv.q.double(), qkv.k.double(), qkv.v.double(), scale=qkv.scale, return_weights=True)
        assert (w - ref[layer].double()).abs().max().item() < 1e-5
    assert qkv.tokens[0] == "[CLS]" and qkv.tokens[-1] == "[SEP]" and "fox" in qkv.tokens
    assert qkv.meta["num_layers"] == 6 and qkv.label.startswith("all-MiniLM-L6-v2")

    # A padded batch: the model's own mask (padding keys off) and scale, every row.
    enc = minilm.tokenizer([SENTENCE, "A short one."], padding=True, return_tensors="pt")
    layers, ref = _run(minilm, dict(enc), output_attentions=True)
    keep = enc["attention_mask"].bool()[:, None, None, :]
    for (q, k, _), r in zip(layers, ref):
        s = (q.double() @ k.double().transpose(-1, -2)) * minilm.scale
        w = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
        assert (w - r.double()).abs().max().item() < 1e-5


def test_model_is_loaded_once_and_layers_are_cheap(minilm):
    assert load_model() is minilm
    a = load(Source.model(SENTENCE, layer=2))
    b = load(Source.model(SENTENCE, layer=2))
    assert torch.equal(a.q, b.q) and a.q.data_ptr() != b.q.data_ptr()  # callers get their own copy
    assert model_info() == {"name": "all-MiniLM-L6-v2", "num_layers": 6, "num_heads": 12, "head_dim": 32, "max_tokens": 512}


def test_concurrent_extractions_do_not_mix(minilm):
    # The app serves several sessions from one cached model; hooks must not cross.
    from concurrent.futures import ThreadPoolExecutor

    from sparse_attn.sources.model import _encode, _run

    texts = ["One.", "Two words here.", "A somewhat longer third sentence, with commas.", "Four."] * 2
    solo = [_run(minilm, _encode(minilm, t, 64)[0])[0] for t in texts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda t: _run(minilm, _encode(minilm, t, 64)[0])[0], texts))
    for a, b in zip(solo, together):
        assert len(a) == len(b) == 6
        assert all(torch.equal(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb))


def test_model_bad_input(minilm, tmp_path):
    expect("empty_text", load, Source.model("   \n"))
    expect("layer_out_of_range", load, Source.model(SENTENCE, layer=6))
    expect("layer_out_of_range", load, Source.model(SENTENCE, layer=-1))
    expect("bad_argument", load, Source.model(SENTENCE, max_tokens=10_000))
    err = expect("missing_model", load, Source.model(SENTENCE, model_dir=tmp_path / "nowhere"))
    assert "nowhere" in str(err) and "nowhere" in err.params["path"]
    expect("unsupported_model", load, Source.model(SENTENCE, model_dir=tmp_path))  # no config.json


def test_long_text_is_truncated_and_says_so(minilm):
    qkv = load(Source.model("word " * 700, layer=1))
    assert qkv.q.shape[2] == 512 == len(qkv.tokens)
    (note,) = qkv.notes
    assert note.code == "truncated" and note.params == {"kept": 512, "total": 702}
    qkv = load(Source.model(SENTENCE, max_tokens=8))
    assert qkv.q.shape[2] == 8 and qkv.tokens[-1] == "[SEP]" and qkv.notes[0].params["kept"] == 8


def _tiny_model(tmp_path, model_type, **extra):
    import transformers

    from sparse_attn.sources import default_model_dir

    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=30522, max_position_embeddings=64)
    if model_type == "distilbert":
        base = dict(dim=32, hidden_dim=64, n_layers=2, n_heads=2, vocab_size=30522, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(model_type, **base, **extra))
    path = tmp_path / model_type
    model.save_pretrained(path)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_model_dir() / f, path)
    return path


@pytest.mark.parametrize("model_type", ["roberta", "distilbert", "electra", "albert"])
def test_other_bert_family_architectures(minilm, tmp_path, model_type):
    path = _tiny_model(tmp_path, model_type, **({"embedding_size": 16} if model_type in ("electra", "albert") else {}))
    info = model_info(path)
    assert (info["num_layers"], info["num_heads"], info["head_dim"]) == (2, 2, 16)
    assert info["max_tokens"] == (62 if model_type == "roberta" else 64)
    qkv = load(Source.model("word " * 100, layer=1, model_dir=path))
    assert qkv.q.shape == (1, 2, info["max_tokens"], 16) and qkv.notes[0].code == "truncated"


def test_unsupported_architecture_and_failed_check_are_refused(minilm, tmp_path):
    from sparse_attn.sources.model import _self_check

    err = expect("unsupported_model", load, Source.model(SENTENCE, model_dir=_tiny_model(tmp_path, "deberta-v2")))
    assert "deberta-v2" in err.params["path"]
    # The load-time check can fail: a wrong scale no longer reproduces the model.
    assert _self_check(minilm) < 1e-5
    assert _self_check(dataclasses.replace(minilm, scale=1.0)) > 1e-2


# ---------------------------------------------------------------- files


@pytest.fixture
def gqa():
    g = torch.Generator().manual_seed(11)
    return tuple(torch.randn(*s, generator=g).numpy() for s in ((1, 4, 6, 8), (1, 2, 6, 8), (1, 2, 6, 5)))


def test_npz_round_trip_with_tokens(tmp_path, gqa):
    q, k, v = gqa
    path = tmp_path / "qkv.npz"
    np.savez_compressed(path, q=q, k=k, v=v, tokens=np.array(list("abcdef")), extra=np.zeros(3))
    qkv = load(Source.file(path))
    assert isinstance(qkv, QKV) and qkv.label == "qkv.npz" and qkv.tokens == list("abcdef") and qkv.notes == ()
    for got, want in zip((qkv.q, qkv.k, qkv.v), gqa):
        assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(want))
    # The same bytes as an upload; dtype None keeps the file's float32.
    up = load(Source.file(data=path.read_bytes(), name="upload.NPZ", dtype=None))
    assert torch.equal(up.q, qkv.q) and up.label == "upload.NPZ"


def test_safetensors_round_trip_bf16_and_tokens(tmp_path, gqa):
    from safetensors.torch import save_file

    tensors = {n: torch.from_numpy(a).to(torch.bfloat16) for n, a in zip("qk", gqa)}
    path = tmp_path / "qk.safetensors"
    save_file(tensors, path, metadata={"tokens": json.dumps(list("uvwxyz"))})
    qkv = load(Source.file(path, dtype=None))
    assert qkv.q.dtype == torch.bfloat16 and torch.equal(qkv.q, tensors["q"])
    assert torch.equal(qkv.v, qkv.k) and [n.code for n in qkv.notes] == ["v_from_k"]
    assert qkv.tokens == list("uvwxyz")
    save_file(tensors, path, metadata={"tokens": json.dumps(["x"])})
    qkv = load(Source.file(path))
    assert qkv.tokens is None and [n.code for n in qkv.notes] == ["v_from_k", "tokens_ignored"]


def test_npy_layouts(tmp_path, gqa):
    x = gqa[1]
    np.save(tmp_path / "stack.npy", np.stack([x, 2 * x, 3 * x]).astype(np.float64))
    qkv = load(Source.file(tmp_path / "stack.npy", dtype=torch.float64))
    assert torch.equal(qkv.v, torch.from_numpy(3 * x).double()) and qkv.q.dtype == torch.float64
    np.save(tmp_path / "one.npy", x)
    qkv = load(Source.file(tmp_path / "one.npy"))
    assert torch.equal(qkv.q, qkv.k) and qkv.notes[0].code == "shared_qkv"
    out = dense_attention(qkv.q, qkv.k, qkv.v)
    assert out.shape == (1, 2, 6, 8)


def test_pickles_and_object_arrays_are_never_loaded(tmp_path, gqa):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    expect("pickle", load, Source.file(tmp_path / "obj.npy"))
    np.savez(tmp_path / "obj.npz", q=gqa[0], k=np.array([object()] * 3, dtype=object))
    expect("pickle", load, Source.file(tmp_path / "obj.npz"))
    # A raw pickle that claims to be .npy is named for what it is, and never opened.
    (tmp_path / "evil.npy").write_bytes(pickle.dumps({"q": 1}))
    expect("raw_pickle", load, Source.file(tmp_path / "evil.npy"))
    # The same pickle inside a .npz, as the entry q.npy.
    np.savez(tmp_path / "inner.npz", k=gqa[1])
    with zipfile.ZipFile(tmp_path / "inner.npz", "a") as z:
        z.writestr("q.npy", pickle.dumps({"q": 1}))
    assert expect("raw_pickle", load, Source.file(tmp_path / "inner.npz")).params["name"] == "q"
    code = "".join(p.read_text() for p in (Path(__file__).parents[1] / "sparse_attn" / "sources").glob("*.py"))
    # np.load falls back to unpickling what lacks the .npy magic: the reader parses headers itself.
    assert "torch.load(" not in code and "allow_pickle=True" not in code and "np.load(" not in code


def test_size_limits_on_disk_and_unpacked(tmp_path, gqa):
    np.savez(tmp_path / "big.npz", q=gqa[0], k=gqa[1])
    size = (tmp_path / "big.npz").stat().st_size
    err = expect("too_large", load, Source.file(tmp_path / "big.npz", max_bytes=size - 1))
    assert err.params["size"] == size
    # A compressed file far under the limit that would unpack past it.
    np.savez_compressed(tmp_path / "bomb.npz", q=np.zeros((1, 1, 4096, 256)), k=np.zeros((1, 1, 4096, 256)))
    assert (tmp_path / "bomb.npz").stat().st_size < 2**20
    err = expect("unpacks_too_large", load, Source.file(tmp_path / "bomb.npz", max_bytes=2**20))
    assert err.params["size"] == 2 * 4096 * 256 * 8 + 2 * 128  # the two arrays' data and .npy headers
    expect("too_large", load, Source.file(data=b"\0" * 100, name="x.npy", max_bytes=99))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_rejected(tmp_path, gqa, bad):
    k = gqa[1].copy()
    k[0, 1, 2, 3] = bad
    k[0, 0, 0, 0] = bad
    np.savez(tmp_path / "nan.npz", q=gqa[0], k=k)
    err = expect("non_finite", load, Source.file(tmp_path / "nan.npz"))
    assert err.params["name"] == "k" and err.params["count"] == 2


def test_shape_and_dtype_rejections(tmp_path, gqa):
    q, k, v = gqa
    cases = {
        "two_d.npy": (np.zeros((6, 8), np.float32), "bad_shape", "x[None, None]"),
        "three_d.npy": (np.zeros((2, 6, 8), np.float32), "bad_shape", "x[None]"),
        "five.npy": (np.zeros((4, 1, 2, 6, 8), np.float32), "bad_shape", "2 or 3"),
        "ints.npy": (np.zeros((1, 2, 6, 8), np.int64), "bad_dtype", "int64"),
        "complex.npy": (np.zeros((1, 2, 6, 8), np.complex64), "bad_dtype", "complex64"),
        "empty.npy": (np.zeros((1, 2, 0, 8), np.float32), "bad_shape", "empty"),
    }
    for name, (arr, code, words) in cases.items():
        np.save(tmp_path / name, arr)
        assert words in str(expect(code, load, Source.file(tmp_path / name)))
    np.savez(tmp_path / "mismatch.npz", q=q, k=k[:, :, :, :4], v=v)
    err = expect("qkv_mismatch", load, Source.file(tmp_path / "mismatch.npz"))
    assert err.params["shapes"] == [(1, 4, 6, 8), (1, 2, 6, 4), (1, 2, 6, 5)]
    np.savez(tmp_path / "heads.npz", q=q[:, :3], k=k, v=v)  # 3 query heads over 2 kv heads
    expect("qkv_mismatch", load, Source.file(tmp_path / "heads.npz"))
    # Each shape rule has its own code, for the app to word.
    rules = {"two_d.npy": "two_d", "three_d.npy": "three_d", "five.npy": "stack", "empty.npy": "empty_axis"}
    for name, rule in rules.items():
        assert expect("bad_shape", load, Source.file(tmp_path / name)).params["rule"] == rule
    np.savez(tmp_path / "noq.npz", k=k, v=v)
    assert expect("missing_array", load, Source.file(tmp_path / "noq.npz")).params["found"] == ["k", "v"]


def test_bad_files_and_formats(tmp_path):
    expect("missing_file", load, Source.file(tmp_path / "gone.npz"))
    (tmp_path / "x.pt").write_bytes(b"whatever")
    assert expect("bad_suffix", load, Source.file(tmp_path / "x.pt")).params["suffix"] == ".pt"
    expect("bad_header", load, Source.file(data=b"\x93NUMPY garbage" * 3, name="junk.npy"))
    for name in ("junk.npz", "junk.safetensors"):
        err = expect("bad_format", load, Source.file(data=b"\x93NUMPY garbage" * 3, name=name))
        assert err.params["format"] == Path(name).suffix
    expect("bad_format", load, Source.file(data=b"", name="empty.safetensors"))
    with pytest.raises(TypeError):
        read_qkv_file()


def _npy_bytes(arr, version=None) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version, allow_pickle=False)
    return buf.getvalue()


def _npy_with_header(shape, descr="<f4", body=b"") -> bytes:
    """A .npy whose header says ``shape`` and ``descr``, followed by ``body`` (whatever the header claims)."""
    header = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + body


def test_a_text_file_named_npy_is_not_called_a_pickle():
    err = expect("not_npy", load, Source.file(data=b"q,k,v\n1,2,3\n" * 20, name="table.npy"))
    assert "pickle" not in str(err).lower() and err.params["name"] == ""
    # A .npz renamed .npy, and an empty file, are no .npy either.
    import io

    buf = io.BytesIO()
    np.savez(buf, q=np.zeros((1, 1, 2, 2), np.float32))
    for data in (buf.getvalue(), b""):
        expect("not_npy", load, Source.file(data=data, name="renamed.npy"))


def test_header_claims_are_checked_before_anything_is_allocated():
    # A header claiming 122 GiB in a file of a few hundred bytes: refused by its claim, nothing allocated.
    shape = (1, 61, 2**14, 2**15)
    err = expect("header_too_large", load, Source.file(data=_npy_with_header(shape, body=b"\0" * 64), name="huge.npy"))
    assert err.params["claimed"] == 122 * 2**30 and err.params["shape"] == shape
    # A claim under the limit that the data does not back: cut short, or with bytes to spare.
    full = _npy_bytes(np.ones((1, 2, 6, 8), np.float32))
    for data in (full[:-4], full + b"\0" * 4):
        err = expect("truncated", load, Source.file(data=data, name="cut.npy"))
        assert err.params["claimed"] == 1 * 2 * 6 * 8 * 4 and err.params["actual"] == len(data) - (len(full) - 384)
    # Headers that are no dict of the three keys, an unknown version, a dtype numpy does not know.
    bad = [
        b"\x93NUMPY\x01\x00" + struct.pack("<H", 12) + b"__import__()",
        b"\x93NUMPY\x01\x00" + struct.pack("<H", 8) + b"{'a': 1}",
        b"\x93NUMPY\x09\x00" + b"\0" * 20,
        b"\x93NUMPY\x01\x00" + struct.pack("<H", 60000) + b"{" * 100,
        _npy_with_header((1, 1, 1, 1), descr="<zz9"),
        _npy_with_header((1, -1, 1, 1)),
        b"\x93NUMPY\x01\x00" + struct.pack("<H", 5000) + b"(" * 5000,
    ]
    for data in bad:
        expect("bad_header", load, Source.file(data=data, name="bad.npy"))
    # An object dtype in the header is refused as a pickle before its bytes are looked at.
    expect("pickle", load, Source.file(data=_npy_with_header((1, 1, 1, 1), descr="|O", body=b"\x80\x04"), name="o.npy"))


def test_header_layouts_numpy_writes_load_as_numpy_reads_them():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(1, 2 * 3, 4, 5) / 7
    for arr in (x, np.asfortranarray(x), x.astype(">f4"), x.astype(np.float16)):
        for version in (None, (2, 0), (3, 0)):
            qkv = load(Source.file(data=_npy_bytes(arr, version), name="x.npy", dtype=None))
            assert qkv.q.dtype == getattr(torch, arr.dtype.newbyteorder("=").name)
            np.testing.assert_array_equal(qkv.q.numpy(), arr)


def _central(data: bytes, name: str) -> int:
    """Offset of ``name``'s entry in the zip's central directory."""
    at = data.index(b"PK\x01\x02" + data[data.index(b"PK\x01\x02") + 4 : data.index(b"PK\x01\x02") + 4])
    while True:
        n = struct.unpack("<H", data[at + 28 : at + 30])[0]
        if data[at + 46 : at + 46 + n] == name.encode():
            return at
        at = data.index(b"PK\x01\x02", at + 4)


def _forge(data: bytes, name: str, *, size=None, csize=None, crc=None, local=False) -> bytes:
    """The archive with entry ``name``'s sizes or checksum rewritten in its directory (and local header)."""
    out = bytearray(data)
    offsets = [_central(data, name) + 16]
    if local:
        offsets.append(struct.unpack("<I", data[offsets[0] + 26 : offsets[0] + 30])[0] + 14)
    for at in offsets:
        for value, shift in ((crc, 0), (csize, 4), (size, 8)):
            if value is not None:
                out[at + shift : at + shift + 4] = struct.pack("<I", value)
    return bytes(out)


@pytest.mark.parametrize("compress", [False, True])
def test_forged_archive_sizes_get_their_own_message(tmp_path, gqa, compress):
    path = tmp_path / "qkv.npz"
    (np.savez_compressed if compress else np.savez)(path, q=gqa[0], k=gqa[1])
    data = path.read_bytes()
    info = zipfile.ZipFile(path).getinfo("k.npy")
    assert load(Source.file(data=data, name="qkv.npz")).k.shape == (1, 2, 6, 8)
    forged = [
        _forge(data, "k.npy", size=info.file_size + 100),  # claims more than the data unpacks to
        _forge(data, "k.npy", size=info.file_size - 100),  # claims less: the checksum of what is read is wrong
        _forge(data, "k.npy", crc=info.CRC ^ 1),
        _forge(data, "k.npy", csize=info.compress_size - 50),
    ]
    for bad in forged:
        assert expect("archive_mismatch", load, Source.file(data=bad, name="qkv.npz")).params["name"] == "k"
    # A directory that claims a huge entry is refused by its claim.
    expect("unpacks_too_large", load, Source.file(data=_forge(data, "k.npy", size=2**32 - 1), name="qkv.npz"))
    if not compress:
        # Sizes and checksum forged consistently for a shorter entry: the .npy header inside still tells.
        cut = info.file_size - 100
        crc = zlib.crc32(zipfile.ZipFile(path).read("k.npy")[:cut])
        bad = _forge(data, "k.npy", size=cut, csize=cut, crc=crc, local=True)
        assert expect("truncated", load, Source.file(data=bad, name="qkv.npz")).params["name"] == "k"


FUZZ_SEEDS = {}


def _fuzz_seed(kind: str) -> bytes:
    """One valid file of each format, built once."""
    if kind not in FUZZ_SEEDS:
        import io

        g = np.random.default_rng(3)
        q = g.standard_normal((1, 2, 4, 4)).astype(np.float32)
        if kind == "npy":
            FUZZ_SEEDS[kind] = _npy_bytes(np.stack([q, q]))
        elif kind == "safetensors":
            from safetensors.torch import save

            FUZZ_SEEDS[kind] = save({"q": torch.from_numpy(q), "k": torch.from_numpy(q.copy())}, metadata={"tokens": '["a"]'})
        else:
            buf = io.BytesIO()
            (np.savez_compressed if kind == "npz_c" else np.savez)(buf, q=q, k=q, tokens=np.array(list("abcd")))
            FUZZ_SEEDS[kind] = buf.getvalue()
    return FUZZ_SEEDS[kind]


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["npy", "npz", "npz_c", "safetensors"]),
       edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_damaged_files_only_ever_raise_a_source_error(kind, edits, cut):
    """Flipped bytes and cut files anywhere: each is loaded or refused with a code, never another exception."""
    data = bytearray(_fuzz_seed(kind))
    for where, byte in edits:
        data[int(where * len(data))] = byte
    if cut is not None:
        data = data[: int(cut * len(data))]
    name = "f." + ("npz" if kind.startswith("npz") else kind)
    try:
        qkv = load(Source.file(data=bytes(data), name=name))
    except SourceError as e:
        assert e.code in ERROR_CODES and set(ERROR_CODES[e.code]) <= set(e.params)
    else:
        assert qkv.q.dim() == 4 and torch.isfinite(qkv.q).all()


# ---------------------------------------------------------------- the entry point


def test_source_is_a_hashable_cache_key_and_load_validates():
    a = Source.synthetic("local", window=3.0, strength=5.0)
    b = Source("synthetic", pattern="local", params={"strength": 5.0, "window": 3.0})
    assert a == b and hash(a) == hash(b) and a != Source.synthetic("local", window=3.0)
    assert hash(Source.file(data=b"abc", name="a.npy")) == hash(Source.file(data=b"abc", name="a.npy"))
    with pytest.raises(TypeError):
        load("random")
    expect("bad_argument", Source, "web")
    expect("bad_argument", load, Source.synthetic(dtype=torch.int32))
    expect("bad_argument", load, Source.synthetic(device="nonsense"))
    half = load(Source.synthetic("local", dtype=torch.float16, length=16))
    assert half.q.dtype == half.k.dtype == half.v.dtype == torch.float16
    assert half.meta["params"] == {"window": 4.0, "strength": 12.0} and half.tokens is None

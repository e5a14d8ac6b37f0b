"""KV cache element codecs: bit-exact against gguf.quants (the reference for ggml's layouts)."""

import platform

import gguf.quants as gq
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engine.errors import ConfigError
from engine.memory.codecs import (
    CACHE_TYPES,
    Codec,
    bytes_per_value,
    check_row,
    get_codec,
)

ALL = list(CACHE_TYPES)
QUANT = ["q8_0", "q4_0"]
# Where 1/d overflows (block max magnitude < ~1e-36), gguf's bytes come from numpy casting
# inf/NaN to int8/uint8: 0 on x86, unspecified elsewhere. The codec always writes 0.
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


# -- references ------------------------------------------------------------------------------
def _ref_encode(name: str, x: np.ndarray) -> np.ndarray:
    """gguf.quants.quantize, as the bytes / values the codec stores."""
    with np.errstate(all="ignore"):
        r = gq.quantize(x, CACHE_TYPES[name])
    if name == "bf16":  # gguf returns the bf16 bits as uint8 pairs
        return r.view(np.uint16).reshape(x.shape)
    return r


def _ref_decode(name: str, stored: np.ndarray) -> np.ndarray:
    if name == "bf16":
        stored = stored.view(np.uint8)
    with np.errstate(all="ignore"):  # inf fp16 scales decode to inf / NaN, as in ggml
        return gq.dequantize(stored, CACHE_TYPES[name])


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _same_bits(a: np.ndarray, b: np.ndarray) -> None:
    """Equal bit for bit (so -0.0 != 0.0), any NaN equal to any NaN."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    if a.dtype.kind == "f":
        nan_a, nan_b = np.isnan(a), np.isnan(b)
        np.testing.assert_array_equal(nan_a, nan_b)
        ints = a.view(f"u{a.dtype.itemsize}"), b.view(f"u{b.dtype.itemsize}")
        np.testing.assert_array_equal(ints[0][~nan_a], ints[1][~nan_b])
    else:
        np.testing.assert_array_equal(a, b)


def _check_exact(name: str, x: np.ndarray) -> None:
    codec = get_codec(name)
    enc = codec.encode(torch.from_numpy(x))
    assert enc.dtype == codec.storage_dtype and tuple(enc.shape) == (x.shape[0], codec.row_elems(x.shape[1]))
    stored = _np(enc)
    _same_bits(stored, _ref_encode(name, x))
    _same_bits(codec.decode(enc).numpy(), _ref_decode(name, stored))


# -- inputs ----------------------------------------------------------------------------------
def _rows(n_values: int, seed: int) -> np.ndarray:
    """Random rows plus the awkward ones: zeros, huge, tiny, mixed scales, ties, half points."""
    rng = np.random.default_rng(seed)
    nb = n_values // 32
    rows = [
        rng.standard_normal(n_values),
        rng.uniform(-1, 1, n_values) * 10.0 ** rng.integers(-8, 8, n_values),  # per-value scale
        np.zeros(n_values),
        -np.zeros(n_values),
        rng.standard_normal(n_values) * 1e30,  # q scale overflows fp16 -> inf / NaN on decode
        rng.standard_normal(n_values) * 3e4,  # near the fp16 range edge
        rng.standard_normal(n_values) * 1e-6,  # q scale is an fp16 subnormal
        rng.standard_normal(n_values) * 1e-20,  # q scale flushes to fp16 zero
        np.full(n_values, 1.0),
        np.full(n_values, -2.5),
    ]
    # q8_0 half points: amax 127 -> d = 1, so x * id = x exactly; k + 0.5 rounds away from 0.
    r = rng.integers(-126, 126, n_values) + 0.5
    r[::32] = 127.0
    rows.append(r)
    r = -r
    rows.append(r)
    # q4_0 half points: max -8 -> d = 1, nibble = trunc(x + 8.5): x = k - 0.5 sits on the edge.
    r = rng.integers(-7, 8, n_values) - 0.5
    r[::32] = -8.0
    rows.append(r)
    # q4_0: max +8 -> d = -1; the -8 values map to 16.5 -> 16 -> clipped to 15.
    r = rng.choice([-8.0, -4.0, 0.0, 4.0, 8.0], n_values)
    r[::32] = 8.0
    rows.append(r)
    # ties in |max| for q4_0: the first of +a / -a wins, in both orders.
    r = rng.uniform(-1, 1, n_values)
    b = r.reshape(nb, 32)
    b[:, 3], b[:, 20] = 3.0, -3.0
    rows.append(r)
    r = r.copy()
    b = r.reshape(nb, 32)
    b[:, 3], b[:, 20] = -3.0, 3.0
    rows.append(r)
    # a zero block and a tiny block inside otherwise normal rows
    r = rng.standard_normal(n_values)
    r[:32] = 0.0
    r[-32:] *= 1e-30
    rows.append(r)
    x = np.stack(rows).astype(np.float32)
    return np.concatenate([x, rng.standard_normal((6, n_values)).astype(np.float32)])


# -- exactness --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n_values", [32, 64, 96, 4096])
def test_encode_decode_match_gguf(name, n_values):
    _check_exact(name, _rows(n_values, seed=n_values))


@pytest.mark.parametrize("name", QUANT)
def test_many_random_rows_match_gguf(name):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((512, 256)) * rng.uniform(1e-3, 1e3, (512, 1))).astype(np.float32)
    _check_exact(name, x)


def _roundf(v: np.ndarray) -> np.ndarray:
    a = np.abs(v)
    fl = np.floor(a)
    return np.sign(v) * (fl + np.floor(2 * (a - fl)))


def _ulps(v: np.ndarray, k: int) -> np.ndarray:
    """v and its k float32 neighbours on each side: (..., 2k + 1)."""
    out, lo, hi = [v], v, v
    for _ in range(k):
        lo, hi = np.nextafter(lo, np.float32(-np.inf)), np.nextafter(hi, np.float32(np.inf))
        out = [lo, *out, hi]
    return np.stack(out, axis=-1)


def _rounding_edge_blocks(name: str) -> np.ndarray:
    """Blocks [scale-setting max, x, 0...] whose bytes change if the float32 arithmetic is not
    replicated exactly: ``amax * (1/127)`` instead of ``amax / 127``, or ``x * id (+ 8.5)`` in
    float64 (no float32 rounding of the product / sum), all near rounding half points."""
    f32 = np.float32
    rng = np.random.default_rng(7)
    amax = rng.uniform(1, 1000, 20000).astype(f32)
    if name == "q8_0":
        d = amax / f32(127)
        ids = {"exact": f32(1) / d, "mul": f32(1) / (amax * (f32(1) / f32(127)))}
        # x right at (k + 0.5) * d: roundf(x * id) sits on its half point
        x = _ulps(((rng.integers(0, 127, amax.size) + 0.5) * d.astype(np.float64)).astype(f32), 2)
        q = {k: _roundf((x * v[:, None]).astype(f32)) for k, v in ids.items()}
        q["f64"] = _roundf(x.astype(np.float64) * ids["exact"][:, None])
        m = amax
    else:
        d = amax / f32(8)  # the max is -amax: d = -amax / -8
        ids = {"exact": f32(1) / d}
        # x at (n - 8.5) * d: x * id + 8.5 sits on the integer n
        x = _ulps(((rng.integers(1, 16, amax.size) - 8.5) * d.astype(np.float64)).astype(f32), 1)
        q = {"exact": np.trunc((x * ids["exact"][:, None]).astype(f32) + f32(8.5))}
        q["f64"] = np.trunc(x.astype(np.float64) * ids["exact"][:, None] + 8.5)
        m = -amax
    picked = []
    for other in (k for k in q if k != "exact"):
        r, c = np.nonzero(q[other] != q["exact"])
        assert len(r) > 10, other  # the edges exist, so the test can tell the difference
        picked += [(m[i], x[i, j]) for i, j in zip(r[:40], c[:40])]
    blocks = np.zeros((len(picked), 32), dtype=np.float32)
    blocks[:, 0], blocks[:, 17] = np.array(picked, dtype=np.float32).T
    return np.concatenate([blocks, -blocks])


@pytest.mark.parametrize("name", QUANT)
def test_float32_rounding_edges_match_gguf(name):
    x = _rounding_edge_blocks(name)
    _check_exact(name, x)
    _check_exact(name, x.reshape(-1, 128))


@pytest.mark.parametrize("name", QUANT)
def test_scale_overflow_blocks_are_zero(name):
    # 1/d overflows to inf: x * id is +-inf or NaN; the codec writes zeros, as numpy does on x86.
    x = np.full((3, 64), 1e-38, dtype=np.float32)
    x[1] = -2e-38
    x[2, ::2] = 0.0
    codec = get_codec(name)
    enc = codec.encode(torch.from_numpy(x))
    blocks = enc.view(3, 2, codec.type_size)
    assert not blocks[..., 2:].any()
    assert (codec.decode(enc) == 0).all()
    if X86:
        _same_bits(enc.numpy(), _ref_encode(name, x))


def test_q4_0_nibble_layout():
    # value j in the low nibble of byte j, value j + 16 in its high nibble; max -8 -> d = 1.
    x = np.concatenate([np.arange(-8, 8), np.arange(7, -9, -1)]).astype(np.float32)
    x[0] = -8.0
    enc = get_codec("q4_0").encode(torch.from_numpy(x[None]))[0].numpy()
    assert enc[:2].view(np.float16)[0] == 1.0
    q = x.astype(np.int64) + 8
    np.testing.assert_array_equal(enc[2:], (q[:16] | (q[16:] << 4)).astype(np.uint8))


def test_q8_0_layout():
    x = np.arange(-16, 16, dtype=np.float32) * 4  # amax 64 -> d = 64/127
    enc = get_codec("q8_0").encode(torch.from_numpy(x[None]))[0].numpy()
    assert enc.shape == (34,)
    assert enc[:2].view(np.float16)[0] == np.float16(np.float32(64) / np.float32(127))
    np.testing.assert_array_equal(enc[2:].view(np.int8), np.round(x * 127 / 64).astype(np.int8))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("src", [torch.float16, torch.bfloat16])
def test_half_inputs_are_widened_first(name, src):
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)).to(src)
    codec = get_codec(name)
    assert torch.equal(codec.encode(x), codec.encode(x.float()))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_to_other_dtypes_is_a_cast_of_f32(name, dtype):
    codec = get_codec(name)
    enc = codec.encode(torch.randn(8, 64, generator=torch.Generator().manual_seed(1)))
    out = codec.decode(enc, dtype)
    assert out.dtype == dtype
    assert torch.equal(out, codec.decode(enc).to(dtype))


# -- error bounds -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, rel",
    [("f32", 0.0), ("f16", 2.0**-11), ("bf16", 2.0**-8), ("q8_0", 0.5 / 127 + 2.0**-10), ("q4_0", 1 / 8 + 2.0**-9)],
)
def test_roundtrip_error_bound(name, rel):
    # f16 / bf16: half an ulp, relative. Quantized: half a step of the block scale (q4_0's
    # clipped 16 costs a full step at the +max end: 1/8 of |max|), plus the fp16 scale rounding.
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 10
    codec = get_codec(name)
    y = codec.decode(codec.encode(x))
    if codec.block_size == 1:
        assert ((y - x).abs() <= x.abs() * rel).all()
    else:
        amax = x.view(64, -1, 32).abs().amax(-1, keepdim=True)
        err = (y - x).view(64, -1, 32).abs()
        assert (err <= amax * rel).all()
        assert err.mean() < amax.mean() * rel / 2


# -- encode_into ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_encode_into_strided_view(name):
    codec = get_codec(name)
    n_values, n_rows = 128, 7
    x = torch.from_numpy(_rows(n_values, seed=3)[:n_rows])
    width = codec.row_elems(n_values)
    # a bigger buffer: rows 2, 4, 6, ... of a cache with padding after each row
    buf = torch.zeros(2 * n_rows + 2, width + 6, dtype=codec.storage_dtype)
    sentinel = buf.clone()
    view = buf[2 : 2 + 2 * n_rows : 2, 3 : 3 + width]
    assert not view.is_contiguous()
    codec.encode_into(x, view)
    assert torch.equal(view, codec.encode(x))
    mask = torch.ones_like(buf, dtype=torch.bool)
    mask[2 : 2 + 2 * n_rows : 2, 3 : 3 + width] = False
    assert torch.equal(buf[mask], sentinel[mask])
    # decode reads the strided view as well
    _same_bits(codec.decode(view).numpy(), codec.decode(codec.encode(x)).numpy())


@pytest.mark.parametrize("name", QUANT)
def test_decode_odd_offset_view(name):
    # scale bytes at odd addresses cannot be viewed as fp16 in place; decode copies them.
    codec = get_codec(name)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    enc = codec.encode(x)
    buf = torch.zeros(4, enc.shape[1] + 1, dtype=torch.uint8)
    buf[:, 1:] = enc
    assert torch.equal(codec.decode(buf[:, 1:]), codec.decode(enc))


@pytest.mark.parametrize("name", ALL)
def test_encode_into_rejects_wrong_out(name):
    codec = get_codec(name)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError):
        codec.encode_into(x, torch.empty(2, codec.row_elems(64) + 1, dtype=codec.storage_dtype))
    wrong = torch.float64
    with pytest.raises(ValueError):
        codec.encode_into(x, torch.empty(2, codec.row_elems(64), dtype=wrong))


def test_empty_batch():
    for name in ALL:
        codec = get_codec(name)
        enc = codec.encode(torch.empty(0, 64))
        assert enc.shape == (0, codec.row_elems(64))
        assert codec.decode(enc).shape == (0, 64)


# -- sizes, lookup, validation ---------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_sizes(name):
    codec = get_codec(name)
    assert isinstance(codec, Codec) and codec.name == name and codec.ggml_type == CACHE_TYPES[name]
    assert codec.row_bytes(4096) == 4096 * bytes_per_value(name)
    assert codec.row_elems(4096) * torch.empty((), dtype=codec.storage_dtype).element_size() == codec.row_bytes(4096)


def test_get_codec_unknown_name():
    with pytest.raises(ConfigError) as e:
        get_codec("q5_1")
    msg = str(e.value)
    assert "q5_1" in msg
    for name in ALL:
        assert name in msg


def test_check_row():
    check_row(get_codec("q4_0"), 4096, "type_k")
    check_row(get_codec("f16"), 72, "type_k")
    with pytest.raises(ConfigError, match=r"type_k q4_0 needs rows that are a multiple of 32; layer row has 72 values"):
        check_row(get_codec("q4_0"), 72, "type_k")
    with pytest.raises(ConfigError, match="type_v q8_0"):
        check_row(get_codec("q8_0"), 40, "type_v")
    with pytest.raises(ConfigError):
        get_codec("q8_0").row_elems(48)


# -- property: bit-exact on arbitrary float32 rows --------------------------------------------
_f32 = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)
_specials = st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.5, -8.0, 8.0, 127.0, -127.5, 1e-38, -1e-40])


@st.composite
def _float_rows(draw):
    n_rows = draw(st.integers(1, 4))
    n_blocks = draw(st.integers(1, 3))
    elems = st.one_of(_f32, _specials)
    x = draw(hnp.arrays(np.float32, (n_rows, 32 * n_blocks), elements=elems))
    if not X86:  # see X86: keep blocks whose 1/d overflows out of the byte comparison
        b = x.reshape(-1, 32)
        b[np.abs(b).max(axis=1) < 1e-30] = 0.0
    return x


@pytest.mark.parametrize("name", QUANT)
@settings(max_examples=150, deadline=None)
@given(x=_float_rows())
def test_property_bit_exact(name, x):
    _check_exact(name, x)

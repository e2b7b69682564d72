"""Entropy codec for integer latent codes: exact round trip, rate = DL, corruption errors."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from tl_mdl import codec
from tl_mdl.codec import MAGIC
from tl_mdl.mdl import latent_description_length


def round_trip(q: torch.Tensor) -> torch.Tensor:
    out = codec.decode(codec.encode(q))
    assert out.dtype == torch.int64
    assert out.shape == q.shape
    assert torch.equal(out, q.to(torch.int64))
    return out


HAND_BUILT = {
    "mixed": [[1, 0, 2], [0, 0, 3], [4, 0, 0], [1, -1, 0]],
    "negative": [[-1, -2, -3], [-1, 0, -3], [0, -2, 0]],
    "all_zero": [[0, 0, 0, 0]] * 5,
    "all_constant": [[7, 7]] * 6,
    "always_on_varied": [[1, 2], [2, 1], [3, 1]],
    "single_row": [[0, 3, -5, 0, 1]],
    "single_feature": [[0], [2], [2], [0], [-9]],
    "single_entry": [[4]],
    "single_zero": [[0]],
    "large": [[2**40, 0, -(2**40)], [0, 5, -(2**40)], [1, 1, 2**40 - 1]],
}


@pytest.mark.parametrize("name", sorted(HAND_BUILT))
def test_round_trip_hand_built(name):
    round_trip(torch.tensor(HAND_BUILT[name], dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8])
def test_round_trip_other_integer_dtypes(dtype):
    q = torch.randint(0, 5, (20, 4), generator=torch.Generator().manual_seed(0)).to(dtype)
    round_trip(q)


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_random(seed):
    gen = torch.Generator().manual_seed(seed)
    n, f = 200, 17
    p = torch.rand(f, generator=gen)
    p[0], p[1] = 0.0, 1.0  # one always-off and one always-on feature
    active = torch.rand(n, f, generator=gen) < p
    scale = 10 ** torch.randint(0, 12, (f,), generator=gen)
    values = (torch.randn(n, f, generator=gen, dtype=torch.float64) * scale).round().long()
    values[values == 0] = 1
    round_trip(torch.where(active, values, torch.zeros_like(values)))


def realistic_sparse_code(n: int, f: int, seed: int) -> torch.Tensor:
    """Features active with probability 1%..30%, magnitudes ~ |Laplace| on a grid."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.linspace(0.01, 0.3, f)
    active = torch.rand(n, f, generator=gen) < p
    mags = torch.distributions.Exponential(torch.full((f,), 0.3)).sample((n,))
    values = mags.ceil().long() * torch.where(torch.rand(n, f, generator=gen) < 0.1, -1, 1)
    return torch.where(active, values, torch.zeros_like(values))


def test_payload_rate_within_one_percent_of_dl():
    torch.manual_seed(0)  # Exponential.sample uses the global generator
    n, f = 20_000, 48
    q = realistic_sparse_code(n, f, seed=0)
    data = codec.encode(q)
    stats = codec.inspect(data)
    assert torch.equal(codec.decode(data), q)
    assert (stats.n_inputs, stats.n_features) == (n, f)
    assert stats.total_bits == 8 * len(data)
    assert stats.header_bits > 0 and stats.payload_bits > 0
    assert stats.header_bits + stats.payload_bits == stats.total_bits
    dl = latent_description_length(q)
    assert dl > 1.0  # a non-trivial code
    assert stats.payload_bits_per_input == pytest.approx(stats.payload_bits / n)
    assert abs(stats.payload_bits - n * dl) <= 0.01 * n * dl, (stats.payload_bits, n * dl)


def test_inspect_on_trivial_codes():
    for q in (torch.zeros(10, 3, dtype=torch.int64), torch.full((10, 3), 5)):
        stats = codec.inspect(codec.encode(q))
        assert latent_description_length(q) == pytest.approx(0.0, abs=1e-12)
        assert stats.payload_bits <= 64  # nothing to code beyond the coder's flush word(s)


# ---------------------------------------------------------------- corruption


@pytest.fixture(scope="module")
def small_stream() -> bytes:
    return codec.encode(torch.tensor(HAND_BUILT["mixed"]))


@pytest.mark.parametrize("cut", [0, 1, 7, 8, 12, 20, 28, -4, -1])
def test_truncated_stream(small_stream, cut):
    data = small_stream[:cut] if cut >= 0 else small_stream[: len(small_stream) + cut]
    with pytest.raises(ValueError, match="truncated|magic"):
        codec.decode(data)
    with pytest.raises(ValueError):
        codec.inspect(data)


def test_padded_stream(small_stream):
    with pytest.raises(ValueError, match="padded"):
        codec.decode(small_stream + b"\x00\x00\x00\x00")


def test_every_single_bit_flip_is_detected(small_stream):
    for i in range(len(small_stream)):
        for b in range(8):
            data = bytearray(small_stream)
            data[i] ^= 1 << b
            with pytest.raises(ValueError, match="magic|truncated|corrupted"):
                codec.decode(bytes(data))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello world, this is not a latent code at all",
        b"\x00" * 64,
        b"TLMDLC2\n" + b"\x00" * 40,
        b"{\"d_in\": 4}",
        b"PK\x03\x04" + b"\x00" * 60,
    ],
    ids=["empty", "text", "zeros", "other_version", "json", "zip"],
)
def test_foreign_bytes(data):
    with pytest.raises(ValueError, match="magic|truncated"):
        codec.decode(data)


def test_foreign_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"activations": torch.ones(3, 2)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match="magic"):
        codec.decode((tmp_path / "a.safetensors").read_bytes())


def crafted(header: bytes, payload: bytes = b"") -> bytes:
    """A stream with the right magic and a valid CRC around an arbitrary header/payload."""
    body = struct.pack("<QQ", len(header), len(payload) // 4) + header + payload
    return MAGIC + struct.pack("<I", zlib.crc32(body)) + body


def test_crc_valid_garbage_header_is_value_error():
    with pytest.raises(ValueError, match="corrupt|latent code"):
        codec.decode(crafted(b"garbage header"))


def test_crc_valid_inconsistent_header_is_value_error():
    header = zlib.compress(np.array([2, 1, 5, 1, 3, 1], dtype="<i8").tobytes())
    with pytest.raises(ValueError):
        codec.decode(crafted(header))


# ---------------------------------------------------------------- wrong inputs


@pytest.mark.parametrize(
    "q, exc",
    [
        (torch.zeros(3, 2), TypeError),
        (torch.zeros(3, 2, dtype=torch.float64), TypeError),
        (torch.zeros(3, 2, dtype=torch.bool), TypeError),
        (torch.zeros(3, 2, dtype=torch.complex64), TypeError),
        (torch.zeros(3, dtype=torch.int64), ValueError),
        (torch.zeros(2, 3, 4, dtype=torch.int64), ValueError),
        (torch.zeros(0, 4, dtype=torch.int64), ValueError),
        (np.zeros((3, 2), dtype=np.int64), (TypeError, ValueError)),
        ([[1, 2], [3, 4]], (TypeError, ValueError)),
    ],
    ids=["float32", "float64", "bool", "complex", "1d", "3d", "empty", "numpy", "list"],
)
def test_encode_wrong_inputs(q, exc):
    with pytest.raises(exc):
        codec.encode(q)


@pytest.mark.parametrize("data", ["TLMDLC1\n", None, 123, torch.zeros(4, dtype=torch.uint8)])
def test_decode_wrong_types(data):
    with pytest.raises(TypeError, match="bytes"):
        codec.decode(data)


def test_decode_accepts_bytearray_and_memoryview(small_stream):
    q = torch.tensor(HAND_BUILT["mixed"])
    assert torch.equal(codec.decode(bytearray(small_stream)), q)
    assert torch.equal(codec.decode(memoryview(small_stream)), q)


def test_uint64_codes_beyond_int64_are_refused():
    big = torch.tensor([[2**63 + 5, 0], [1, 0]], dtype=torch.uint64)
    with pytest.raises(ValueError, match="9223372036854775813, beyond int64"):
        codec.encode(big)
    small = torch.tensor([[5, 0], [1, 0]], dtype=torch.uint64)
    assert torch.equal(codec.decode(codec.encode(small)), small.to(torch.int64))

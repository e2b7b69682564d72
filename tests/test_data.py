"""Dataset readers (``tl_mdl.data``): truncated IDX files are clear errors."""

from __future__ import annotations

import gzip

import pytest

from tl_mdl.data import _read_idx


# ----------------------------------------------------------------------------------- IDX files
@pytest.mark.parametrize("data", [b"\x00\x00\x08\x03\x00\x00", b"\x00\x00\x08\x01"])
def test_idx_truncated_header_is_a_clear_error(tmp_path, data):
    (tmp_path / "x-idx3-ubyte").write_bytes(data)
    with pytest.raises(ValueError, match="truncated"):
        _read_idx(tmp_path / "x-idx3-ubyte")


def test_idx_truncated_gzip_is_a_clear_error(tmp_path):
    blob = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x04abcd")
    (tmp_path / "x.gz").write_bytes(blob[:-6])
    with pytest.raises(ValueError, match="x.gz"):
        _read_idx(tmp_path / "x.gz")


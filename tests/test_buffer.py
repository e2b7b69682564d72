"""The one shuffle buffer and the BatchSource protocol: every source seeks to batch ``b`` of a
pass and serves exactly the batches it would have served from the start, reading only the
rows the buffer holds there; train_sae resumes from shards through the seek, bitwise."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tl_mdl.activations.shards as shards_module
from tl_mdl import ActivationStore, SAEConfig, ShardedActivations, save_activations, train_sae
from tl_mdl.activations.buffer import BatchSource, Block, ShuffleBuffer, TensorBatches


def write_shards(folder: Path, sizes: list[int], d: int = 3) -> torch.Tensor:
    """Shards whose rows are ``[i, i, …]`` for row number ``i``: a batch names its rows."""
    rows = torch.arange(sum(sizes), dtype=torch.float32)[:, None].repeat(1, d)
    at = 0
    for i, n in enumerate(sizes):
        save_activations(rows[at : at + n], folder / f"s{i}.safetensors")
        at += n
    return rows


class CountReads:
    """Counts the rows ShardedActivations reads from disk."""

    def __init__(self, monkeypatch):
        self.rows = 0
        real = shards_module.read_rows

        def counted(info, a, b, fh=None):
            self.rows += b - a
            return real(info, a, b, fh)

        monkeypatch.setattr(shards_module, "read_rows", counted)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4).filter(lambda s: sum(s) > 0),
    batch=st.integers(1, 12),
    extra=st.integers(0, 30),
    chunk=st.integers(1, 15),
    seed=st.integers(0, 3),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
)
def test_every_seek_serves_the_rest_of_the_pass(sizes, batch, extra, chunk, seed, shuffle,
                                                drop_last):
    with tempfile.TemporaryDirectory() as d:
        write_shards(Path(d), sizes)
        if drop_last and sum(sizes) < batch:
            return
        acts = ShardedActivations(d, batch_size=batch, buffer_size=batch + extra, seed=seed,
                                  shuffle=shuffle, drop_last=drop_last, chunk_rows=chunk)
        assert isinstance(acts, BatchSource)
        for epoch in (0, 1):
            whole = list(acts.epoch_batches(epoch))
            assert len(whole) == len(acts)
            for start in range(len(whole) + 2):
                rest = list(acts.epoch_batches(epoch, start=start))
                assert len(rest) == max(len(whole) - start, 0)
                assert all(torch.equal(a, b) for a, b in zip(whole[start:], rest, strict=True))


def test_a_seek_reads_what_the_buffer_holds_not_the_batches_before(tmp_path, monkeypatch):
    write_shards(tmp_path, [7000, 5000, 8000])
    acts = ShardedActivations(tmp_path, batch_size=100, buffer_size=1000, chunk_rows=125)
    reads = CountReads(monkeypatch)
    whole = list(acts.epoch_batches(0))
    assert reads.rows == 20_000 and len(whole) == 200
    reads.rows = 0
    rest = list(acts.epoch_batches(0, start=150))
    assert all(torch.equal(a, b) for a, b in zip(whole[150:], rest, strict=True))
    reads.rows = 0
    next(iter(acts.epoch_batches(0, start=150)))
    # re-reading the 150 batches before it would read >= 15,000 rows; the seek reads the
    # blocks holding the buffer's rows, a few buffers' worth whatever the start
    assert reads.rows <= 6 * acts.buffer_size, reads.rows


def test_the_buffer_serves_each_row_once_and_seeks_in_the_drain():
    rows = torch.arange(50.0)[:, None]
    blocks = [Block(a, 10, lambda a=a: rows[a : a + 10]) for a in range(0, 50, 10)]
    buf = ShuffleBuffer(16, 4, drop_last=False)
    whole = list(buf.batches(blocks, torch.Generator().manual_seed(0)))
    assert torch.equal(torch.cat(whole).sort(0).values, rows)
    assert [b.shape[0] for b in whole] == [4] * 12 + [2]
    last = list(buf.batches(blocks, torch.Generator().manual_seed(0), start=11))
    assert all(torch.equal(a, b) for a, b in zip(whole[11:], last, strict=True))


def test_tensor_batches_seek_and_count():
    x = torch.arange(10.0)[:, None]
    src = TensorBatches(x, 4, lambda e: e, drop_last=False)
    assert len(src) == 3 and len(TensorBatches(x, 4, lambda e: e)) == 2
    whole = list(src.epoch_batches(2))
    assert torch.equal(torch.cat(whole).sort(0).values, x)
    assert torch.equal(torch.cat(list(src.epoch_batches(2, start=1))), torch.cat(whole[1:]))
    with pytest.raises(ValueError, match="start must be a non-negative int"):
        src.epoch_batches(0, start=-1)


def test_store_streaming_from_its_cache_seeks(model, tokens, tmp_path):
    for shuffle in (True, False):
        store = ActivationStore(model, "blocks.0.hook_resid_pre", tokens, batch_size=5,
                                model_batch_size=1, buffer_size=12, cache_dir=tmp_path,
                                shuffle=shuffle, progress=False)
        whole = list(store.epoch_batches(1))
        assert len(whole) == len(store)
        assert torch.equal(torch.cat(whole).sort(0).values, store.activations().sort(0).values)
        for start in range(len(whole) + 1):
            rest = list(store.epoch_batches(1, start=start))
            assert all(torch.equal(a, b) for a, b in zip(whole[start:], rest, strict=True))


def test_training_resumes_from_shards_by_seeking_bitwise(tmp_path, monkeypatch):
    """A checkpoint in the middle of a pass resumes to the uninterrupted weights bit for bit,
    and the resume reads the buffer's rows, not the batches before the checkpoint."""
    gen = torch.Generator().manual_seed(0)
    save_activations(torch.randn(3000, 8, generator=gen), tmp_path / "a.safetensors")
    save_activations(torch.randn(3000, 8, generator=gen), tmp_path / "b.safetensors")
    acts = ShardedActivations(tmp_path, batch_size=32, buffer_size=256, chunk_rows=32, seed=2)
    cfg = SAEConfig(d_in=8, d_sae=16)
    kw = dict(steps=170, batch_size=32, lr_decay_frac=0.0, progress=False)
    ck = tmp_path / "ck"
    train_sae(acts, cfg, "l1", checkpoint_dir=ck, checkpoint_every=150, **{**kw, "steps": 150})
    reads = CountReads(monkeypatch)
    resumed = train_sae(acts, cfg, "l1", checkpoint_dir=ck, checkpoint_every=150, **kw)
    resume_reads = reads.rows
    whole = train_sae(acts, cfg, "l1", **kw)
    for name, p in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], p), name
    # 20 batches served after the seek (640 rows) plus the buffer's rows at batch 150: far
    # from the 150 · 32 = 4,800 rows a re-reading resume reads before its first step
    assert resume_reads < 150 * 32 / 2, resume_reads

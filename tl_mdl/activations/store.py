"""Activation store: harvest several hook points of a model in one forward pass per batch,
keep them in memory or in safetensors shards on disk, and serve shuffled ``[B, d_in]`` batches.

Layout of ``cache_dir`` (reused when the tokens, hooks, dtype and model weights match, and
no hook is attached to the model)::

    cache_dir/meta.json                            fingerprint, hooks, shard sizes
    cache_dir/<hook_name>/shard_00000.safetensors   one tensor "activations" [rows, d_in]

Each hook's folder loads with ``tl_mdl.load_activations(cache_dir / hook_name)``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_mdl._io import atomic_write
from tl_mdl.activations.buffer import (
    Block,
    ShuffleBuffer,
    TensorBatches,
    check_epoch,
    in_order_batches,
)
from tl_mdl.activations.harvest import (
    _check_finite,
    as_token_windows,
    harvest_batch,
    model_fingerprint,
    model_hooked,
    stop_layer_for,
)
from tl_mdl.activations.io import load_activations, save_activations
from tl_mdl.hooks.names import check_hook_name, expected_hook_shape

META_FILENAME = "meta.json"


def _safe_dirname(hook_name: str) -> str:
    return hook_name.replace(os.sep, "_")


class _HookView:
    """Iterable of shuffled ``[batch_size, d_in]`` batches of one hook of a store."""

    def __init__(self, store: ActivationStore, hook_name: str):
        self.store, self.hook_name = store, hook_name

    def __iter__(self) -> Iterator[Tensor]:
        return self.store._batches(self.hook_name)

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[Tensor]:
        """The batches of pass number ``epoch`` (see :meth:`ActivationStore.epoch_batches`)."""
        return self.store._batches(self.hook_name, epoch, start)

    def __len__(self) -> int:
        return self.store._n_batches()

    @property
    def d_in(self) -> int:
        return self.store.d_in(self.hook_name)

    def activations(self) -> Tensor:
        return self.store.activations(self.hook_name)

    def __repr__(self) -> str:
        return f"ActivationStore[{self.hook_name!r}]"


class ActivationStore:
    """Harvest activations at ``hook_names`` of ``model`` on ``tokens`` and serve them.

    With one hook name the store itself iterates over shuffled ``[batch_size, d_in]`` tensors
    (what ``train_sae`` / ``sweep`` accept); with several, ``store[hook_name]`` is that
    iterable for one hook. ``store.activations(hook_name)`` is all of them, ``[N, d_in]`` with
    ``N = n_windows · context_size``, in token order. Every pass over the data reshuffles.

    Args:
        model: a ``HookedTransformer``.
        hook_names: one hook name or a list; all are harvested in the same forward pass, which
            stops after the last block any of them needs.
        tokens: ``[n_seq, seq_len]`` (or a 1-D stream) of token ids; rows are cut into
            windows of ``context_size`` (``<= model.cfg.n_ctx``).
        batch_size: rows per served batch.
        context_size: tokens per forward sequence (default: ``seq_len``).
        model_batch_size: sequences per forward pass.
        buffer_size: rows in the shuffling buffer (default: everything in memory; 64
            batches when streaming from ``cache_dir``). Half the buffer is served per refill.
        shuffle, seed: shuffle rows (and shard order); pass ``e`` of a hook is shuffled from
            ``(seed, hook_name, e)`` alone, so it does not depend on other passes.
        drop_last: drop the final partial batch of each pass.
        cache_dir: folder for safetensors shards; reused when tokens, hooks, dtype and the
            model's weights (hashed byte for byte) match. Never reused while hooks are
            attached to the model (their effect cannot be fingerprinted): then it is rewritten.
            One ``cache_dir`` per store: a store whose cache another store rewrote raises.
        dtype, device: storage dtype (default: the model's) and device (default ``"cpu"``).
        progress: show a tqdm bar while harvesting.
    """

    def __init__(
        self,
        model: Any,
        hook_names: str | list[str],
        tokens: Int[Tensor, "n_seq seq_len"],
        *,
        batch_size: int = 4096,
        context_size: int | None = None,
        model_batch_size: int = 8,
        buffer_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        cache_dir: str | os.PathLike | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ):
        names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
        if not names:
            raise ValueError("hook_names is empty; pass at least one hook name")
        if len(set(names)) != len(names):
            raise ValueError(f"hook_names has duplicates: {names}")
        for h in names:
            check_hook_name(model, h)
            if expected_hook_shape(model, h) == ():
                raise ValueError(
                    f"hook {h!r} carries attention patterns [batch, head, q, k], not [..., d] "
                    "activations; choose residual, hook_z, mlp or *_out hooks"
                )
        for name, v in (("batch_size", batch_size), ("model_batch_size", model_batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.model = model
        self.hook_names = names
        self.tokens = as_token_windows(tokens, context_size, model.cfg.n_ctx)
        if self.tokens.shape[0] == 0:
            raise ValueError(
                f"tokens hold no sequences (shape {tuple(tokens.shape)}); the store would have "
                "no activations to serve"
            )
        self.context_size = self.tokens.shape[1]
        self.batch_size = batch_size
        self.model_batch_size = model_batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.buffer_size = buffer_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.progress = progress
        self.stop_at_layer = stop_layer_for(model, names)
        self._memory: dict[str, list[Tensor]] | None = None
        self._shard_rows: list[int] | None = None
        self._d_in: dict[str, int] = {}
        self._full: dict[str, Tensor] = {}  # in memory: each hook's [N, d_in]
        self._fingerprint: str | None = None  # of the disk cache this store serves
        self._passes: dict[str, int] = {}  # passes started per hook (for plain iteration)

    # ----------------------------------------------------------------- harvesting
    @property
    def n_tokens(self) -> int:
        """Number of activation rows per hook (``n_windows · context_size``)."""
        return self.tokens.numel()

    def _model_batches(self) -> Iterator[Tensor]:
        dev = getattr(self.model.cfg, "device", None) or "cpu"
        for i in range(0, self.tokens.shape[0], self.model_batch_size):
            yield self.tokens[i : i + self.model_batch_size].to(dev)

    def _store(self, act: Tensor) -> Tensor:
        return act.to(device=self.device, dtype=self.dtype or act.dtype)

    def _harvest_iter(self) -> Iterator[dict[str, Tensor]]:
        n = -(-self.tokens.shape[0] // self.model_batch_size)
        bar = tqdm(self._model_batches(), total=n, disable=not self.progress,
                   desc=f"harvest {len(self.hook_names)} hook(s)", leave=False)
        for i, toks in enumerate(bar):
            acts = harvest_batch(self.model, toks, self.hook_names, self.stop_at_layer)
            stored = {}
            for h, a in acts.items():
                _check_finite(a, h, i, self.model_batch_size)
                stored[h] = self._store(a)
                if stored[h].dtype != a.dtype and not torch.isfinite(stored[h]).all():
                    raise FloatingPointError(
                        f"activations at hook {h!r} (model batch {i}, max |x| = "
                        f"{float(a.abs().max()):.4g}) overflow the storage dtype "
                        f"{stored[h].dtype}; pass a wider dtype= (e.g. torch.float32)"
                    )
            yield stored

    def fingerprint(self) -> str:
        """Hash of what the cached activations depend on: tokens, windows, hooks, storage
        dtype and the model (config, and every parameter and buffer byte for byte, with its
        dtype)."""
        settings = [self.hook_names, self.context_size, self.model_batch_size, str(self.dtype)]
        return model_fingerprint(self.model, self.tokens, settings)

    def _meta_path(self) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / META_FILENAME

    def _shard_path(self, hook: str, i: int) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / _safe_dirname(hook) / f"shard_{i:05d}.safetensors"

    def _cached_fingerprint(self) -> str | None:
        try:
            return json.loads(self._meta_path().read_text()).get("fingerprint")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None

    def _check_cache_unchanged(self) -> None:
        """Raise if another store rewrote this store's ``cache_dir`` since it harvested."""
        if self._fingerprint is not None and self._cached_fingerprint() != self._fingerprint:
            raise RuntimeError(
                f"the activation cache in {str(self.cache_dir)!r} was rewritten (or removed) "
                "by another ActivationStore with other tokens, hooks or model after this store "
                "harvested it; give each store its own cache_dir"
            )

    def _cache_valid(self, fp: str) -> bool:
        meta_path = self._meta_path()
        if not meta_path.is_file():
            return False
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        if meta.get("fingerprint") != fp:
            return False
        rows = meta.get("shard_rows", [])
        ok = all(
            self._shard_path(h, i).is_file() for h in self.hook_names for i in range(len(rows))
        )
        if ok:
            self._shard_rows = rows
            self._d_in.update(meta.get("d_in", {}))
        return ok

    def harvest(self) -> ActivationStore:
        """Run the model over all tokens once (unless already harvested, or a matching disk
        cache exists). Called lazily by iteration and :meth:`activations`."""
        if self._memory is not None or self._shard_rows is not None:
            return self
        if self.cache_dir is None:
            self._memory = self._harvest_to_memory()
            return self
        hooked = model_hooked(self.model)
        fp = self.fingerprint() + ("+hooked" if hooked else "")
        if not hooked and self._cache_valid(fp):
            self._fingerprint = fp
            return self
        if hooked:
            warnings.warn(
                "hooks are attached to the model, so the activation cache in "
                f"{str(self.cache_dir)!r} can be neither reused nor trusted later; "
                "harvesting afresh (remove the hooks to cache clean activations)",
                stacklevel=3,
            )
        meta_path = self._meta_path()
        if meta_path.exists():
            meta_path.unlink()  # stale: invalidate before rewriting shards
        for h in self.hook_names:  # shards of an earlier, longer harvest must not linger
            for old in self._shard_path(h, 0).parent.glob("shard_*.safetensors"):
                old.unlink()
        rows: list[int] = []
        for i, acts in enumerate(self._harvest_iter()):
            for h, a in acts.items():
                save_activations(a, self._shard_path(h, i))
                self._d_in[h] = a.shape[1]
            rows.append(next(iter(acts.values())).shape[0])
        meta = {"fingerprint": fp, "hook_names": self.hook_names, "shard_rows": rows,
                "d_in": self._d_in, "context_size": self.context_size,
                "n_tokens": self.n_tokens}
        text = json.dumps(meta, indent=2)
        atomic_write(meta_path, lambda p: Path(p).write_text(text))
        self._shard_rows = rows
        self._fingerprint = fp
        return self

    def _harvest_to_memory(self) -> dict[str, list[Tensor]]:
        """Every hook's activations in one preallocated ``[N, d_in]`` tensor (no second copy
        at the end), kept as per-forward chunks that are views of it."""
        full: dict[str, Tensor] = {}
        chunks: dict[str, list[Tensor]] = {h: [] for h in self.hook_names}
        at = 0
        for acts in self._harvest_iter():
            for h, a in acts.items():
                if h not in full:
                    full[h] = torch.empty(self.n_tokens, a.shape[1], dtype=a.dtype,
                                          device=a.device)
                    self._d_in[h] = a.shape[1]
                view = full[h][at : at + a.shape[0]]
                view.copy_(a)
                chunks[h].append(view)
            at += next(iter(acts.values())).shape[0]
        assert at == self.n_tokens
        self._full = full
        return chunks

    # ------------------------------------------------------------------- serving
    def _check_hook(self, hook: str) -> None:
        if hook not in self.hook_names:
            raise KeyError(
                f"hook {hook!r} was not harvested by this store; harvested: {self.hook_names}"
            )

    def d_in(self, hook_name: str | None = None) -> int:
        """Width of the (flattened) activations at ``hook_name``."""
        hook = self._only_hook() if hook_name is None else hook_name
        self._check_hook(hook)
        self.harvest()
        return int(self._d_in[hook])

    def _n_chunks(self) -> int:
        self.harvest()
        if self._memory is not None:
            return len(next(iter(self._memory.values())))
        assert self._shard_rows is not None
        return len(self._shard_rows)

    def _chunk(self, hook: str, i: int) -> Tensor:
        if self._memory is not None:
            return self._memory[hook][i]
        self._check_cache_unchanged()
        return load_activations(self._shard_path(hook, i)).to(self.device)

    def activations(self, hook_name: str | None = None) -> Float[Tensor, "n d_in"]:
        """All harvested activations of ``hook_name`` as ``[N, d_in]``, in token order. For
        an in-memory store this is the store's own tensor (no copy): do not modify it."""
        hook = self._only_hook() if hook_name is None else hook_name
        self._check_hook(hook)
        n = self._n_chunks()
        if self._memory is not None:
            return self._full[hook]
        parts = [self._chunk(hook, i) for i in range(n)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _n_batches(self) -> int:
        n = self.n_tokens
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[Tensor]:
        """The batches of pass number ``epoch`` (0, 1, …) over the store's one hook: the same
        batches every time it is asked for, whatever was iterated before (``train_sae`` uses
        it to resume a run exactly), from batch number ``start`` on (a seek: earlier batches
        are not read). Plain iteration serves passes 0, 1, 2, … in turn."""
        return self._batches(self._only_hook(), epoch, start)

    def _pass_seed(self, hook: str, epoch: int) -> int:
        key = f"{self.seed}/{hook}/{epoch}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1

    def _batches(self, hook: str, epoch: int | None = None, start: int = 0
                 ) -> Iterator[Tensor]:
        self._check_hook(hook)
        if epoch is None:
            epoch = self._passes.get(hook, 0)
            self._passes[hook] = epoch + 1
        check_epoch(epoch, start)
        return self._pass(hook, epoch, start)

    def _pass(self, hook: str, epoch: int, start: int) -> Iterator[Tensor]:
        n_chunks = self._n_chunks()  # harvests on the first batch asked for
        if self._memory is not None and self.buffer_size is None:
            # everything is in memory: one permutation, each batch gathered from the store's
            # tensor (no shuffled copy of the whole data)
            source = TensorBatches(self._full[hook], self.batch_size,
                                   lambda e: self._pass_seed(hook, e), shuffle=self.shuffle,
                                   drop_last=self.drop_last)
            yield from source.epoch_batches(epoch, start)
            return
        gen = torch.Generator().manual_seed(self._pass_seed(hook, epoch))
        blocks = self._blocks(hook, n_chunks, gen)
        if not self.shuffle:
            yield from in_order_batches(blocks, self.batch_size, drop_last=self.drop_last,
                                        start=start)
            return
        cap = 64 * self.batch_size if self.buffer_size is None else self.buffer_size
        buf = ShuffleBuffer(max(cap, self.batch_size), self.batch_size, drop_last=self.drop_last)
        yield from buf.batches(blocks, gen, start)

    def _blocks(self, hook: str, n_chunks: int, gen: torch.Generator) -> Iterator[Block]:
        """The store's chunks (one per forward pass) as blocks, in a random order."""
        if self._memory is not None:
            rows = [c.shape[0] for c in self._memory[hook]]
        else:
            assert self._shard_rows is not None
            rows = list(self._shard_rows)
        first = [0, *itertools.accumulate(rows)]
        order = torch.randperm(n_chunks, generator=gen).tolist() if self.shuffle else range(
            n_chunks)
        for i in order:
            yield Block(first[i], rows[i], functools.partial(self._chunk, hook, i))

    def _only_hook(self) -> str:
        if len(self.hook_names) != 1:
            raise TypeError(
                f"this store harvests {len(self.hook_names)} hooks {self.hook_names}; pick one "
                "with store[hook_name] (an iterable of batches) or store.activations(hook_name)"
            )
        return self.hook_names[0]

    def __iter__(self) -> Iterator[Tensor]:
        return self._batches(self._only_hook())

    def __len__(self) -> int:
        self._only_hook()
        return self._n_batches()

    def __getitem__(self, hook_name: str) -> _HookView:
        self._check_hook(hook_name)
        return _HookView(self, hook_name)

    def __repr__(self) -> str:
        where = f", cache_dir={str(self.cache_dir)!r}" if self.cache_dir else ""
        return (
            f"ActivationStore(hooks={self.hook_names}, n_tokens={self.n_tokens}, "
            f"batch_size={self.batch_size}{where})"
        )

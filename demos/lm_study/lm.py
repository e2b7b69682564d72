"""Stages 0-2: the token stream, the small SiLU-``GatedMLP`` LM (a nanoGPT-style loop with
checkpoints) and its conversion to a bilinear MLP with ``anneal_to_bilinear`` (against a SiLU
control trained as long)."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig

from lm_study import corpus
from lm_study.stages import write_csv
from tl_mdl import BilinearMLP, anneal_to_bilinear, to_bilinear
from tl_mdl.metrics import ce_loss
from tl_mdl.models import load_model, save_model


@torch.no_grad()
def lm_loss(model: HookedTransformer, tokens: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over ``tokens [n, pos]``."""
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        b = tokens[i : i + batch_size]
        n = b[:, 1:].numel()  # targets in this batch: ce_loss is their mean
        total += ce_loss(model(b, return_type="logits"), b) * n
        count += n
    return total / count


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def prepare_tokens(args, out: Path, model: HookedTransformer | None) -> tuple[torch.Tensor, Any,
                                                                              str]:
    """The token stream (cached in ``tokens.safetensors``) and a decoder ``ids -> str``."""
    path = out / "tokens.safetensors"
    tok_path = out / "tokenizer.json"
    if args.tokens:
        stream = corpus.load_token_file(args.tokens)
        source = f"tokens:{Path(args.tokens).name}"
        tok = corpus.load_tokenizer(tok_path) if tok_path.is_file() else None
        if model is not None and model.tokenizer is not None:
            tok = model.tokenizer
        return stream, tok, source
    if path.is_file() and (model is not None or tok_path.is_file()):
        meta_src = json.loads((out / "data.json").read_text())["source"]
        stream = load_file(str(path))["tokens"]
        tok = model.tokenizer if model is not None else corpus.load_tokenizer(tok_path)
        return stream, tok, meta_src
    docs, source = corpus.load_documents(args.corpus, args.text)
    if args.max_docs:
        docs = docs[: args.max_docs]
    print(f"   corpus {source}: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.2f} M chars")
    if model is not None:
        tok = model.tokenizer
        stream = corpus.encode_with_hf(tok, docs)
    else:
        tok = corpus.train_tokenizer(docs, args.vocab_size, tok_path)
        stream = corpus.encode_stream(tok, docs)
    corpus.save_tokens(stream, path)
    (out / "data.json").write_text(json.dumps(
        {"source": source, "n_docs": len(docs), "n_chars": sum(map(len, docs)),
         "n_tokens": int(stream.numel())}, indent=2))
    return stream, tok, source


def decode_fn(tok) -> Any:
    if tok is None:
        return lambda ids: " ".join(f"#{i}" for i in ids)
    return lambda ids: tok.decode([int(i) for i in ids])


def lm_config(args, d_vocab: int) -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads,
        d_head=args.d_model // args.n_heads, d_mlp=args.d_mlp, n_ctx=args.n_ctx,
        d_vocab=d_vocab, act_fn="silu", gated_mlp=True, normalization_type="LN",
        positional_embedding_type="standard", seed=args.seed, default_prepend_bos=False,
    )


def _save_opt(opt: torch.optim.Optimizer, path: Path) -> None:
    tensors = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"{idx}.{k}"] = torch.as_tensor(v).detach().clone().contiguous()
    save_file(tensors, str(path))


def _load_opt(opt: torch.optim.Optimizer, path: Path) -> None:
    tensors = load_file(str(path))
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def train_lm(args, out: Path, train: torch.Tensor, held: torch.Tensor, d_vocab: int,
             ) -> HookedTransformer:
    """nanoGPT-style loop: AdamW, warmup + cosine LR, random windows; checkpoints to
    ``lm_ckpt/`` every 100 steps (model + Adam moments + step, safetensors/json)."""
    ckpt = out / "lm_ckpt"
    torch.manual_seed(args.seed)
    model = HookedTransformer(lm_config(args, d_vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lm_lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    start, history = 0, []
    if (ckpt / "state.json").is_file():
        state = json.loads((ckpt / "state.json").read_text())
        model = load_model(ckpt)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lm_lr, betas=(0.9, 0.95),
                                weight_decay=0.1)
        _load_opt(opt, ckpt / "opt.safetensors")
        start, history = state["step"], state["history"]
        print(f"   resuming LM training at step {start}")
    warmup = max(1, args.lm_steps // 20)
    model.train()
    bar = tqdm(range(start, args.lm_steps), desc="train LM", disable=args.no_progress,
               initial=start, total=args.lm_steps)
    for step in bar:
        g = torch.Generator().manual_seed(args.seed * 7919 + step)
        batch = train[torch.randint(0, train.shape[0], (args.lm_batch,), generator=g)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lm_steps, args.lm_lr, warmup)
        loss = model(batch, return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append({"step": step, "loss": loss.item()})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
        if (step + 1) % 100 == 0 and step + 1 < args.lm_steps:
            model.eval()
            history[-1]["held_out"] = lm_loss(model, held)
            model.train()
            save_model(model, ckpt)
            _save_opt(opt, ckpt / "opt.safetensors")
            (ckpt / "state.json").write_text(json.dumps({"step": step + 1, "history": history}))
    model.eval()
    history[-1]["held_out"] = lm_loss(model, held)
    write_csv(out / "lm_train_log.csv", history, ["step", "loss", "held_out"])
    save_model(model, out / "model_silu")
    shutil.rmtree(ckpt, ignore_errors=True)
    return model


def finetune_silu(args, model: HookedTransformer, train: torch.Tensor) -> HookedTransformer:
    """Control for the annealing run: the same number of steps, batch size, learning rate and
    batches (``anneal_to_bilinear`` draws them from ``Generator(seed)``), activation kept SiLU,
    so that "bilinear vs SiLU" is not confounded by the extra training."""
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.anneal_lr)
    model.train()
    for _ in tqdm(range(args.anneal_steps), desc="SiLU control", disable=args.no_progress):
        batch = train[torch.randint(0, train.shape[0], (args.anneal_batch,), generator=gen)]
        loss = model(batch, return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model


def convert_bilinear(args, out: Path, silu: HookedTransformer, train: torch.Tensor,
                     held: torch.Tensor) -> dict:
    """Loss of the SiLU model, of a plain swap (SiLU → identity, no fine-tune), and after
    ``anneal_to_bilinear``; saves ``model_bilinear/``, ``anneal_log.csv``."""
    loss_silu = lm_loss(silu, held)
    plain = copy.deepcopy(silu)
    to_bilinear(plain)
    loss_plain = lm_loss(plain, held)
    del plain
    control = finetune_silu(args, copy.deepcopy(silu), train)
    loss_control = lm_loss(control, held)
    del control
    model = copy.deepcopy(silu)
    res = anneal_to_bilinear(model, train, args.anneal_steps, lr=args.anneal_lr,
                             batch_size=args.anneal_batch, seed=args.seed,
                             progress=not args.no_progress)
    assert all(isinstance(b.mlp, BilinearMLP) for b in model.blocks)
    loss_bil = lm_loss(model, held)
    save_model(model, out / "model_bilinear")
    write_csv(out / "anneal_log.csv", res.history, ["step", "beta", "loss", "ce", "kl"])
    info = {
        "loss_silu": loss_silu, "loss_swap_no_finetune": loss_plain,
        "loss_silu_finetuned": loss_control, "loss_bilinear": loss_bil,
        "delta_nats": loss_bil - loss_silu, "relative": (loss_bil - loss_silu) / loss_silu,
        "delta_vs_control_nats": loss_bil - loss_control,
        "relative_vs_control": (loss_bil - loss_control) / loss_control,
        "anneal_steps": args.anneal_steps,
        "held_out_tokens": int(held[:, 1:].numel()),
    }
    (out / "bilinear.json").write_text(json.dumps(info, indent=2))
    return info

"""Reliability: interrupted / crashed / diverging training, NaN sources named, the bad-input
rows not covered elsewhere, streaming shards, and no hooks left behind by failures."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from builders import hooked_transformer_classes, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import tl_mdl
from tl_mdl import (
    SAE,
    ActivationStore,
    SAEConfig,
    ShardedActivations,
    ablate_eigen,
    attach_sae,
    description_length,
    eigendecompose,
    evaluate,
    save_activations,
    to_bilinear,
    train_sae,
)
from tl_mdl.training import register_objective
from tl_mdl.training.objectives import OBJECTIVES
from tl_mdl.training.trainer import STATE_TENSORS, load_checkpoint

HookedTransformer, HookedTransformerConfig = hooked_transformer_classes()

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

STEPS = 200
CFG = dict(d_in=12, d_sae=24)
TRAIN = dict(steps=STEPS, batch_size=64, lr=3e-3, seed=7, progress=False)


def make_data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(24, 12, generator=g), dim=-1)
    active = torch.rand(1024, 24, generator=g) < 3 / 24
    return (active * (torch.rand(1024, 24, generator=g) * 2 + 0.5)) @ dirs


def _train_child(ck: str, sleep: float, every: int, report: str) -> None:
    """A training process (forked: no re-import), slowed so that it can be interrupted.
    Every objective calls ``SAE.decode`` once per step (the mdl objective has its own JumpReLU
    encoder pass and never calls ``encode``), so the sleep goes there."""
    orig = SAE.decode

    def slow(self, *args, **kwargs):
        time.sleep(sleep)
        return orig(self, *args, **kwargs)

    SAE.decode = slow
    try:
        train_sae(make_data(), SAEConfig(**CFG), "mdl", checkpoint_dir=ck,
                  checkpoint_every=every, **TRAIN)
        Path(report).write_text("FINISHED")
        code = 0
    except KeyboardInterrupt as e:
        Path(report).write_text(f"KeyboardInterrupt: {e}")
        code = 3
    os._exit(code)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    """Three training processes run together: stopped by SIGINT, by SIGTERM, and killed
    (SIGKILL: a crash, possibly in the middle of writing a checkpoint every step). Each gets
    its signal 0.2 s after its first checkpoint appears."""
    root = tmp_path_factory.mktemp("interrupt")
    ctx = mp.get_context("fork")
    plan = {"SIGINT": (0.02, 5), "SIGTERM": (0.02, 5), "SIGKILL": (0.01, 1)}
    procs = {}
    for name, (sleep, every) in plan.items():
        ck, report = root / name, root / f"{name}.txt"
        proc = ctx.Process(target=_train_child, args=(str(ck), sleep, every, str(report)))
        proc.start()
        procs[name] = (ck, report, proc)
    pending, t0 = dict(procs), time.monotonic()
    while pending:
        for name, (ck, _, proc) in list(pending.items()):
            if (ck / STATE_TENSORS).is_file():
                time.sleep(0.2)
                os.kill(proc.pid, getattr(signal, name))
                del pending[name]
            elif not proc.is_alive() or time.monotonic() - t0 > 120:
                proc.kill()
                raise AssertionError(f"{name}: no checkpoint (exit code {proc.exitcode})")
        time.sleep(0.01)
    out = {}
    for name, (ck, report, proc) in procs.items():
        proc.join(60)
        text = report.read_text() if report.is_file() else ""
        out[name] = (ck, proc.exitcode, text)
    return out


@pytest.fixture(scope="module")
def uninterrupted() -> SAE:
    return train_sae(make_data(), SAEConfig(**CFG), "mdl", **TRAIN)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_training_resumes_to_the_same_weights(interrupted, uninterrupted, sig):
    ck, code, report = interrupted[sig]
    assert "FINISHED" not in report, "the run ended before the signal"
    if sig == "SIGKILL":
        assert code == -signal.SIGKILL
    else:  # stopped at a step boundary with a fresh checkpoint
        assert code == 3 and "training interrupted at step" in report
    meta, tensors = load_checkpoint(ck)  # intact, whatever the moment of the signal
    assert 0 < meta["step"] < STEPS
    assert all(torch.isfinite(t).all() for t in tensors.values())
    resumed = train_sae(make_data(), SAEConfig(**CFG), "mdl", checkpoint_dir=ck,
                        checkpoint_every=5, **TRAIN)
    for k, v in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-6, atol=1e-6)
    assert load_checkpoint(ck)[0]["step"] == STEPS


def test_checkpoint_json_and_tensors_cannot_disagree(tmp_path, uninterrupted):
    """The step lives inside the safetensors file: a stale train_state.json (a crash between
    the two writes) does not pair old metadata with new weights."""
    ck = tmp_path / "ck"
    train_sae(make_data(), SAEConfig(**CFG), "mdl", checkpoint_dir=ck, checkpoint_every=5,
              **{**TRAIN, "steps": 10})
    (ck / "train_state.json").write_text(json.dumps({"step": 5}))
    assert load_checkpoint(ck)[0]["step"] == 10
    (ck / STATE_TENSORS).write_bytes((ck / STATE_TENSORS).read_bytes()[:100])
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(ck)


def test_diverging_training_stops_with_checkpoint_intact(tmp_path):
    ck = tmp_path / "ck"
    with pytest.raises(FloatingPointError, match=r"at step \d+") as info:
        train_sae(make_data(), SAEConfig(**CFG), "mdl", checkpoint_dir=ck, checkpoint_every=1,
                  **{**TRAIN, "lr": 1e30})
    assert "checkpoint" in str(info.value)
    meta, tensors = load_checkpoint(ck)
    assert meta["step"] >= 1
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_nan_gradients_stop_before_the_update(tmp_path):
    def nan_grad(sae, x, latents, x_hat, sparsity, tolerance):
        loss = (x_hat.sum() * 0).abs().sqrt()  # value 0, gradient 0 · ∞ = NaN
        return loss, {}

    register_objective("_nan_grad", nan_grad)
    try:
        with pytest.raises(FloatingPointError, match="gradients of .* at step 0"):
            train_sae(make_data(), SAEConfig(**CFG), "_nan_grad", checkpoint_dir=tmp_path,
                      **{**TRAIN, "steps": 3})
    finally:
        OBJECTIVES.pop("_nan_grad")
    assert not (tmp_path / STATE_TENSORS).exists()  # nothing written, not even step 0


def test_nan_in_iterable_batch_names_the_step():
    data = make_data()
    batches = [data[i : i + 64].clone() for i in range(0, 512, 64)]
    batches[3][10, 2] = float("inf")
    with pytest.raises(FloatingPointError, match="step 3 .*row 10"):
        train_sae(batches, SAEConfig(**CFG), "l1", steps=8, progress=False)


# -------------------------------------------------------------------- models
def test_nan_in_store_activations_names_hook_and_batch(tmp_path, tokens):
    model = tiny_model()
    bad_tokens = tokens.clone()
    bad_tokens[3, 5] = 7  # sequence 3 is in model batch 1 (model_batch_size=2)
    bad_tokens[:3][bad_tokens[:3] == 7] = 8
    with torch.no_grad():
        model.W_E[7] = float("nan")
    before = hook_count(model)
    store = ActivationStore(model, ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"],
                            bad_tokens, model_batch_size=2, cache_dir=tmp_path / "c",
                            progress=False)
    with pytest.raises(FloatingPointError, match=r"'blocks.0.hook_resid_pre'.*model batch 1"):
        store.harvest()
    assert hook_count(model) == before
    assert not (tmp_path / "c" / "meta.json").exists()  # a half-written cache is not valid


# ------------------------------------------------------------ bad-input table (the rest)
class _BrokenSAE(SAE):
    def encode_pre(self, x):
        raise RuntimeError("broken SAE")


def _gated_sae_lens_save(path: Path) -> Path:
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps(
        {"architecture": "gated", "d_in": 4, "d_sae": 8, "dtype": "float32",
         "device": "cpu", "metadata": {"hook_name": "blocks.0.hook_resid_pre"}}))
    save_file({"W_enc": torch.zeros(4, 8), "W_dec": torch.zeros(8, 4), "b_gate": torch.zeros(8),
               "b_mag": torch.zeros(8), "r_mag": torch.zeros(8), "b_dec": torch.zeros(4)},
              str(path / "sae_weights.safetensors"))
    return path


def _store_cache(tmp_path: Path, model, tokens) -> ActivationStore:
    kw = dict(cache_dir=tmp_path / "cache", batch_size=8, progress=False)
    ActivationStore(model, "blocks.0.hook_resid_pre", tokens, **kw).harvest()
    return ActivationStore(model, "blocks.0.hook_resid_pre", tokens, **kw)


def _corrupt_cache(tmp_path, model, tokens, content: bytes):
    store = _store_cache(tmp_path, model, tokens)
    shard = tmp_path / "cache" / "blocks.0.hook_resid_pre" / "shard_00000.safetensors"
    shard.write_bytes(content if content else shard.read_bytes()[:-7])
    return list(store)


def _foreign_shard(t: Path) -> ShardedActivations:
    save_file({"weights": torch.zeros(3, 3)}, str(t / "w.safetensors"))
    return ShardedActivations(t / "w.safetensors")


def _truncated_shard(t: Path) -> ShardedActivations:
    save_activations(torch.ones(64, 4), t / "a.safetensors")
    p = t / "a.safetensors"
    p.write_bytes(p.read_bytes()[:-8])
    return ShardedActivations(p)


def _bilinear_model():
    cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=12,
                                  d_vocab=20, n_ctx=8, act_fn="relu", dtype=torch.float64)
    return tl_mdl.bilinear_transformer(cfg, seed=0)


def _x(n=64, d=4):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0))


BAD_INPUTS = [
    # (id, fn(tmp_path, model, tokens), exception, message regex)
    ("store_unknown_hook", lambda t, m, tok: ActivationStore(m, "blocks.9.hook_resid_pre", tok),
     ValueError, r"blocks.9.hook_resid_pre.*n_layers=2"),
    ("store_no_tokens", lambda t, m, tok: ActivationStore(m, "blocks.0.hook_resid_pre",
                                                          tok[:0]), ValueError, "no sequences"),
    ("store_float_tokens", lambda t, m, tok: ActivationStore(m, "blocks.0.hook_resid_pre",
                                                             tok.float()), TypeError, "integer"),
    ("store_pattern_hook", lambda t, m, tok: ActivationStore(m, "blocks.0.attn.hook_pattern",
                                                             tok), ValueError, "attention"),
    ("store_bad_batch_size", lambda t, m, tok: ActivationStore(m, "blocks.0.hook_resid_pre",
                                                               tok, batch_size=0),
     ValueError, "batch_size"),
    ("store_unharvested_hook", lambda t, m, tok: ActivationStore(
        m, "blocks.0.hook_resid_pre", tok, progress=False)["blocks.1.hook_resid_pre"],
     KeyError, "not harvested"),
    ("cache_truncated_shard", lambda t, m, tok: _corrupt_cache(t, m, tok, b""), ValueError,
     "shard_00000.safetensors"),
    ("cache_foreign_shard", lambda t, m, tok: _corrupt_cache(t, m, tok, b"<html></html>" * 9),
     ValueError, "shard_00000.safetensors"),
    ("ce_unknown_hook", lambda t, m, tok: description_length(
        SAE(SAEConfig(d_in=16, d_sae=8)), torch.randn(48, 16), loss="ce", model=m,
        hook_name="blocks.5.hook_resid_pre", tokens=tok), ValueError, "blocks.5"),
    ("attach_unknown_hook", lambda t, m, tok: attach_sae(m, "blocks.0.hook_nope",
                                                         SAE(SAEConfig(d_in=16, d_sae=8))),
     ValueError, "hook_nope"),
    ("attach_dtype", lambda t, m, tok: attach_sae(
        m, "blocks.0.hook_resid_pre", SAE(SAEConfig(d_in=16, d_sae=8, dtype="float64"))),
     TypeError, "dtype"),
    ("sae_lens_gated_save", lambda t, m, tok: SAE.load(_gated_sae_lens_save(t / "g")),
     ValueError, "'gated' is not supported"),
    ("to_bilinear_attn_only", lambda t, m, tok: to_bilinear(tiny_model(attn_only=True)),
     TypeError, "attn_only=True"),
    ("eig_dirs_wrong_size", lambda t, m, tok: eigendecompose(
        _bilinear_model().blocks[0].mlp, torch.randn(3, 5, dtype=torch.float64)),
     ValueError, "d_out=8"),
    ("eig_basis_wrong_size", lambda t, m, tok: eigendecompose(
        _bilinear_model().blocks[0].mlp, torch.randn(3, 8, dtype=torch.float64),
        in_basis=torch.randn(5, 7, dtype=torch.float64)), ValueError, "d_in=8"),
    ("ablate_dirs_wrong_size", lambda t, m, tok: ablate_eigen(
        _bilinear_model(), 0, torch.randn(2, 9, dtype=torch.float64), 2),
     ValueError, "d_out=8"),
    ("train_int_acts", lambda t, m, tok: train_sae(torch.ones(64, 4, dtype=torch.long),
                                                   SAEConfig(d_in=4, d_sae=8), "l1", steps=1),
     TypeError, "floating"),
    ("train_int_batch", lambda t, m, tok: train_sae([torch.ones(8, 4, dtype=torch.int32)],
                                                    SAEConfig(d_in=4, d_sae=8), "l1", steps=1),
     TypeError, "step 0.*floating"),
    ("train_tolerance_0", lambda t, m, tok: train_sae(_x(), SAEConfig(d_in=4, d_sae=8),
                                                      tolerance=0), ValueError, "tolerance"),
    ("train_tolerance_1", lambda t, m, tok: train_sae(_x(), SAEConfig(d_in=4, d_sae=8),
                                                      tolerance=1.5), ValueError, "tolerance"),
    ("train_batch_size_0", lambda t, m, tok: train_sae(_x(), SAEConfig(d_in=4, d_sae=8),
                                                       batch_size=0), ValueError, "batch_size"),
    ("train_lr_nan", lambda t, m, tok: train_sae(_x(), SAEConfig(d_in=4, d_sae=8),
                                                 lr=float("nan")), ValueError, "lr"),
    ("train_steps_neg", lambda t, m, tok: train_sae(_x(), SAEConfig(d_in=4, d_sae=8), steps=-1),
     ValueError, "steps"),
    ("shards_empty", lambda t, m, tok: ShardedActivations(
        save_activations(torch.zeros(0, 4), t / "e.safetensors")), ValueError, "no rows"),
    ("shards_none", lambda t, m, tok: ShardedActivations([]), ValueError, "no activation"),
    ("shards_empty_folder", lambda t, m, tok: ShardedActivations(t), FileNotFoundError,
     "no \\*.safetensors"),
    ("shards_missing", lambda t, m, tok: ShardedActivations(t / "nope.safetensors"),
     FileNotFoundError, "nope.safetensors"),
    ("shards_foreign", lambda t, m, tok: _foreign_shard(t), ValueError, "no 'activations'"),
    ("shards_not_safetensors", lambda t, m, tok: ShardedActivations(
        _write(t / "x.safetensors", b"PK\x03\x04" * 10)), ValueError, "x.safetensors"),
    ("shards_truncated", lambda t, m, tok: _truncated_shard(t), ValueError, "truncated"),
    ("shards_d_in", lambda t, m, tok: ShardedActivations([
        save_activations(torch.ones(8, 4), t / "a.safetensors"),
        save_activations(torch.ones(8, 5), t / "b.safetensors")]), ValueError, "d_in"),
    ("shards_int", lambda t, m, tok: ShardedActivations(
        _int_shard(t / "i.safetensors")), ValueError, "dtype I64"),
    ("shards_buffer_small", lambda t, m, tok: ShardedActivations(
        save_activations(torch.ones(8, 4), t / "a.safetensors"), batch_size=8, buffer_size=4),
     ValueError, "buffer_size"),
]


def _write(p: Path, b: bytes) -> Path:
    p.write_bytes(b)
    return p


def _int_shard(p: Path) -> Path:
    save_file({"activations": torch.ones(4, 4, dtype=torch.int64)}, str(p))
    return p


@pytest.mark.parametrize("fn, exc, match", [b[1:] for b in BAD_INPUTS],
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_table(tmp_path, model, tokens, fn, exc, match):
    before = hook_count(model)
    with pytest.raises(exc, match=match):
        fn(tmp_path, model, tokens)
    assert hook_count(model) == before


# ------------------------------------------------------------------ streaming shards
@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5).filter(lambda s: sum(s) > 0),
    batch=st.integers(1, 16),
    extra=st.integers(0, 40),
    chunk=st.integers(1, 20),
    seed=st.integers(0, 3),
)
def test_sharded_activations_serve_each_row_once_per_epoch(sizes, batch, extra, chunk, seed):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        rows = torch.arange(sum(sizes), dtype=torch.float32)[:, None].repeat(1, 3)
        start = 0
        for i, n in enumerate(sizes):
            save_activations(rows[start : start + n], Path(d) / f"s{i}.safetensors")
            start += n
        acts = ShardedActivations(d, batch_size=batch, buffer_size=batch + extra, seed=seed,
                                  repeat=False, drop_last=False, chunk_rows=chunk)
        got = list(acts)
        assert len(got) == len(acts)
        assert all(b.shape[0] == batch for b in got[:-1])
        served = torch.cat(got)[:, 0].sort().values
        assert torch.equal(served, rows[:, 0])
        again = list(ShardedActivations(d, batch_size=batch, buffer_size=batch + extra,
                                        seed=seed, repeat=False, drop_last=False,
                                        chunk_rows=chunk))
        assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))


def test_sharded_activations_train_like_a_tensor_and_name_nan_rows(tmp_path):
    data = make_data()
    save_activations(data[:600], tmp_path / "a.safetensors")
    save_activations(data[600:], tmp_path / "b.safetensors")
    acts = ShardedActivations(tmp_path, batch_size=64, buffer_size=256, seed=1)
    assert (acts.n_rows, acts.d_in, len(acts)) == (1024, 12, 16)
    batches = iter(acts)
    for _ in range(40):  # repeats over epochs
        assert next(batches).shape == (64, 12)
    sae = train_sae(acts, SAEConfig(**CFG), "l1", steps=20, progress=False)
    assert all(torch.isfinite(p).all() for p in sae.parameters())
    bad = data[:100].clone()
    bad[42, 0] = float("nan")
    save_activations(bad, tmp_path / "c.safetensors")
    with pytest.raises(FloatingPointError, match=r"c.safetensors has NaN/Inf in row 42"):
        list(ShardedActivations(tmp_path / "c.safetensors", batch_size=10, buffer_size=40,
                                repeat=False))


def test_store_cache_streams_with_sharded_activations(tmp_path, model, tokens):
    store = ActivationStore(model, "blocks.0.hook_resid_pre", tokens, model_batch_size=1,
                            cache_dir=tmp_path, progress=False)
    full = store.activations()
    acts = ShardedActivations(tmp_path / "blocks.0.hook_resid_pre", batch_size=8,
                              buffer_size=16, shuffle=False, repeat=False, drop_last=False)
    torch.testing.assert_close(torch.cat(list(acts)), full, rtol=0, atol=0)


# ------------------------------------------------------------------- hooks never leak
def hook_count(model) -> int:
    """Every hook on every module (HookPoint bookkeeping and raw torch hooks), without a
    bridge's own wiring (the capture hooks a TransformerBridge keeps on what it wraps)."""
    from tl_mdl._tl import user_forward_hooks

    n = 0
    for mod in model.modules():
        n += len(user_forward_hooks(mod)) + len(mod._backward_hooks)
        n += len(getattr(mod, "fwd_hooks", [])) + len(getattr(mod, "bwd_hooks", []))
    return n


def _state(model) -> tuple[int, list[str], int]:
    return hook_count(model), sorted(model.hook_dict), len(list(model.modules()))


HOOK = "blocks.0.hook_resid_pre"


def _raise_inside_attach(model, tokens):
    with attach_sae(model, HOOK, SAE(SAEConfig(d_in=16, d_sae=8))):
        raise RuntimeError("user code failed")


def _broken_sae_forward(model, tokens):
    with attach_sae(model, HOOK, _BrokenSAE(SAEConfig(d_in=16, d_sae=8))):
        model(tokens)


def _run_with_hooks_failing(model, tokens):
    def boom(act, hook):
        raise RuntimeError("hook failed")

    with attach_sae(model, HOOK, SAE(SAEConfig(d_in=16, d_sae=8)), mode="observe"):
        model.run_with_hooks(tokens, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", boom)])


def _run_with_hooks_broken_sae(model, tokens):
    with attach_sae(model, HOOK, _BrokenSAE(SAEConfig(d_in=16, d_sae=8))):
        model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda a, hook: a)])


def _evaluate_failing(model, tokens):
    evaluate(model, {HOOK: _BrokenSAE(SAEConfig(d_in=16, d_sae=8))}, tokens)


def _dl_ce_failing(model, tokens):
    description_length(_BrokenSAE(SAEConfig(d_in=16, d_sae=8)), torch.randn(48, 16),
                       loss="ce", model=model, hook_name=HOOK, tokens=tokens)


def _store_failing(model, tokens):
    def boom(act, hook):
        raise RuntimeError("hook failed")

    model.add_hook("blocks.0.hook_mlp_out", boom)
    try:
        ActivationStore(model, "blocks.1.hook_resid_pre", tokens, progress=False).harvest()
    finally:
        model.reset_hooks()


def _double_attach(model, tokens):
    with attach_sae(model, HOOK, SAE(SAEConfig(d_in=16, d_sae=8))):
        attach_sae(model, HOOK, SAE(SAEConfig(d_in=16, d_sae=8)))


FAILURES = [_raise_inside_attach, _broken_sae_forward, _run_with_hooks_failing,
            _run_with_hooks_broken_sae, _evaluate_failing, _dl_ce_failing, _store_failing,
            _double_attach]


@pytest.mark.parametrize("fail", FAILURES, ids=[f.__name__.strip("_") for f in FAILURES])
def test_no_hooks_leak_after_failures(model, tokens, fail):
    before = _state(model)
    logits = model(tokens)
    with pytest.raises((RuntimeError, ValueError)):
        fail(model, tokens)
    assert _state(model) == before
    torch.testing.assert_close(model(tokens), logits, rtol=0, atol=0)


def test_no_hooks_leak_after_ablation_failures():
    model = _bilinear_model()
    tokens = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    before = _state(model)
    logits = model(tokens)
    U = model.W_U.T[:2].detach()
    with pytest.raises(RuntimeError, match="inside"):
        with ablate_eigen(model, 0, U, 2):
            raise RuntimeError("inside the ablation")
    with pytest.raises(ValueError, match="full row rank"):
        ablate_eigen(model, 0, torch.cat([U, U]), 2)
    with pytest.raises(RuntimeError, match="hook failed"):
        with ablate_eigen(model, 0, U, 2):
            model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", _boom)])
    assert _state(model) == before
    torch.testing.assert_close(model(tokens), logits, rtol=0, atol=0)


def _boom(act, hook):
    raise RuntimeError("hook failed")


def test_device_mismatch_is_a_clear_error_without_a_gpu():
    """A device mismatch, exercised with the 'meta' device (no GPU needed): attaching an
    SAE whose weights live elsewhere than the model names both devices and the fix."""
    import pytest

    import tl_mdl

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32,
                                  d_vocab=50, n_ctx=8, act_fn="gelu")
    model = HookedTransformer(cfg)
    sae = tl_mdl.SAE(tl_mdl.SAEConfig(d_in=16, d_sae=32)).to("meta")
    before = {name: len(hp._forward_hooks) for name, hp in model.hook_dict.items()}
    with pytest.raises((ValueError, TypeError, RuntimeError), match="meta"):
        tl_mdl.attach_sae(model, "blocks.0.hook_resid_pre", sae)
    after = {name: len(hp._forward_hooks) for name, hp in model.hook_dict.items()}
    assert before == after

"""ActivationStore: the disk cache is never stale, stores sharing a folder cannot mix, the
storage dtype cannot overflow silently, passes are reproducible; train_sae and evaluate
on the store's edge cases."""

from __future__ import annotations

import warnings

import pytest
import torch
from builders import random_sae, tiny_model

from tl_mdl import ActivationStore, attach_sae, load_activations, train_sae
from tl_mdl.metrics import evaluate
from tl_mdl.sae import SAEConfig

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 50, (6, 12), generator=torch.Generator().manual_seed(0))


def fresh(model, tokens, **kw) -> torch.Tensor:
    return ActivationStore(model, HOOK, tokens, progress=False, **kw).activations()


def cached(model, tokens, cache_dir, **kw) -> torch.Tensor:
    return ActivationStore(model, HOOK, tokens, progress=False, cache_dir=cache_dir,
                           model_batch_size=2, **kw).activations()


def test_cache_sees_weight_changes_that_keep_the_sum(model, tokens, tmp_path):
    first = cached(model, tokens, tmp_path)
    with torch.no_grad():
        model.W_E[[3, 7]] = model.W_E[[7, 3]].clone()  # same sum, other activations
    again = cached(model, tokens, tmp_path)
    assert not torch.equal(first, again)
    assert torch.equal(again, fresh(model, tokens))


def test_cache_sees_a_dtype_change(model, tokens, tmp_path):
    cached(model, tokens, tmp_path)
    model.double()  # leaves cfg.dtype at float32; the parameters' dtype changes
    got = cached(model, tokens, tmp_path)
    assert got.dtype == torch.float64
    assert torch.equal(got, fresh(model, tokens))


def test_cache_is_not_reused_while_hooks_are_attached(model, tokens, tmp_path):
    clean = cached(model, tokens, tmp_path)
    sae = random_sae(16, seed=3)
    with attach_sae(model, "blocks.0.hook_resid_pre", sae):
        with pytest.warns(UserWarning, match="hooks are attached"):
            hooked = cached(model, tokens, tmp_path)
        assert torch.equal(hooked, fresh(model, tokens))
    assert not torch.equal(hooked, clean)
    assert torch.equal(cached(model, tokens, tmp_path), clean)  # the hooked cache: not reused


def test_two_stores_in_one_cache_dir_cannot_mix(model, tokens, tmp_path):
    kw = dict(progress=False, cache_dir=tmp_path, model_batch_size=2, batch_size=8)
    train = ActivationStore(model, HOOK, tokens, **kw)
    train_rows = train.activations().clone()
    evals = ActivationStore(model, HOOK, tokens[:2], **kw)  # rewrites the folder
    assert torch.equal(evals.activations(), fresh(model, tokens[:2]))
    # the shards of the longer first harvest are gone, not mixed in
    assert torch.equal(load_activations(tmp_path / HOOK), evals.activations())
    with pytest.raises(RuntimeError, match="rewritten .* give each store its own cache_dir"):
        list(train)
    assert torch.equal(cached(model, tokens, tmp_path), train_rows)  # a new store re-harvests


def test_storage_dtype_overflow_raises(model, tokens):
    with torch.no_grad():
        model.W_E.mul_(1e5)  # activations beyond float16's range
    store = ActivationStore(model, HOOK, tokens, dtype=torch.float16, progress=False)
    with pytest.raises(FloatingPointError, match="overflow the storage dtype torch.float16"):
        store.activations()


def test_passes_are_reproducible_and_independent_per_hook(model, tokens):
    hooks = [HOOK, "blocks.0.hook_resid_pre"]

    def store():
        return ActivationStore(model, hooks, tokens, batch_size=8, progress=False, seed=5)

    a = store()
    first_a = torch.cat(list(a[HOOK]))
    b = store()
    list(b["blocks.0.hook_resid_pre"])  # iterating another hook first changes nothing
    assert torch.equal(torch.cat(list(b[HOOK])), first_a)
    second = torch.cat(list(a[HOOK]))  # pass 1: another order, the same rows
    assert not torch.equal(second, first_a)
    assert torch.equal(second.sort(0).values, first_a.sort(0).values)
    assert torch.equal(torch.cat(list(b[HOOK].epoch_batches(1))), second)
    assert torch.equal(torch.cat(list(b[HOOK].epoch_batches(0))), first_a)
    one = ActivationStore(model, HOOK, tokens, batch_size=8, progress=False, seed=5)
    assert torch.equal(torch.cat(list(one.epoch_batches(1))), second)
    with pytest.raises(ValueError, match="epoch must be a non-negative int"):
        one.epoch_batches(-1)


@pytest.mark.parametrize("drop_last", [False, True])
def test_in_memory_pass_covers_every_row_once(model, tokens, drop_last):
    store = ActivationStore(model, HOOK, tokens, batch_size=10, progress=False,
                            drop_last=drop_last)
    batches = list(store)
    assert len(batches) == len(store)
    assert all(b.shape == (10, 16) for b in batches[: 72 // 10])
    rows = torch.cat(batches)
    full = store.activations()
    if not drop_last:
        assert torch.equal(rows.sort(0).values, full.sort(0).values)
    else:
        assert rows.shape[0] == 70
    unshuffled = ActivationStore(model, HOOK, tokens, batch_size=10, progress=False,
                                 shuffle=False)
    got = list(unshuffled)
    got[0].zero_()  # a served batch is the caller's: the store is untouched
    assert torch.equal(torch.cat(list(unshuffled)), unshuffled.activations())
    assert unshuffled.activations().abs().sum() > 0


def test_train_sae_on_a_store_runs_epochs_and_resumes_exactly(model, tokens, tmp_path):
    store = ActivationStore(model, HOOK, tokens, batch_size=16, progress=False)
    cfg = SAEConfig(d_in=16, d_sae=32)
    kw = dict(progress=False, return_history=True, seed=0)
    full = train_sae(store, cfg, epochs=3, **kw)
    assert full.history[-1]["step"] == 3 * len(store) - 1
    # 7 steps (into the second pass) with a checkpoint, resumed to 15 by a fresh store,
    # equals 15 uninterrupted steps (constant learning rate and no warm start, so the
    # schedules agree)
    part = ActivationStore(model, HOOK, tokens, batch_size=16, progress=False)
    a = train_sae(part, cfg, steps=7, checkpoint_dir=tmp_path / "b", checkpoint_every=7,
                  lr_decay_frac=0.0, warm_start_frac=0.0, **kw).sae
    b = train_sae(ActivationStore(model, HOOK, tokens, batch_size=16, progress=False), cfg,
                  steps=15, checkpoint_dir=tmp_path / "b", checkpoint_every=7,
                  lr_decay_frac=0.0, warm_start_frac=0.0, **kw).sae
    c = train_sae(ActivationStore(model, HOOK, tokens, batch_size=16, progress=False), cfg,
                  steps=15, lr_decay_frac=0.0, warm_start_frac=0.0, **kw).sae
    assert not torch.equal(a.W_enc, c.W_enc)
    for name, p in c.state_dict().items():
        assert torch.equal(b.state_dict()[name], p), name


def test_train_sae_on_iterables(tokens):
    cfg = SAEConfig(d_in=4, d_sae=8)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 4, generator=gen) for _ in range(3)]
    r = train_sae(batches, cfg, epochs=2, progress=False, return_history=True, log_every=1)
    assert [h["step"] for h in r.history] == list(range(6))  # a list is iterated again
    with pytest.warns(RuntimeWarning, match="ran out after 3 batches, before steps=5"):
        train_sae(iter(batches), cfg, steps=5, progress=False)
    with pytest.raises(ValueError, match="steps= is required"):
        train_sae(iter(batches), cfg, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_sae(batches, cfg, steps=3, progress=False)


def test_evaluate_per_head_hook_z(model, tokens):
    """An SAE on one head's d_head (hook_z, not flattened): metrics per SAE input, DL per
    token = n_heads inputs."""
    hook = "blocks.1.attn.hook_z"
    sae = random_sae(8, seed=2)
    r = evaluate(model, {hook: sae}, tokens, description_length=True)[hook]
    assert r["n_tokens"] == tokens.numel()
    z = ActivationStore(model, hook, tokens, progress=False).activations()  # [N, 2·8]
    x = z.reshape(-1, 8)
    lat = sae.encode(x)
    assert r["l0"] == pytest.approx(float((lat != 0).sum(-1).float().mean()), rel=1e-6)
    assert r["dl_bits_per_token"] == pytest.approx(2 * r["dl_bits_per_input"], rel=1e-12)


def test_old_import_paths_are_the_moved_objects():
    """The activation layer moved to tl_mdl.activations; imports users wrote before still work
    and give the very same objects."""
    import tl_mdl
    from tl_mdl.activations import ShardedActivations, save_activations
    from tl_mdl.activations.store import ActivationStore as moved
    from tl_mdl.hooks import ActivationStore as via_hooks
    from tl_mdl.hooks.store import ActivationStore as via_hooks_store
    from tl_mdl.training import ShardedActivations as via_training
    from tl_mdl.training.shards import ShardedActivations as via_training_shards

    assert moved is via_hooks is via_hooks_store is ActivationStore is tl_mdl.ActivationStore
    assert ShardedActivations is via_training is via_training_shards is tl_mdl.ShardedActivations
    assert save_activations is tl_mdl.save_activations

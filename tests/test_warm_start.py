"""The MDL objective's warm start codes (``warm_start="topk"`` / ``"batch_topk"``): hand-built
pre-activations with known selections, and the settings' checks."""

from __future__ import annotations

import pytest
import torch

from tl_mdl import SAEConfig, train_sae
from tl_mdl.training.code_length import CodeLengthObjective, warm_code


def test_batch_topk_keeps_the_k_times_b_largest_positive_entries():
    pre = torch.tensor([[5.0, 4.0, 3.0, -1.0],
                        [0.5, 0.2, -2.0, 0.1],
                        [6.0, 0.0, 2.5, 1.0]], requires_grad=True)
    out = warm_code(pre, 2, "batch_topk")  # 6 entries: 6, 5, 4, 3, 2.5, 1
    want = torch.tensor([[5.0, 4.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [6.0, 0.0, 2.5, 1.0]])
    assert torch.equal(out.detach(), want)  # rows fire 3, 0 and 3 (2 on average)
    out.sum().backward()
    assert torch.equal(pre.grad, (want != 0).float())  # gradient through the chosen only
    per_row = warm_code(pre.detach(), 2, "topk")
    assert torch.equal((per_row > 0).sum(1), torch.tensor([2, 2, 2]))


def test_batch_topk_never_keeps_a_non_positive_entry():
    pre = -torch.rand(4, 8)
    pre[0, 3] = 0.7
    out = warm_code(pre, 3, "batch_topk")
    assert out.count_nonzero() == 1 and out[0, 3] == 0.7


@pytest.mark.parametrize("bad,match", [
    ({"warm_start": "top-k"}, "warm_start='top-k' is unknown"),
    ({"warm_start": "batch_topk", "objective": "l1"}, "setting of objective='mdl'"),
])
def test_bad_warm_start_settings_are_refused(bad, match):
    kw = {"objective": "mdl", **bad}
    x = torch.randn(64, 4)
    with pytest.raises(ValueError, match=match):
        train_sae(x, SAEConfig(d_in=4, d_sae=8), kw.pop("objective"), steps=2,
                  progress=False, **kw)
    with pytest.raises(ValueError, match="unknown"):
        CodeLengthObjective(warm_start="nope")


def test_the_warm_start_kind_is_recorded_and_trains():
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    res = train_sae(x, SAEConfig(d_in=8, d_sae=16), "mdl", steps=40, batch_size=64,
                    warm_start="batch_topk", progress=False, return_history=True)
    assert res.sae.cfg.metadata["training"]["warm_start"] == "batch_topk"
    assert res.sae.cfg.activation == "jumprelu" and res.steps == 40


# ------------------------------------------------ resuming: the run's own settings
_RUN = dict(steps=40, batch_size=64, warm_start_frac=0.5, lr=3e-3, progress=False)


def _data():
    return torch.randn(512, 8, generator=torch.Generator().manual_seed(1))


def _crash_at(step, *args, **kw):
    """Train until ``step`` (exclusive), then stop as a crash would (checkpoints kept)."""
    from tl_mdl.training.loop import Run

    class Stop(Exception):
        pass

    real = Run.one_step

    def crash(self, xb, s):
        if s == step:
            raise Stop
        return real(self, xb, s)

    Run.one_step = crash
    try:
        with pytest.raises(Stop):
            train_sae(*args, **kw)
    finally:
        Run.one_step = real


def _assert_same_weights(a, b):
    for name, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], v), name


def test_a_run_resumed_in_its_batch_topk_warm_start_equals_the_whole_run(tmp_path):
    x, cfg = _data(), SAEConfig(d_in=8, d_sae=16)
    whole = train_sae(x, cfg, "mdl", **_RUN)
    _crash_at(13, x, cfg, "mdl", checkpoint_dir=tmp_path, checkpoint_every=10, **_RUN)
    from tl_mdl.training.checkpointing import load_checkpoint

    meta = load_checkpoint(tmp_path)[0]
    assert meta["step"] == 10 and meta["loop"]["warm"] and meta["loop"]["warm_end"] == 20
    resumed = train_sae(x, cfg, "mdl", checkpoint_dir=tmp_path, checkpoint_every=10, **_RUN)
    _assert_same_weights(whole, resumed)


def _as_written_before_warm_start_existed(path):
    """Rewrite the checkpoint in ``path`` as tl_mdl wrote it before ``warm_start`` and the
    record of the objective's settings: no such field in its TrainConfig."""
    import json

    from safetensors.torch import save_file

    from tl_mdl.training.checkpointing import META_KEY, STATE_JSON, STATE_TENSORS, load_checkpoint

    meta, tensors = load_checkpoint(path)
    meta["train_cfg"].pop("warm_start")
    meta["loop"].pop("objective_settings", None)
    text = json.dumps(meta)
    save_file(tensors, str(path / STATE_TENSORS), metadata={META_KEY: text})
    (path / STATE_JSON).write_text(text)


def test_a_checkpoint_of_the_old_defaults_resumes_with_them(tmp_path, monkeypatch):
    """A run started before 'jump' and BatchTopK were the defaults (straight_through and
    warm_start left unset) continues with 'threshold' and the per-row TopK it started
    with: resumed, it equals the whole run under those settings, not a mix of two."""
    x, cfg = _data(), SAEConfig(d_in=8, d_sae=16)
    with monkeypatch.context() as m:  # the objective as it was: the old class defaults
        m.setattr(CodeLengthObjective, "straight_through", "threshold")
        m.setattr(CodeLengthObjective, "warm_start", "topk")
        whole = train_sae(x, cfg, "mdl", **_RUN)
        _crash_at(13, x, cfg, "mdl", checkpoint_dir=tmp_path, checkpoint_every=10, **_RUN)
    _as_written_before_warm_start_existed(tmp_path)
    # asked for another setting explicitly: two runs would be mixed
    with pytest.raises(ValueError, match="warm_start='topk' there, 'batch_topk' here"):
        train_sae(x, cfg, "mdl", checkpoint_dir=tmp_path, warm_start="batch_topk", **_RUN)
    resumed = train_sae(x, cfg, "mdl", checkpoint_dir=tmp_path, checkpoint_every=10,
                        return_history=True, **_RUN)
    _assert_same_weights(whole, resumed.sae)
    training = resumed.sae.cfg.metadata["training"]
    assert (training["straight_through"], training["warm_start"]) == ("threshold", "topk")


def test_a_checkpoint_keeps_its_settings_when_the_defaults_change(tmp_path, monkeypatch):
    x, cfg = _data(), SAEConfig(d_in=8, d_sae=16)
    whole = train_sae(x, cfg, "mdl", return_history=True, **_RUN)
    training = whole.sae.cfg.metadata["training"]  # the effective settings, recorded
    assert (training["straight_through"], training["warm_start"]) == ("jump", "batch_topk")
    _crash_at(13, x, cfg, "mdl", checkpoint_dir=tmp_path, checkpoint_every=10, **_RUN)
    monkeypatch.setattr(CodeLengthObjective, "straight_through", "threshold")
    monkeypatch.setattr(CodeLengthObjective, "warm_start", "topk")
    resumed = train_sae(x, cfg, "mdl", checkpoint_dir=tmp_path, checkpoint_every=10, **_RUN)
    _assert_same_weights(whole.sae, resumed)


def test_warm_start_ends_by_warm_start_max_steps_whatever_the_cap():
    """Until converged, the warm start ends at its plateau rule, at ``warm_start_frac ·
    max_steps``, or after ``warm_start_max_steps`` steps, whichever comes first: a larger
    cap does not lengthen it. Rows of a fixed dictionary keep the TopK improving for a
    while; held-out evaluations every 10 steps show where the warm phase stopped."""
    g = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(32, 16, generator=g), dim=1)
    codes = torch.rand(2048, 32, generator=g) * (torch.rand(2048, 32, generator=g) < 0.1)
    x = codes @ d
    kw = dict(objective="mdl", target_fvu=0.3, batch_size=64, eval_every=10, lr=3e-3,
              progress=False, return_history=True, seed=0)
    ends = {}
    for cap, warm_max in ((1000, 40), (2000, 40), (1000, 10**6)):
        res = train_sae(x, SAEConfig(d_in=16, d_sae=32), max_steps=cap,
                        warm_start_max_steps=warm_max, **kw)
        ends[cap, warm_max] = max(e["step"] for e in res.evaluations if e["warm"])
        assert res.sae.cfg.metadata["training"]["warm_start_max_steps"] == warm_max
    assert ends[1000, 40] == ends[2000, 40] <= 40  # the cap no longer lengthens it
    assert ends[1000, 10**6] > 40  # without it: the rule or 0.2 · 1000


@pytest.mark.parametrize("bad", [-1, 2.5, True, "2000"])
def test_bad_warm_start_max_steps_is_refused(bad):
    with pytest.raises(ValueError, match="warm_start_max_steps must be an int >= 0"):
        train_sae(torch.randn(64, 4), SAEConfig(d_in=4, d_sae=8), "mdl",
                  warm_start_max_steps=bad, steps=2, progress=False)

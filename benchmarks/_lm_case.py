"""Language-model activations for ``bench_frontier.py``: the LM study's residual stream, or
(``--lm random``) a random-weight model on Zipf tokens.

``study_residual`` builds the model of ``demos/lm_study`` with the study's own code and
settings (its defaults unless ``argv`` says otherwise): the tokens, the trained SiLU LM and
its bilinear conversion (the model the study analyses), then the study's harvest of layer
``n_layers - 1`` (the study's default layer): ``blocks.{layer}.hook_resid_pre`` on the first
``harvest_windows`` training windows (training rows) and the ``eval_windows`` held-out
windows (test rows). ``out`` is a study output folder: a study run already there (same
settings) is reused, and what is built here is saved there, so neither a rerun of the
benchmark nor the study itself trains the LM again.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import torch

DEMOS = Path(__file__).resolve().parents[1] / "demos"


def study_residual(out: str | Path, argv: tuple[str, ...] = (),
                   log=print) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(train [N, d_model], test [M, d_model], info)`` for the study's residual hook;
    ``info``: the hook, the model's description and its held-out loss. The study's stage
    messages go to ``log`` as ``#`` comment lines."""
    if str(DEMOS) not in sys.path:
        sys.path.insert(0, str(DEMOS))
    from lm_study.lm import lm_loss
    from lm_study.saes import harvest, study_hooks
    from lm_study.settings import parse_args
    from lm_study.stages import Stages
    from lm_study.study import data_stage, model_stages, open_out

    args = parse_args(["--out", str(out), "--no-progress", *argv])
    buf = io.StringIO()
    rng = torch.get_rng_state()  # open_out seeds torch's global generator
    try:
        with contextlib.redirect_stdout(buf):
            out_dir = open_out(args)
            st = Stages(out_dir)
            data = data_stage(args, out_dir, st, None)
            model, _, _ = model_stages(args, out_dir, st, data, None)
            layer = args.layer if args.layer is not None else model.cfg.n_layers - 1
            hooks = study_hooks(model, layer)  # the study's three hooks, so its own
            # harvest stage finds all of them when it resumes from this folder
            with st.stage("harvest", (out_dir / "activations" / "eval").is_dir()):
                acts, eval_acts = harvest(args, out_dir, model, hooks,
                                          data.train[: args.harvest_windows], data.eval)
            loss = lm_loss(model, data.loss)
    finally:
        torch.set_rng_state(rng)
        for line in buf.getvalue().splitlines():
            if line.strip():
                log("# lm_study: " + line.strip())
    info = {"hook": hooks["resid"], "layer": layer, "held_out_loss": loss,
            "model": (f"{model.cfg.n_layers}-layer d_model {model.cfg.d_model} bilinear LM "
                      f"({data.source}, {args.lm_steps} LM steps)"),
            "windows": (args.harvest_windows, args.eval_windows, args.n_ctx)}
    return acts["resid"].float(), eval_acts["resid"].float(), info


def random_residual(n_tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``blocks.1.hook_resid_pre`` of a random 2-layer model (d_model 64, d_vocab 512) on
    tokens drawn from a Zipf(1.1) distribution; the last 20% of rows for testing."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256,
                                  d_vocab=512, n_ctx=64, act_fn="gelu", seed=seed)
    model = HookedTransformer(cfg).eval()
    ranks = torch.arange(1, 513, dtype=torch.float64)
    probs = ranks.pow(-1.1) / ranks.pow(-1.1).sum()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.multinomial(probs, n_tokens, replacement=True, generator=g).view(-1, 64)
    hook = "blocks.1.hook_resid_pre"
    acts = []
    with torch.no_grad():
        for i in range(0, tokens.shape[0], 32):
            _, cache = model.run_with_cache(tokens[i : i + 32], names_filter=hook)
            acts.append(cache[hook].reshape(-1, 64))
    x = torch.cat(acts)
    n_test = x.shape[0] // 5
    return x[:-n_test], x[-n_test:]

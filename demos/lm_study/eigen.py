"""Stage 5: the bilinear MLP decomposed in the SAE bases (top interacting input-feature
pairs per output feature, with their top-activating tokens) and the truncation curve."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lm_study.plots import plot_spectra, plot_truncation
from lm_study.stages import write_csv
from tl_mdl import SAE, eigendecompose, interaction_matrix, truncation_curve
from tl_mdl.bilinear import output_svd
from tl_mdl.mdl import encode_all


def top_contexts(latents: torch.Tensor, feature: int, tokens_flat: torch.Tensor, n_ctx: int,
                 decode, n: int = 3, left: int = 6) -> list[str]:
    """The ``n`` tokens where ``feature`` is largest, each with ``left`` tokens of context
    (same window only) and the token itself in ⟦…⟧."""
    col = latents[:, feature]
    top = col.topk(min(n, col.numel())).indices.tolist()
    outs = []
    for i in top:
        if col[i] <= 0:
            break
        start = max(i - left, i - i % n_ctx)
        ctx = decode(tokens_flat[start:i].tolist()).replace("\n", "⏎").replace("|", "/")
        tok = decode([int(tokens_flat[i])]).replace("\n", "⏎").replace("|", "/")
        outs.append(f"{ctx}⟦{tok}⟧")
    return outs


def eigen_study(args, out: Path, model, layer: int, saes: dict[str, SAE], eval_acts,
                eval_w: torch.Tensor, decode) -> dict:
    mlp = model.blocks[layer].mlp
    sae_in, sae_out = saes["mlp_in"], saes["mlp_out"]
    f_in = encode_all(sae_in, eval_acts["mlp_in"])  # [N, m]
    f_out = encode_all(sae_out, eval_acts["mlp_out"])
    toks = eval_w.reshape(-1)
    n_ctx = eval_w.shape[1]
    freq_out = (f_out > 0).float().mean(0)
    cand = torch.nonzero((freq_out > 0) & (freq_out < 0.5)).flatten()
    if cand.numel() == 0:
        cand = torch.nonzero(freq_out > 0).flatten()
    sel = cand[freq_out[cand].argsort(descending=True)][: args.n_out_features]
    U = sae_out.W_enc.detach().T[sel]  # [n, d_model]: u·out = latent pre-activation + const
    Q = interaction_matrix(mlp, U, in_basis=sae_in, dtype=torch.float64)  # [n, m+1, m+1]
    eig = eigendecompose(mlp, U, in_basis=sae_in, k=2, dtype=torch.float64)
    rms_in = f_in.double().square().mean(0).sqrt()  # typical size of each input coordinate
    m = sae_in.cfg.d_sae
    rows = []
    for r, o in enumerate(sel.tolist()):
        q = Q[r, :m, :m]
        # weight of f_i f_j in u·out: Q_ii for i = j, 2 Q_ij for i < j; scaled to typical size
        w = torch.triu(2 * q - torch.diag(q.diagonal())) * rms_in[:, None] * rms_in[None, :]
        top = w.abs().flatten().topk(args.n_pairs).indices.tolist()
        out_ctx = top_contexts(f_out, o, toks, n_ctx, decode)
        v1 = eig.vectors[r, 0, :m]
        for rank, flat in enumerate(top):
            i, j = divmod(flat, m)
            rows.append({
                "out_feature": o, "out_freq": float(freq_out[o]), "rank": rank + 1,
                "in_i": i, "in_j": j, "Q_ij": float(q[i, j]),
                "typical_contribution": float(w[i, j]),
                "lambda_1": float(eig.values[r, 0]), "lambda_2": float(eig.values[r, 1]),
                "v1_top_inputs": " ".join(str(x) for x in v1.abs().topk(3).indices.tolist()),
                "out_contexts": " · ".join(out_ctx),
                "in_i_contexts": " · ".join(top_contexts(f_in, i, toks, n_ctx, decode)),
                "in_j_contexts": " · ".join(top_contexts(f_in, j, toks, n_ctx, decode)),
            })
    write_csv(out / "interactions.csv", rows)

    # truncation curve: the whole MLP output replaced by top-k eigen expansions along the
    # bilinear tensor's top singular output directions (a full basis of d_model).
    d = model.cfg.d_model
    svd = output_svd(mlp, d, dtype=torch.float64)
    ks = sorted({min(int(k), d + 1) for k in args.truncation_ks.split(",")})
    curve = truncation_curve(model, eval_w, layer, svd.out_dirs.float(), ks,
                             progress=not args.no_progress)
    trows = curve.rows()
    write_csv(out / "truncation.csv", trows)
    info = {"base_loss": curve.base_loss, "base_accuracy": curve.base_accuracy,
            "ks": curve.ks, "loss": curve.loss, "out_features": sel.tolist()}
    (out / "truncation.json").write_text(json.dumps(info, indent=2))
    plot_truncation(info, out / "truncation.png", layer)
    plot_spectra(eig, sel, Q, m, out / "interaction_spectra.png")
    return info

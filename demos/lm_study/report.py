"""``report.md``: every table of the study, from ``summary.json``'s content."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lm_study.stages import read_csv


def fmt(x: Any, nd: int = 3) -> str:
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


def table(rows: list[dict], cols: list[str], heads: list[str] | None = None) -> str:
    heads = heads or cols
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def write_report(out: Path, summary: dict) -> None:
    s = summary
    md = [f"# LM study: MDL-SAEs and a bilinear MLP on {s['model_name']}", ""]
    md += [f"Data: `{s['source']}`, {s['n_tokens']:,} tokens "
           f"({s['n_train_windows']} train / {s['n_held_windows']} held-out windows of "
           f"{s['n_ctx']}). Layer studied: {s['layer']}. Command: `{s['command']}`.", ""]
    if s.get("bilinear"):
        b = s["bilinear"]
        md += ["## 1. Bilinear conversion (`anneal_to_bilinear`)", "",
               table([{"model": "SiLU GatedMLP (trained)", "loss": b["loss_silu"]},
                      {"model": "swap SiLU → identity, no fine-tune",
                       "loss": b["loss_swap_no_finetune"]},
                      {"model": f"SiLU fine-tuned {b['anneal_steps']} more steps (control)",
                       "loss": b.get("loss_silu_finetuned")},
                      {"model": f"bilinear after annealing ({b['anneal_steps']} steps)",
                       "loss": b["loss_bilinear"]}],
                     ["model", "loss"], ["model", "held-out loss (nats/token)"]), "",
               f"Bilinear − SiLU: {b['delta_nats']:+.4f} nats ({100 * b['relative']:+.2f}%); "
               f"bilinear − SiLU control (same extra training): "
               f"{b.get('delta_vs_control_nats', math.nan):+.4f} nats "
               f"({100 * b.get('relative_vs_control', math.nan):+.2f}%). "
               "Paper: TinyLlama lost ~0.05 nats; TinyStories bilinear ≈ SwiGLU within ~1%.",
               "", "![training](training.png)", ""]
    else:
        md += ["## 1. Bilinear conversion", "", s.get("bilinear_note", "skipped"), ""]
    md += ["## 2. MDL-optimal SAE per hook", "",
           f"TopK SAE sweep (widths {s['widths']}, k {s['ks']}); DL scored on held-out "
           f"activations at FVU tolerance {s['tolerance']}; the MDL-optimal SAE has the "
           f"lowest DL among those with quantised FVU ≤ {s['fvu_threshold']}. Raw cost: "
           "d_in × (entropy of each float at the same tolerance); naive bound: "
           "L0·(bits per value + log2 F). Paper (GPT-2): raw 5,376 bits/token, SAE ≈ 1,405.",
           "",
           table(s["selection"], ["key", "hook", "width", "k", "bits_per_input", "raw_bits",
                                  "naive_bits", "l0", "fvu_quantized", "meets_threshold"],
                 ["", "hook", "F", "k", "DL bits/token", "raw bits/token",
                  "L0·(B+log2F)", "L0", "FVU_q", "≤ threshold"]), "",
           "![DL vs width](dl_vs_width.png)", "",
           "Full sweeps: `sweep_<key>.csv`.", ""]
    md += ["## 3. Chosen SAEs spliced in (`attach_sae`, `evaluate`)", "",
           table(s["evaluate"], ["key", "fvu", "l0", "dead_fraction", "ce_loss_clean",
                                 "ce_loss_spliced", "ce_loss_zero_ablated",
                                 "ce_loss_recovered", "kl_clean_spliced",
                                 "dl_bits_per_token"],
                 ["", "FVU", "L0", "dead", "CE clean", "CE spliced", "CE zero-abl.",
                  "CE recovered", "KL", f"DL (KL tol {s['kl_tolerance']})"]), "",
           "CE recovered = (CE zero-ablated − CE spliced) / (CE zero-ablated − CE clean): "
           "ill-conditioned where zero-ablating the hook barely hurts. KL = KL(clean ‖ "
           "spliced) in nats/token. The last column is the DL (bits/token) with the precision "
           "chosen so that quantising the latents raises the downstream KL by at most "
           f"{s['kl_tolerance']} nats/token (section 2 uses an FVU tolerance instead).", ""]
    if s.get("eigen"):
        e = s["eigen"]
        md += ["## 4. Bilinear MLP in the SAE bases", "",
               "Output directions: encoder rows of the MLP-out SAE (most frequent features, "
               "density < 50%); inputs: coordinates in the MLP-in SAE's decoder basis. "
               "Pairs ranked by |weight of f_i f_j| × rms(f_i) rms(f_j) (weight: Q_ii, or "
               "2 Q_ij for i ≠ j). Contexts: top-activating held-out tokens in ⟦…⟧.", ""]
        rows = read_csv(out / "interactions.csv")
        for o in dict.fromkeys(r["out_feature"] for r in rows):
            rr = [r for r in rows if r["out_feature"] == o]
            md += [f"**out feature {o}** (active on {100 * float(rr[0]['out_freq']):.1f}% of "
                   f"tokens; λ1 {float(rr[0]['lambda_1']):.3g}, λ2 "
                   f"{float(rr[0]['lambda_2']):.3g}; top inputs of v1: "
                   f"{rr[0]['v1_top_inputs']}) — fires on: {rr[0]['out_contexts']}", "",
                   "| i | j | Q_ij | typical | i fires on | j fires on |",
                   "|---|---|---|---|---|---|"]
            for r in rr:
                md.append(f"| {r['in_i']} | {r['in_j']} | {float(r['Q_ij']):.3g} | "
                          f"{float(r['typical_contribution']):.3g} | {r['in_i_contexts']} | "
                          f"{r['in_j_contexts']} |")
            md.append("")
        md += ["![spectra](interaction_spectra.png)", "",
               "### Truncation curve", "",
               f"Full model: {e['base_loss']:.4f} nats/token.", "",
               table([{"k": k, "loss": lo} for k, lo in zip(e["ks"], e["loss"], strict=True)],
                     ["k", "loss"], ["eigenvectors kept", "loss (nats/token)"]), "",
               "![truncation](truncation.png)", ""]
    else:
        md += ["## 4. Bilinear MLP in the SAE bases", "", "skipped (no bilinear MLP)", ""]
    md += ["## Timings", "",
           table([{"stage": k, **v} for k, v in s["timings"].items()],
                 ["stage", "seconds", "cpu_seconds", "resumed"],
                 ["stage", "wall s", "cpu s (all threads)", "resumed"]), "",
           "(Timings are those of the run that made each stage's artefacts.)", ""]
    (out / "report.md").write_text("\n".join(md))

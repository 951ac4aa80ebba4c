"""bitsandbytes' CPU notice ("Failed to load CPU gemm_4bit_forward ...") stays out of what
the recipes print: every recipes/ site that imports bitsandbytes, or a peer that imports it
(galore-torch), goes through memopt's quiet import first. Each site runs in its own process,
since the first quiet import silences every later one."""

import subprocess
import sys

import pytest

pytest.importorskip("bitsandbytes")

NOTICE = "gemm_4bit_forward"
PEER_MODEL = "torch.nn.ModuleDict({'attn': torch.nn.Linear(8, 8), 'norm': torch.nn.LayerNorm(8)})"

SITES = {
    "galore-torch peer": (
        "import torch; from memopt.recipes.peers import build_peer; "
        f"build_peer('peer-galore-torch', {PEER_MODEL}, lr=1e-3, rank=2)", "galore_torch"),
    "bench.train_step adamw8bit row": (
        "import torch; from memopt.recipes.bench.train_step import _bnb_adamw8bit; "
        "_bnb_adamw8bit(torch.nn.Linear(8, 8), {})", None),
}


@pytest.mark.parametrize("code,needs", list(SITES.values()), ids=list(SITES))
def test_site_that_imports_bitsandbytes_prints_no_notice(code, needs):
    if needs:
        pytest.importorskip(needs)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert NOTICE not in done.stdout + done.stderr


def test_bench_command_prints_no_notice():
    """The bench rows of bitsandbytes' AdamW8bit on a small model, as `memopt bench` runs them."""
    done = subprocess.run([sys.executable, "-m", "memopt.recipes.bench.step", "--device", "cpu",
                           "--blocks", "1", "--hidden", "64", "--intermediate", "96", "--rank",
                           "8", "--steps", "1", "--only", "bitsandbytes AdamW8bit"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| bitsandbytes AdamW8bit |" in done.stdout
    assert NOTICE not in done.stdout + done.stderr

"""Model and training presets for the LLaMA pretraining recipes.

``tiny`` runs on a laptop CPU in minutes; ``quick`` (the tiny model on half the batch) is
what ``memopt compare`` runs by default; ``small`` runs on a GPU in minutes. ``60m`` ... ``1b``
use the LLaMA shapes of the GaLore paper (Zhao et al., 2024, Table 8: hidden / intermediate /
heads / layers) with that paper's ranks (128 / 256 / 256 / 512), update gap 200, scale 0.25
and GaLore learning rate 0.01; our vocabulary is 256 bytes instead of the paper's 32k
tokens, so parameter counts are a little lower; losses are logged in nats per byte and shown
in bits per byte (nats / ln 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..optim.registry import lr_family, preset_options
from .peers import PEERS

#: Learning rates per optimizer family: "lowrank" (the Adam rule: galore, dct, fira), "muon"
#: (also the orthogonalized low-rank ones: trion, galoremuon), "polargrad", "adamw";
#: ``memopt.optim.registry.lr_family`` says which an optimizer takes.

@dataclass(frozen=True)
class Preset:
    """Shapes, batch and schedule of one recipe size."""

    name: str
    hidden: int
    intermediate: int
    heads: int
    layers: int
    seq_len: int
    batch_size: int
    steps: int
    rank: int
    update_proj_gap: int
    lr: dict[str, float] = field(default_factory=dict)
    adamw_lr: float = 3e-3          # embeddings, head and norms under Muon / PolarGrad
    warmup: float = 0.1             # fraction of steps
    eval_every: int = 50
    eval_batches: int = 8

    def family(self, optimizer: str) -> str:
        if optimizer in PEERS:
            return PEERS[optimizer][2]
        return lr_family(optimizer)

    def eval_interval(self) -> int:
        """Steps between validations: ``eval_every``, but at least 10 validations per run, so
        that a short run (``--steps 40``) still draws a validation curve."""
        return max(1, min(self.eval_every, self.steps // 10))

    def optimizer_kwargs(self, optimizer: str, lr: float | None = None,
                         rank: int | None = None) -> dict[str, Any]:
        """Constructor arguments for ``optimizer`` under this preset (``rank`` is used by the
        low-rank family only)."""
        family = self.family(optimizer)
        kwargs: dict[str, Any] = {"lr": lr if lr is not None else self.lr[family]}
        own = {} if optimizer in PEERS else preset_options(optimizer)
        if own is not None and optimizer not in PEERS:              # a low-rank composition
            kwargs["rank"] = self.rank if rank is None else rank
            if "update_proj_gap" not in own:      # DCT and Trion keep their own: cheap refresh
                kwargs["update_proj_gap"] = self.update_proj_gap
        elif family == "lowrank":                                   # a peer's GaLore or Fira
            kwargs.update(rank=self.rank if rank is None else rank, scale=0.25,
                          update_proj_gap=self.update_proj_gap)
        if family in ("muon", "polargrad"):
            kwargs.update(adamw_lr=self.adamw_lr)
        return kwargs

    def llama_config(self) -> Any:
        from transformers import LlamaConfig
        return LlamaConfig(vocab_size=256, hidden_size=self.hidden,
                           intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.heads, max_position_embeddings=self.seq_len,
                           tie_word_embeddings=False)


#: Best of a grid on the tiny preset (300 steps, seed 0, validation loss; see README):
#: adamw {1e-3, 3e-3, 1e-2}, galore {3e-3, 1e-2, 3e-2}, muon {0.01, 0.02, 0.05}. dct and fira
#: share galore's rate; polargrad, whose default scaling is relative, takes muon's.
_TINY_LR = {"adamw": 1e-3, "lowrank": 3e-2, "muon": 0.02, "polargrad": 0.02}
#: Best of seed-0 sweeps on the small preset (2000 steps, H100, 2026-12-06;
#: recipes/bench/BENCHMARKS.md): adamw {5e-4, 1e-3, 2e-3}, galore {5e-3, 1e-2, 2e-2} (1e-2 and
#: 2e-2 tie; dct is 0.32 bits worse at 2e-2), muon with weight decay 0.1 {0.01, 0.02, 0.04},
#: polargrad (relative nuclear-norm scaling, weight decay 0.1) {0.01, 0.02, 0.04}.
_SMALL_LR = {"adamw": 2e-3, "lowrank": 1e-2, "muon": 0.02, "polargrad": 0.02}
_PAPER_LR = {"adamw": 1e-3, "lowrank": 1e-2, "muon": 0.02, "polargrad": 0.02}

PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", hidden=128, intermediate=352, heads=4, layers=4, seq_len=128,
                   batch_size=16, steps=300, rank=32, update_proj_gap=50, lr=_TINY_LR,
                   eval_every=50, eval_batches=8),
    # memopt compare's default: the tiny model on half the batch (8 x 128 bytes, 300 steps),
    # six optimizers in 2.5 to 3.5 minutes on a 2-core CPU; one seed, so it tells the methods
    # apart but ranks close ones (muon and polargrad) by chance (README).
    "quick": Preset("quick", hidden=128, intermediate=352, heads=4, layers=4, seq_len=128,
                    batch_size=8, steps=300, rank=32, update_proj_gap=50, lr=_TINY_LR,
                    eval_every=30, eval_batches=8),
    "small": Preset("small", hidden=384, intermediate=1024, heads=6, layers=6, seq_len=256,
                    batch_size=32, steps=2000, rank=96, update_proj_gap=200, lr=_SMALL_LR,
                    eval_every=200, eval_batches=16),
    "60m": Preset("60m", 512, 1376, 8, 8, 256, 64, 10_000, 128, 200, _PAPER_LR, eval_every=500),
    "130m": Preset("130m", 768, 2048, 12, 12, 256, 64, 20_000, 256, 200, _PAPER_LR,
                   eval_every=1000),
    "350m": Preset("350m", 1024, 2736, 16, 24, 256, 64, 60_000, 256, 200, _PAPER_LR,
                   eval_every=2000),
    "1b": Preset("1b", 2048, 5461, 32, 24, 256, 64, 100_000, 512, 200, _PAPER_LR,
                 eval_every=5000),
}


def get_preset(name: str, **overrides: Any) -> Preset:
    """A preset by name, with fields replaced by ``overrides`` (None values ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})

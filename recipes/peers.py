"""The peers the recipes train beside memopt, each built as its own README builds it.

- ``peer-galore-torch``: galore-torch's ``GaLoreAdamW`` (Zhao et al.'s package); the Linear
  weights of modules named "attn" or "mlp" in a group with ``rank``, ``update_proj_gap``,
  ``scale`` and ``proj_type="std"``, every other parameter in a plain group.
- ``peer-fira``: the fira package's ``FiraAdamW``, the same groups with fira's ``alpha``.
- ``peer-torch-muon``: ``torch.optim.Muon`` (its defaults, weight decay 0.1 included) on the
  hidden matrices of :func:`memopt.optim.param_groups`, and a fused (on CUDA) ``AdamW`` on the
  rest, stepped as one optimizer (:class:`Together`).

A peer that is not installed is a clear error naming the package. memopt's ``bitsandbytes``
AdamW8bit and torch AdamW are in memopt's own registry ("adamw8bit", "adamw"). Peers are
imported through :func:`import_peer`, which imports bitsandbytes (galore-torch imports it)
through memopt's quiet import first.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch

#: peer name -> (module it needs, pip package, family of the preset's learning rate)
PEERS: dict[str, tuple[str, str, str]] = {
    "peer-galore-torch": ("galore_torch", "galore-torch", "lowrank"),
    "peer-fira": ("fira", "fira", "lowrank"),
    "peer-torch-muon": ("torch", "torch", "muon"),
}


def is_peer(name: str) -> bool:
    return name in PEERS


def recipe_optimizers() -> tuple[str, ...]:
    """Every name the recipes train with: memopt's registry, then the peers."""
    from ..optim import OPTIMIZER_NAMES
    return tuple(OPTIMIZER_NAMES) + tuple(PEERS)


def build_optimizer(name: str, model: torch.nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
    """A peer (:func:`build_peer`) or memopt's ``create_optimizer(name, model, **kwargs)``."""
    if is_peer(name):
        return build_peer(name, model, **kwargs)
    from ..optim import create_optimizer
    return create_optimizer(name, model, **kwargs)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """``memopt.optim.state_bytes`` for memopt's optimizers, :func:`peer_state_bytes` else."""
    from ..optim import state_bytes
    from ..optim.engine import MemoptOptimizer
    return state_bytes(opt) if isinstance(opt, MemoptOptimizer) else peer_state_bytes(opt)


def import_peer(module: str) -> Any:
    """Import a peer's package (ImportError when missing). bitsandbytes, which galore-torch
    imports when it is imported, is imported first through memopt's quiet import
    (``states.import_bitsandbytes``), so its CPU 4-bit-kernel notice is not printed."""
    if importlib.util.find_spec("bitsandbytes") is not None:
        from ..optim.states import import_bitsandbytes
        import_bitsandbytes(module)
    return importlib.import_module(module)


def peer_available(name: str) -> bool:
    module = PEERS[name][0]
    return module == "torch" and hasattr(torch.optim, "Muon") or \
        module != "torch" and importlib.util.find_spec(module) is not None


class Together(torch.optim.Optimizer):
    """Several optimizers stepped as one. Their param groups are this optimizer's (a
    scheduler sets the lr of each); ``state_dict`` holds each one's."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        super().__init__([p for o in optimizers for g in o.param_groups for p in g["params"]], {})
        self.param_groups = [g for o in optimizers for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        with torch.enable_grad():
            loss = None if closure is None else closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            optimizer.load_state_dict(state)
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]


def peer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in an optimizer's state, each counted once, looking inside the
    objects peers keep there (galore-torch's projector and its basis) and inside
    :class:`Together`."""
    seen: set[int] = set()

    def walk(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            if id(value) in seen:
                return 0
            seen.add(id(value))
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        if hasattr(value, "__dict__"):
            return walk(vars(value))
        return 0

    optimizers = opt.optimizers if isinstance(opt, Together) else [opt]
    return sum(walk(s) for o in optimizers for s in o.state.values())


def projected_groups(model: torch.nn.Module, **projection: Any) -> list[dict[str, Any]]:
    """galore-torch's and fira's README groups for a LLaMA: the weights of the nn.Linear
    modules whose name contains "attn" or "mlp" with ``projection``, the rest plain."""
    chosen = [m.weight for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and any(k in name for k in ("attn", "mlp"))]
    ids = {id(p) for p in chosen}
    return [{"params": [p for p in model.parameters() if id(p) not in ids]},
            {"params": chosen, **projection, "proj_type": "std"}]


def build_peer(name: str, model: torch.nn.Module, lr: float, rank: int | None = None,
               update_proj_gap: int = 200, scale: float = 0.25, adamw_lr: float = 3e-4,
               **options: Any) -> torch.optim.Optimizer:
    """The peer ``name`` for ``model`` with the preset's rate (and low-rank settings);
    ``options`` go to the peer's constructor (the matrix optimizer, for torch-muon)."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose one of {', '.join(PEERS)}")
    module, package, _ = PEERS[name]
    if not peer_available(name):
        raise ValueError(f"{name} needs {package}: pip install {package}")
    if name == "peer-torch-muon":
        from ..optim import param_groups
        hidden, rest = ([p[1] if isinstance(p, tuple) else p for p in g["params"]]
                        for g in param_groups(model))
        return Together([torch.optim.Muon(hidden, lr=lr, **options),
                         torch.optim.AdamW(rest, lr=adamw_lr, betas=(0.9, 0.95),
                                           fused=all(p.is_cuda for p in rest))])
    if name == "peer-galore-torch":
        galore_torch = import_peer("galore_torch")
        groups = projected_groups(model, rank=rank, update_proj_gap=update_proj_gap, scale=scale)
        return galore_torch.GaLoreAdamW(groups, lr=lr, no_deprecation_warning=True, **options)
    fira = import_peer("fira")
    groups = projected_groups(model, rank=rank, update_proj_gap=update_proj_gap, alpha=scale)
    return fira.FiraAdamW(groups, lr=lr, no_deprecation_warning=True, **options)

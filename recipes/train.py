"""Pretrain a byte-level LLaMA with any optimizer of the registry: the `memopt train` job.

A model built from a ``transformers.LlamaConfig`` (no download) learns next-byte prediction
on a corpus from :mod:`.data`, with linear warm-up and cosine decay to 10% of the learning
rate. Every run logs JSON lines and can checkpoint model, optimizer and scheduler in files
that load with ``torch.load(weights_only=True)``; ``--resume`` continues exactly where a
checkpoint stopped (batches depend only on the seed and the step). What makes a run what it
is (:func:`run_identity`) is kept beside the checkpoint in ``config.json``, so that a resume
under other arguments is refused before anything is loaded.

With ``quantize_weights`` (8 or 16) the model's linear layers but the output head keep their
weights in INT8 codes + per-group scales (or bf16) from the moment it is built
(``memopt.quantize_weights``), trained with stochastic (or nearest) rounding; the codes and
the rounding generator's state are part of the checkpoint.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..optim import step_in_backward

from .arguments import settings_for
from .data import ByteCorpus, batch_at, eval_batches, load_corpus
from .peers import build_optimizer, is_peer, optimizer_state_bytes
from .presets import Preset, get_preset
from .machine import resolve_device

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
#: What a run leaves in its folder (FSDP2 adds the folder "sharded").
RUN_FILES = (CHECKPOINT, LOG, SUMMARY, CONFIG)
LN2 = math.log(2)


class CheckpointMismatch(ValueError):
    """A checkpoint that cannot be loaded into the run asked for (another model or optimizer)."""


class Diverged(RuntimeError):
    """Training stopped at ``step`` on a non-finite loss or gradient (learning rate too high?)."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"training diverged at step {step}: {reason}")
        self.step = step


@dataclass
class RunConfig:
    """One training run."""

    optimizer: str = "galore"
    preset: str = "tiny"
    lr: float | None = None
    rank: int | None = None
    steps: int | None = None
    data: str | None = None
    warmup: float | None = None             # fraction of the steps; None: the preset's
    device: str = "auto"
    out: str | None = None
    seed: int = 0
    resume: bool = False
    checkpoint_every: int | None = None     # also always at the end when out is set
    progress: bool = True
    per_layer: bool = False                 # update each parameter during backward
    activation_checkpointing: bool = False
    distributed: str | None = None          # "ddp" or "fsdp", under torchrun
    quantize_weights: int | None = None     # 8 (INT8 codes) or 16 (bf16); None: full precision
    weight_rounding: str | None = None      # with quantize_weights; None: "stochastic"
    #: extra optimizer arguments: KEY for every optimizer, NAME.KEY for optimizer NAME only
    optimizer_options: dict[str, Any] = field(default_factory=dict)


#: run_identity's fields -> the `memopt train` flag that sets each
IDENTITY_FLAGS = {"optimizer": "--optimizer", "preset": "--preset", "steps": "--steps",
                  "lr": "--lr", "rank": "--rank", "seed": "--seed", "data": "--data",
                  "warmup": "--warmup", "options": "--set", "fsdp": "--fsdp",
                  "device": "--device", "per_layer": "--per-layer",
                  "activation_checkpointing": "--activation-checkpointing",
                  "quantize_weights": "--quantize-weights",
                  "weight_rounding": "--weight-rounding"}
#: An identity field a run recorded before the field existed had this value.
IDENTITY_DEFAULTS = {"quantize_weights": None, "weight_rounding": None}
#: --quantize-weights' bits -> what the summary calls the weights.
WEIGHT_FORMATS = {8: "int8", 16: "bf16"}
WEIGHT_ROUNDINGS = ("stochastic", "nearest")


def run_identity(config: RunConfig, measured: bool = False) -> dict[str, Any]:
    """What makes ``config`` the run it is, with the preset's defaults resolved (a rate left
    to the preset and the same rate given by --lr are one run): optimizer, preset, steps,
    lr, rank, seed, data, warm-up, the optimizer's --set options, FSDP (its checkpoint is
    sharded) and the quantized weights with their rounding.
    With ``measured``, also what changes the measured times and memory (device, per-layer,
    activation checkpointing), which a resumed run may change but a kept result may not.
    JSON values, as read back from ``config.json``."""
    preset = get_preset(config.preset, steps=config.steps, warmup=config.warmup)
    options = settings_for(config.optimizer_options, config.optimizer)
    kwargs = {**preset.optimizer_kwargs(config.optimizer, config.lr, config.rank), **options}
    identity = {"optimizer": config.optimizer, "preset": config.preset, "steps": preset.steps,
                "lr": kwargs["lr"], "rank": kwargs.get("rank"), "seed": config.seed,
                "data": config.data or "stdlib", "warmup": preset.warmup,
                "options": {k: v for k, v in options.items() if k not in ("lr", "rank")},
                "fsdp": config.distributed == "fsdp",
                "quantize_weights": config.quantize_weights,
                "weight_rounding": weight_rounding(config)}
    if measured:
        identity.update(device=config.device, per_layer=config.per_layer,
                        activation_checkpointing=config.activation_checkpointing)
    return json.loads(json.dumps(identity, default=repr))


def config_from(record: Any) -> RunConfig | None:
    """The RunConfig of a ``summary["config"]`` record (unknown fields dropped), or None."""
    if not isinstance(record, dict):
        return None
    known = {k: v for k, v in record.items() if k in RunConfig.__dataclass_fields__}
    try:
        return RunConfig(**known)
    except TypeError:
        return None


def recorded_identity(folder: str | Path, measured: bool = False) -> dict[str, Any] | None:
    """The :func:`run_identity` of the run in ``folder``: its ``config.json``, else (folders
    written before it existed) the config in its ``summary.json``; None when neither says."""
    folder = Path(folder)
    try:
        return json.loads((folder / CONFIG).read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        config = config_from(json.loads((folder / SUMMARY).read_text())["config"])
        return run_identity(config, measured) if config else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def weight_rounding(config: RunConfig) -> str | None:
    """How the run's quantized weights are rounded ("stochastic" unless said); None when its
    weights are not quantized."""
    if config.quantize_weights is None:
        return None
    return config.weight_rounding or "stochastic"


def identity_differences(recorded: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """Each field where two identities differ, as flags: "--optimizer dct, not galore";
    "without --quantize-weights, not with --quantize-weights 8". A field the recorded run
    predates is compared with its :data:`IDENTITY_DEFAULTS` value, else skipped."""
    def shown(value: Any) -> str:
        if isinstance(value, dict):
            return " ".join(f"{k}={v!r}" for k, v in value.items()) or "none"
        return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
    parts = []
    for key, new in requested.items():
        if key not in recorded and key not in IDENTITY_DEFAULTS:
            continue
        flag, old = IDENTITY_FLAGS.get(key, key), recorded.get(key, IDENTITY_DEFAULTS.get(key))
        if old == new:
            continue
        if isinstance(new, bool):
            parts.append(f"{'with' if old else 'without'} {flag}")
        elif key in IDENTITY_DEFAULTS and None in (old, new):
            parts.append(f"without {flag}, not with {flag} {shown(new)}" if old is None
                         else f"with {flag} {shown(old)}, not without it")
        else:
            parts.append(f"with {flag} {shown(old)}, not {shown(new)}")
    return parts


def quantized_weights_refusal(config: RunConfig) -> tuple[str, str] | None:
    """Why ``config``'s quantized weights cannot be trained as asked, as (the flag, what is
    wrong), or None. Only memopt's optimizers round an updated quantized weight back into
    its codes in ``step()``; any other torch optimizer does so under ``step_in_backward``
    (--per-layer), which the peers do not run with. FSDP and DDP are not supported with
    quantized weights."""
    flag = "--quantize-weights"
    if config.quantize_weights is None:
        return None if config.weight_rounding is None else (
            "--weight-rounding", "says how quantized weights are rounded; it needs "
                                 "--quantize-weights 8 or 16")
    if config.quantize_weights not in WEIGHT_FORMATS:
        return flag, (f"must be one of {', '.join(map(str, WEIGHT_FORMATS))}, got "
                      f"{config.quantize_weights!r}")
    if weight_rounding(config) not in WEIGHT_ROUNDINGS:
        return "--weight-rounding", (f"must be one of {', '.join(WEIGHT_ROUNDINGS)}, got "
                                     f"{config.weight_rounding!r}")
    if config.distributed:
        return flag, (f"not with --{config.distributed}: quantized layers are not sharded or "
                      "kept in step across processes; train on one device")
    if is_peer(config.optimizer):
        return flag, (f"{config.optimizer}'s step() does not update quantized weights, and "
                      "the peers run without --per-layer; use a memopt optimizer")
    if not config.per_layer and not is_memopt_optimizer(config.optimizer):
        return flag, (f"{config.optimizer} is not a memopt optimizer: its step() does not "
                      "update quantized weights; add --per-layer (each weight is then updated "
                      "in the backward pass on a full-precision copy and rounded back)")
    return None


def is_memopt_optimizer(name: str) -> bool:
    """Whether ``name`` (a registry name or composition) builds a memopt optimizer rather
    than a torch or bitsandbytes baseline; decided on a meta-device layer, no memory used."""
    from ..optim import create_optimizer
    from ..optim.engine import MemoptOptimizer
    with torch.device("meta"):
        layer = torch.nn.Linear(8, 8)
    try:
        with warnings.catch_warnings():       # (a layer this small is not projected: fine)
            warnings.simplefilter("ignore")
            return isinstance(create_optimizer(name, layer, lr=1e-3), MemoptOptimizer)
    except (ValueError, TypeError, ImportError):
        return False


def build_model(preset: Preset, device: torch.device, seed: int,
                quantize: int | None = None, rounding: str | None = None) -> torch.nn.Module:
    """A LLaMA of the preset's shape, initialised from ``seed``; with ``quantize`` (8 or 16)
    its linear layers but the head keep their weights quantized from then on, rounded by
    ``rounding`` (default stochastic) with noise seeded from ``seed``."""
    from transformers import LlamaForCausalLM

    from ..optim.quantize_model import quantize_weights
    torch.manual_seed(seed)
    model = LlamaForCausalLM(preset.llama_config()).to(device)
    if quantize is not None:
        quantize_weights(model, bits=quantize, rounding=rounding or "stochastic", seed=seed)
    return model


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of each decoder layer of a transformers model
    (``activation_checkpointing_enable``; ``gradient_checkpointing_enable`` before
    transformers 5 named it so)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights take: the parameters that hold their values, plus the codes
    and scales of each quantized layer (whose weight parameter holds none)."""
    from ..optim.quantized_weights import QuantizedLinear, QuantizedWeight
    held = [p for p in model.parameters() if not isinstance(p, QuantizedWeight)]
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            held += [b for b in (module.weight_codes, module.weight_scales) if b is not None]
    return sum(t.numel() * t.element_size() for t in held)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0.1 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def next_byte_loss(model: torch.nn.Module, inputs: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per byte) of the model's next-byte predictions."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if inputs.is_cuda else \
        torch.autocast("cpu", enabled=False)
    with autocast:
        logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device) -> float:
    """Mean validation loss over fixed batches."""
    was_training = model.training
    model.eval()
    losses = [float(next_byte_loss(model, x.to(device), y.to(device))) for x, y in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


class Run:
    """Model, optimizer, scheduler and data of one run; ``train()`` executes it."""

    def __init__(self, config: RunConfig, corpus: ByteCorpus | None = None) -> None:
        self.config = config
        self.preset = get_preset(config.preset, steps=config.steps, warmup=config.warmup)
        self.rank, self.world = 0, 1
        if config.distributed:
            self.rank, self.world, device = init_distributed(config.device)
        else:
            device = resolve_device(config.device)
        self.device = device
        refusal = quantized_weights_refusal(config)
        if refusal:
            raise ValueError("{}: {}".format(*refusal))
        self.corpus = corpus or load_corpus(config.data)
        # quantized before anything holds its weights: optimizer, wrapper, checkpoint
        self.model = build_model(self.preset, self.device, config.seed,
                                 config.quantize_weights, config.weight_rounding)
        if config.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.trained = self.model            # what forward runs: maybe a DDP wrapper
        if config.distributed:
            self.trained = wrap_model(self.model, config.distributed, self.device)
            if self.preset.batch_size % self.world:
                raise ValueError(f"batch size {self.preset.batch_size} does not split over "
                                 f"{self.world} ranks")
        kwargs = {**self.preset.optimizer_kwargs(config.optimizer, config.lr, config.rank),
                  **settings_for(config.optimizer_options, config.optimizer)}
        self.optimizer_kwargs = kwargs
        if is_peer(config.optimizer) and (config.per_layer or config.distributed == "fsdp"):
            raise ValueError(f"{config.optimizer} runs without --per-layer and --fsdp "
                             "(memopt's optimizers support both)")
        if config.resume and config.optimizer in ("peer-galore-torch", "peer-fira"):
            raise ValueError(f"--resume: {config.optimizer}'s state holds projector objects, "
                             "which torch.load(weights_only=True) refuses")
        self.optimizer = build_optimizer(config.optimizer, self.model, **kwargs)
        total, warmup = self.preset.steps, max(1, int(self.preset.warmup * self.preset.steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, total, warmup))
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.out = Path(config.out) if config.out else None
        # the checkpoint first: step_in_backward reads the param groups the optimizer loads
        private = self.load_checkpoint() if config.resume else None
        self.per_layer = step_in_backward(self.model, self.optimizer) if config.per_layer \
            else None
        if config.resume:
            self.load_per_layer_optimizers(private)

    def per_layer_optimizers(self) -> list[torch.optim.Optimizer]:
        """The private optimizers that hold the state under --per-layer when the optimizer
        is not memopt's (``step_in_backward`` gives any other one a copy per parameter), in
        the order of the model's parameters; empty otherwise."""
        if self.per_layer is None:
            return []
        owned = self.per_layer.optimizers
        return [owned[p] for p in self.model.parameters()
                if p in owned and owned[p] is not self.optimizer]

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        if self.out is None:
            raise ValueError("saving a checkpoint needs an output folder (--out)")
        self.out.mkdir(parents=True, exist_ok=True)
        if self.config.distributed == "fsdp":
            return save_sharded(self)
        if self.rank != 0:
            return self.out / CHECKPOINT
        path = self.out / CHECKPOINT
        tmp = path.with_suffix(".tmp")
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "step": self.step,
                 "history": self.history}
        private = self.per_layer_optimizers()
        if private:
            state["per_layer_optimizers"] = [o.state_dict() for o in private]
        torch.save(state, tmp)
        tmp.replace(path)
        return path

    def load_checkpoint(self) -> list[dict[str, Any]] | None:
        """Model, optimizer, scheduler, step and history from the checkpoint in ``out``;
        :class:`CheckpointMismatch` (one line) where it does not fit this run. Returns the
        states of the per-layer private optimizers it holds (for
        :meth:`load_per_layer_optimizers`), else None."""
        if self.out is None or not (self.out / CHECKPOINT).exists():
            raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {self.out}")
        with self._mismatch():
            if self.config.distributed == "fsdp":
                load_sharded(self)
                return None
            state = torch.load(self.out / CHECKPOINT, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.history = int(state["step"]), list(state["history"])
            return state.get("per_layer_optimizers")

    def load_per_layer_optimizers(self, states: list[dict[str, Any]] | None) -> None:
        """Give the per-layer private optimizers (:meth:`per_layer_optimizers`) the states a
        checkpoint saved; a resumed run that has them needs the checkpoint to hold them."""
        private = self.per_layer_optimizers()
        if not private and states is None:
            return
        with self._mismatch():
            if states is None or not private:
                raise ValueError(f"the checkpoint holds {len(states or [])} per-layer "
                                 f"optimizer states, this run has {len(private)}")
            for optimizer, saved in zip(private, states, strict=True):
                optimizer.load_state_dict(saved)

    @contextmanager
    def _mismatch(self) -> Iterator[None]:
        """Errors of loading the checkpoint as one :class:`CheckpointMismatch` line."""
        try:
            yield
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            said = " ".join(str(exc).split()) or type(exc).__name__
            said = said if len(said) <= 200 else said[:197] + "..."
            raise CheckpointMismatch(f"{CHECKPOINT} in {self.out} does not fit this run "
                                     f"({type(exc).__name__}: {said})") from exc

    def save_config(self) -> None:
        """``config.json``: this run's :func:`run_identity` (what a resume must match) and its
        whole config."""
        record = {"identity": run_identity(self.config), "config": asdict(self.config)}
        (self.out / CONFIG).write_text(json.dumps(record, indent=1, default=repr))

    # ------------------------------------------------------------------------ train
    def train(self, stop_after: int | None = None, label: str | None = None) -> dict[str, Any]:
        """Run to the preset's step count (or stop, checkpointed, after ``stop_after`` steps,
        to continue later with ``resume``); return the summary of :meth:`summary`.

        ``label`` names the progress bar (default: the optimizer). A non-finite loss or
        gradient raises :class:`Diverged` naming the step."""
        last = self.preset.steps if stop_after is None else min(stop_after, self.preset.steps)
        cfg, preset, device = self.config, self.preset, self.device
        val = eval_batches(self.corpus.val, preset.eval_batches, preset.batch_size,
                           preset.seq_len)
        lead = self.rank == 0
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
            if lead:
                self.save_config()
        fresh = self.step == 0 and not cfg.resume       # a new run starts a new log
        log = open(self.out / LOG, "w" if fresh else "a") if self.out and lead else None
        bar = _progress(cfg.progress and lead, preset.steps, self.step, label or cfg.optimizer)
        share = preset.batch_size // self.world
        eval_every = preset.eval_interval()
        postfix: dict[str, str] = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            while self.step < last:
                x, y = batch_at(self.corpus.train, self.step, preset.batch_size,
                                preset.seq_len, cfg.seed, device)
                x, y = (t[self.rank * share:(self.rank + 1) * share] for t in (x, y))
                start = time.perf_counter()
                if self.per_layer is None:
                    self.optimizer.zero_grad(set_to_none=True)
                loss = next_byte_loss(self.trained, x, y)
                try:
                    loss.backward()                 # per-layer: the update happens here
                    if self.per_layer is None:
                        self.optimizer.step()
                except FloatingPointError as exc:
                    raise Diverged(self.step + 1, str(exc)) from exc
                self.scheduler.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                ms = (time.perf_counter() - start) * 1e3
                if not math.isfinite(loss.item()):
                    raise Diverged(self.step + 1, f"the loss is {loss.item()}")
                self.step += 1
                record = {"step": self.step, "loss": loss.item(), "ms": ms,
                          "lr": self.scheduler.get_last_lr()[0]}
                if self.step % eval_every == 0 or self.step == preset.steps:
                    record["val_loss"] = evaluate(self.trained, val, device)
                    postfix["val_bpb"] = f"{record['val_loss'] / LN2:.3f}"
                self.history.append(record)
                if log:
                    log.write(json.dumps(record) + "\n")
                if bar is not None:
                    postfix["bpb"] = f"{record['loss'] / LN2:.3f}"
                    postfix["ms"] = f"{ms:.0f}"
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
                if self.out and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if log:
                log.close()
        if self.out:
            self.save_checkpoint()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """Final train loss (mean of the last 10 steps), validation loss (nats per byte, and
        in bits per byte: divided by ln 2), median ms per step (after the first 5),
        optimizer-state MB, the weights' format ("full precision", "int8", "bf16"), rounding
        and MB and, on CUDA only, peak GPU MB."""
        losses = [h["loss"] for h in self.history[-10:]]
        vals = [h for h in self.history if "val_loss" in h]
        times = sorted(h["ms"] for h in self.history[5:]) or [math.nan]
        n_params = sum(p.numel() for p in self.model.parameters())
        out = {"optimizer": self.config.optimizer, "preset": self.preset.name,
               "steps": self.step, "parameters": n_params,
               "train_loss": sum(losses) / max(1, len(losses)),
               "val_loss": vals[-1]["val_loss"] if vals else math.nan,
               "ms_per_step": times[len(times) // 2],
               "optimizer_state_mb": sum(optimizer_state_bytes(o) for o in
                                         [self.optimizer, *self.per_layer_optimizers()]) / 2**20,
               "lr": self.optimizer_kwargs["lr"],
               "weights": WEIGHT_FORMATS.get(self.config.quantize_weights, "full precision"),
               "weight_rounding": weight_rounding(self.config),
               "weights_mb": weight_bytes(self.model) / 2**20,
               "config": asdict(self.config), "corpus": self.corpus.describe(),
               "history": self.history}
        out["train_bits_per_byte"] = out["train_loss"] / LN2
        out["val_bits_per_byte"] = out["val_loss"] / LN2
        if self.device.type == "cuda":
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """Join the torchrun process group: NCCL and this rank's GPU on CUDA, gloo on the CPU."""
    import os

    import torch.distributed as dist
    if "RANK" not in os.environ:
        raise SystemExit("--ddp / --fsdp need torchrun (torchrun --nproc_per_node N -m "
                         "memopt.recipes train ...)")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    where = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), where


def wrap_model(model: torch.nn.Module, mode: str, device: torch.device) -> torch.nn.Module:
    """DDP around the model, or FSDP2 (``fully_shard``) on each decoder layer and the root."""
    import torch.distributed as dist
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode != "fsdp":
        raise ValueError(f"distributed must be 'ddp' or 'fsdp', got {mode!r}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def save_sharded(run: "Run") -> Path:
    """FSDP2: model and optimizer through torch.distributed.checkpoint, the rest on rank 0."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(run.model, run.optimizer)
    where = run.out / "sharded"
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(where))
    if run.rank == 0:
        torch.save({"scheduler": run.scheduler.state_dict(), "step": run.step,
                    "history": run.history}, run.out / CHECKPOINT)
    dist.barrier()
    return where


def load_sharded(run: "Run") -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    if run.out is None or not (run.out / CHECKPOINT).exists():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {run.out}")
    model_state, optim_state = get_state_dict(run.model, run.optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(run.out / "sharded"))
    set_state_dict(run.model, run.optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    rest = torch.load(run.out / CHECKPOINT, map_location="cpu", weights_only=True)
    run.scheduler.load_state_dict(rest["scheduler"])
    run.step, run.history = int(rest["step"]), list(rest["history"])


def _progress(enabled: bool, total: int, initial: int, name: str) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True,
                leave=True)


def train(config: RunConfig, corpus: ByteCorpus | None = None,
          label: str | None = None) -> dict[str, Any]:
    """Build a :class:`Run` and train it; returns its summary."""
    return Run(config, corpus).train(label=label)

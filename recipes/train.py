"""Pretrain a byte-level LLaMA with any optimizer of the registry: the `memopt train` job.

A model built from a ``transformers.LlamaConfig`` (no download) learns next-byte prediction
on a corpus from :mod:`.data`, with linear warm-up and cosine decay to 10% of the learning
rate. Every run logs JSON lines and can checkpoint model, optimizer and scheduler in files
that load with ``torch.load(weights_only=True)``; ``--resume`` continues exactly where a
checkpoint stopped (batches depend only on the seed and the step). What makes a run what it
is (:func:`run_identity`) is kept beside the checkpoint in ``config.json``, so that a resume
under other arguments is refused before anything is loaded.
"""

from __future__ import annotations

import json
import math
import time
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
    #: extra optimizer arguments: KEY for every optimizer, NAME.KEY for optimizer NAME only
    optimizer_options: dict[str, Any] = field(default_factory=dict)


#: run_identity's fields -> the `memopt train` flag that sets each
IDENTITY_FLAGS = {"optimizer": "--optimizer", "preset": "--preset", "steps": "--steps",
                  "lr": "--lr", "rank": "--rank", "seed": "--seed", "data": "--data",
                  "warmup": "--warmup", "options": "--set", "fsdp": "--fsdp",
                  "device": "--device", "per_layer": "--per-layer",
                  "activation_checkpointing": "--activation-checkpointing"}


def run_identity(config: RunConfig, measured: bool = False) -> dict[str, Any]:
    """What makes ``config`` the run it is, with the preset's defaults resolved (a rate left
    to the preset and the same rate given by --lr are one run): optimizer, preset, steps,
    lr, rank, seed, data, warm-up, the optimizer's --set options and FSDP (its checkpoint is
    sharded).
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
                "fsdp": config.distributed == "fsdp"}
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


def identity_differences(recorded: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """Each field where two identities differ, as flags: "--optimizer dct, not galore"."""
    def shown(value: Any) -> str:
        if isinstance(value, dict):
            return " ".join(f"{k}={v!r}" for k, v in value.items()) or "none"
        return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
    parts = []
    for key, new in requested.items():
        if key not in recorded or recorded[key] == new:
            continue
        flag, old = IDENTITY_FLAGS.get(key, key), recorded[key]
        parts.append(f"{'with' if old else 'without'} {flag}" if isinstance(new, bool)
                     else f"with {flag} {shown(old)}, not {shown(new)}")
    return parts


def build_model(preset: Preset, device: torch.device, seed: int) -> torch.nn.Module:
    """A LLaMA of the preset's shape, initialised from ``seed``."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(preset.llama_config()).to(device)


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
        self.corpus = corpus or load_corpus(config.data)
        self.model = build_model(self.preset, self.device, config.seed)
        if config.activation_checkpointing:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
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
        if config.resume:
            self.load_checkpoint()
        self.per_layer = step_in_backward(self.model, self.optimizer) if config.per_layer \
            else None

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
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "step": self.step,
                    "history": self.history}, tmp)
        tmp.replace(path)
        return path

    def load_checkpoint(self) -> None:
        """Model, optimizer, scheduler, step and history from the checkpoint in ``out``;
        :class:`CheckpointMismatch` (one line) where it does not fit this run."""
        if self.out is None or not (self.out / CHECKPOINT).exists():
            raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {self.out}")
        try:
            if self.config.distributed == "fsdp":
                load_sharded(self)
                return
            state = torch.load(self.out / CHECKPOINT, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.history = int(state["step"]), list(state["history"])
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
        optimizer-state MB and, on CUDA only, peak GPU MB."""
        losses = [h["loss"] for h in self.history[-10:]]
        vals = [h for h in self.history if "val_loss" in h]
        times = sorted(h["ms"] for h in self.history[5:]) or [math.nan]
        n_params = sum(p.numel() for p in self.model.parameters())
        out = {"optimizer": self.config.optimizer, "preset": self.preset.name,
               "steps": self.step, "parameters": n_params,
               "train_loss": sum(losses) / max(1, len(losses)),
               "val_loss": vals[-1]["val_loss"] if vals else math.nan,
               "ms_per_step": times[len(times) // 2],
               "optimizer_state_mb": optimizer_state_bytes(self.optimizer) / 2**20,
               "lr": self.optimizer_kwargs["lr"],
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

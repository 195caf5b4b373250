"""Contrastive training of a CLIP on captioned images, from scratch or from a checkpoint, with exact resume.

One run writes into its output folder:
- `train_state.pt`: model, optimiser, scheduler, scaler, step/epoch/position and random states, rewritten
  atomically every `checkpoint_every` steps and at each epoch end; re-running the same command resumes from it;
- `config.json` + `model.safetensors`: the model in clipsearch's checkpoint format after each epoch
  (`load_model(out_dir)` loads it);
- `metrics.jsonl`: one line per `log_every` steps (`"kind": "train"`) and per epoch (`"kind": "eval"`, with
  recall@1/5/10 both ways on the held-out set).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from retrieval.errors import TrainingError, UnknownModelError
from retrieval.metrics import recall_at_k
from retrieval.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_checkpoint
from retrieval.model.clip import CLIP
from retrieval.model.config import PRESETS, CLIPConfig, TextConfig, VisionConfig
from retrieval.model.loading import load_model, resolve_device
from retrieval.model.preprocess import Preprocess
from retrieval.training.data import PairSet, load_pair_set, parse_source
from retrieval.training.optim import build_optimizer, clamp_logit_scale, clip_loss
from retrieval.training.state import load_state, rng_states, save_state, set_rng_states

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RECALL_KS = (1, 5, 10)
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
MAX_VAL_SPLIT = 1000  # at most this many pairs are held out when no validation set is given

# Architectures to train from scratch, besides the model presets. shapes-mini is sized for 64 px generated
# scenes and <= 10 MB as float16: the text tower's 49408-row token embedding dominates (3.2M of 4.7M
# parameters at width 64). Its image tower is OpenAI's ModifiedResNet at 1/4 of RN50's width with one block
# per stage, which learned faster per CPU second than a ViT of similar size in our trials.
SCRATCH_CONFIGS: dict[str, CLIPConfig] = {
    "shapes-mini": CLIPConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=64, width=16, layers=(1, 1, 1, 1), heads=8, patch_size=None),
        text=TextConfig(width=64, heads=1, layers=4),
    ),
}
# Settings that may change between a run and its resumption without changing what it computes.
_RESUME_NEUTRAL = frozenset({"out_dir", "checkpoint_every", "log_every", "device"})


def scratch_config(name: str) -> CLIPConfig:
    """The architecture named `name` (a training config like "shapes-mini" or a model preset like "tiny-vit").

    Raises:
        UnknownModelError: no such name.
    """
    configs = SCRATCH_CONFIGS | PRESETS
    if name not in configs:
        raise UnknownModelError(f"unknown architecture {name!r}; available: {', '.join(configs)}")
    return configs[name]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (the same config resumes the same run)."""

    data: str  # a .jsonl/.csv manifest, a folder of images with .txt captions, or shapes:N[:SEED]
    out_dir: str  # the run's folder: training state, metrics and the trained checkpoint
    val: str | None = None  # a held-out set in the same forms; None holds out `val_fraction` of `data`
    val_fraction: float = 0.05  # share of `data` held out for recall@k when `val` is None (0: no evaluation)
    model: str = "tiny-vit"  # architecture to train from scratch (see `scratch_config`)
    init_from: str | None = None  # checkpoint path or model name to fine-tune instead (anything load_model takes)
    epochs: int = 10  # passes over the training set
    batch_size: int = 128  # pairs per step; each is contrasted against the others of its batch
    lr: float = 5e-4  # peak learning rate
    weight_decay: float = 0.2  # AdamW decay of weight matrices
    warmup: int | None = None  # linear warm-up steps; None: 5% of the run
    grad_clip: float = 1.0  # maximum global gradient norm
    max_shift: int | None = None  # random translation in pixels; None: image_size // 16
    seed: int = 0  # seeds initialisation, data order, held-out split and augmentation
    checkpoint_every: int = 100  # steps between training-state checkpoints (also written at each epoch end)
    log_every: int = 50  # steps between "train" lines in metrics.jsonl
    device: str = "auto"  # "auto" (CUDA, else MPS, else CPU), "cpu", "cuda", "cuda:1", ...
    save_dtype: str = "float32"  # storage dtype of the trained checkpoint: "float32" or "float16"
    name: str | None = None  # name recorded in the checkpoint; default: the output folder's name
    description: str = ""  # one line recorded in the checkpoint

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return dataclasses.asdict(self)


class TrainResult(NamedTuple):
    """What a finished run reports."""

    out_dir: Path  # the folder holding the trained checkpoint
    steps: int  # optimiser steps of the whole run
    final_loss: float  # loss of the last step
    epoch_loss: float  # mean loss of the last epoch
    metrics: dict[str, float]  # the last held-out evaluation ({} without a held-out set)
    resumed_from: int | None  # the step this invocation resumed from, None if it started fresh
    images_per_second: float  # training throughput of this invocation (0 if it trained nothing)


def train(
    config: TrainConfig,
    progress: bool = True,
    on_checkpoint: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train (or resume training) a CLIP with the contrastive loss.

    Args:
        config: the run; if `config.out_dir` holds a training state of the same run, it resumes from there.
        progress: show progress bars on stderr.
        on_checkpoint: called with the step number after each training-state checkpoint is written.

    Returns:
        The finished run's figures.

    Raises:
        TrainingError: bad data, or `out_dir` holds a run with different settings or files no run wrote.
        UnknownModelError: `config.model` names no architecture.
    """
    if config.save_dtype not in SAVE_DTYPES:
        raise TrainingError(f"save_dtype {config.save_dtype!r} is not one of {', '.join(SAVE_DTYPES)}")
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = load_state(out)
    if saved is not None:
        _check_same_run(saved["config"], config, out)
    elif any((out / name).exists() for name in (CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE)):
        raise TrainingError(
            f"{out} already holds a model or metrics that no resumable run of this trainer wrote; "
            "choose another --out folder (training would overwrite them)"
        )
    device = resolve_device(config.device)

    torch.manual_seed(config.seed)
    model = _initial_model(config, device)
    preprocess = Preprocess.from_config(model.config)
    train_set, val_set = _load_sets(config, preprocess, model.config.text.context_length, progress)
    batch_size = min(config.batch_size, len(train_set))
    steps_per_epoch = len(train_set) // batch_size
    total_steps = config.epochs * steps_per_epoch
    warmup = config.warmup if config.warmup is not None else round(0.05 * total_steps)
    max_shift = config.max_shift if config.max_shift is not None else preprocess.image_size // 16
    optimizer, scheduler = build_optimizer(model, config.lr, config.weight_decay, warmup, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")

    # Everything about the run's progress that a checkpoint must carry besides the tensors.
    run = {"step": 0, "epoch": 0, "position": 0, "epoch_loss_sum": 0.0, "log_loss_sum": 0.0, "last_loss": math.nan}
    run |= {"last_epoch_loss": math.nan, "train_seconds": 0.0, "metrics": {}}
    resumed_from = None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        set_rng_states(saved["rng"])
        run = saved["run"]
        resumed_from = run["step"]
        logger.info(
            "resuming %s from step %d (epoch %d, batch %d)", out, run["step"], run["epoch"] + 1, run["position"]
        )
    _trim_metrics(out / METRICS_FILE, run["step"])

    def checkpoint() -> None:
        state = {"config": config.to_dict(), "run": run, "rng": rng_states(), "model": model.state_dict()}
        state |= {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
        }
        save_state(state, out)
        if on_checkpoint is not None:
            on_checkpoint(run["step"])

    name = config.name or out.resolve().name
    bar = tqdm(total=total_steps, initial=run["step"], unit="step", disable=not progress, dynamic_ncols=True)
    images, seconds = 0, 0.0
    model.train()
    while run["epoch"] < config.epochs:
        order = train_set.order(_generator(config.seed, run["epoch"]))
        bar.set_description(f"epoch {run['epoch'] + 1}/{config.epochs}")
        while run["position"] < steps_per_epoch:
            start = time.perf_counter()
            indices = order[run["position"] * batch_size : (run["position"] + 1) * batch_size]
            shift_rng = _generator(config.seed, run["epoch"], run["position"])
            pixels, tokens = train_set.batch(indices, max_shift, shift_rng)
            loss = _step(model, optimizer, scheduler, scaler, pixels.to(device), tokens.to(device), config.grad_clip)
            elapsed = time.perf_counter() - start
            images, seconds = images + len(indices), seconds + elapsed
            run["step"] += 1
            run["position"] += 1
            run["train_seconds"] += elapsed
            run["last_loss"] = loss
            run["epoch_loss_sum"] += loss
            run["log_loss_sum"] += loss
            lr = scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images / max(seconds, 1e-9):.0f}")
            if run["step"] % config.log_every == 0:
                record = {"kind": "train", "epoch": run["epoch"] + 1, "step": run["step"]}
                record |= {"loss": run["log_loss_sum"] / config.log_every, "lr": lr, "images_per_s": images / seconds}
                _append_metrics(out, record)
                run["log_loss_sum"] = 0.0
            if run["step"] % config.checkpoint_every == 0 and run["position"] < steps_per_epoch:
                checkpoint()
        epoch_loss = run["epoch_loss_sum"] / steps_per_epoch
        metrics = evaluate(model, val_set) if val_set is not None else {}
        record = {"kind": "eval", "epoch": run["epoch"] + 1, "step": run["step"], "train_loss": epoch_loss}
        record |= {"lr": scheduler.get_last_lr()[0], "logit_scale": float(model.logit_scale.detach().exp())} | metrics
        record |= {"train_seconds": round(run["train_seconds"], 2)}
        _append_metrics(out, record)
        logger.info("epoch %d/%d: %s", run["epoch"] + 1, config.epochs, _summary(record))
        if progress:
            bar.write(f"epoch {run['epoch'] + 1}/{config.epochs}: {_summary(record)}", file=sys.stderr)
        run |= {"epoch": run["epoch"] + 1, "position": 0, "epoch_loss_sum": 0.0, "metrics": metrics}
        run["last_epoch_loss"] = epoch_loss
        save_checkpoint(model, out, name=name, description=config.description, dtype=SAVE_DTYPES[config.save_dtype])
        checkpoint()
    bar.close()
    return TrainResult(
        out_dir=out,
        steps=run["step"],
        final_loss=run["last_loss"],
        epoch_loss=run["last_epoch_loss"],
        metrics=run["metrics"],
        resumed_from=resumed_from,
        images_per_second=images / seconds if seconds else 0.0,
    )


def _step(
    model: CLIP,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    pixels: torch.Tensor,
    tokens: torch.Tensor,
    grad_clip: float,
) -> float:
    """One optimisation step (fp16 autocast and loss scaling on CUDA); returns the batch's loss."""
    cuda = pixels.device.type == "cuda"
    with torch.autocast(pixels.device.type, dtype=torch.float16, enabled=cuda):
        logits_per_image, logits_per_text = model(pixels, tokens)
        loss = clip_loss(logits_per_image, logits_per_text)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    clamp_logit_scale(model)
    return float(loss.detach())


@torch.no_grad()
def evaluate(model: CLIP, pairs: PairSet, batch_size: int = 256) -> dict[str, float]:
    """Recall@1/5/10 of text->image and image->text retrieval within a held-out set.

    Each caption's relevant images are its own and any other with the very same caption text (no model can
    tell those apart); likewise for each image's relevant captions.

    Returns:
        {"t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"} as fractions.
    """
    was_training = model.training
    model.eval()
    device = model.logit_scale.device
    image_parts, text_parts = [], []
    for start in range(0, len(pairs), batch_size):
        indices = torch.arange(start, min(start + batch_size, len(pairs)))
        pixels, tokens = pairs.batch(indices)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            image_parts.append(model.encode_image(pixels.to(device)).cpu())
            text_parts.append(model.encode_text(tokens.to(device)).cpu())
    model.train(was_training)
    similarity = torch.cat(text_parts) @ torch.cat(image_parts).T  # [N texts, N images]
    caption_ids = {}
    ids = torch.tensor([caption_ids.setdefault(c, len(caption_ids)) for c in pairs.captions])
    same_caption = ids[:, None] == ids[None, :]  # [N, N], symmetric
    text_to_image = recall_at_k(similarity, same_caption, RECALL_KS)
    image_to_text = recall_at_k(similarity.T, same_caption, RECALL_KS)
    return {f"t2i_r{k}": v for k, v in text_to_image.items()} | {f"i2t_r{k}": v for k, v in image_to_text.items()}


def _summary(record: dict[str, Any]) -> str:
    """One log line of an epoch's figures."""
    parts = [f"loss {record['train_loss']:.4f}"]
    parts += [f"{key} {record[key]:.3f}" for key in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1") if key in record]
    return ", ".join(parts)


def _initial_model(config: TrainConfig, device: torch.device) -> CLIP:
    """A fresh CLIP of the named architecture, or the checkpoint to fine-tune, in training mode on `device`."""
    if config.init_from is not None:
        shared, _ = load_model(config.init_from, device=device)
        if shared.config.family != "clip":
            # The loss, the optimiser's groups and the data's tokenizer are CLIP's; SigLIP needs its own.
            raise TrainingError(
                f"{config.init_from} is a {shared.config.family} model; fine-tuning works for CLIP models only, "
                "so choose a CLIP or OpenCLIP model to fine-tune"
            )
        model = copy.deepcopy(shared)  # load_model hands out one shared instance per checkpoint; leave it intact
        del model.info  # its weights hash will no longer describe the weights
    else:
        model = CLIP(scratch_config(config.model))
    return model.to(device).train()


def _load_sets(
    config: TrainConfig, preprocess: Preprocess, context_length: int, progress: bool
) -> tuple[PairSet, PairSet | None]:
    """The training set and the held-out set (given, split off by seed, or none)."""
    pairs = load_pair_set(parse_source(config.data), preprocess, context_length, progress)
    if config.val is not None:
        val = load_pair_set(parse_source(config.val), preprocess, context_length, progress)
    elif 0 < config.val_fraction < 1 and len(pairs) >= 4:
        n_val = min(MAX_VAL_SPLIT, max(2, round(config.val_fraction * len(pairs))))
        order = torch.randperm(len(pairs), generator=_generator(config.seed, -1))
        val, pairs = pairs.subset(order[:n_val]), pairs.subset(order[n_val:])
    else:
        val = None
    if len(pairs) < 2:
        raise TrainingError(
            f"{config.data}: contrastive training needs at least 2 captioned images, found {len(pairs)}"
        )
    logger.info("training on %d pairs, evaluating on %d", len(pairs), 0 if val is None else len(val))
    return pairs, val


def _generator(*keys: int) -> torch.Generator:
    """A torch generator seeded from integers (seed, epoch, ...), independent of every other stream."""
    seed = int(np.random.SeedSequence([k + 2**31 for k in keys]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def _check_same_run(saved: dict[str, Any], config: TrainConfig, out: Path) -> None:
    """Refuse to resume a run whose result-changing settings differ from the saved ones."""
    current = config.to_dict()
    changed = [
        f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in current.items() if k not in _RESUME_NEUTRAL and saved.get(k) != v
    ]
    if changed:
        raise TrainingError(
            f"{out} holds a training run with other settings ({'; '.join(changed)}); re-run with the same settings "
            "to resume it, or choose another --out folder"
        )


def _append_metrics(out: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to the run's metrics file."""
    with (out / METRICS_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _trim_metrics(path: Path, step: int) -> None:
    """Drop lines logged after `step` (by a run killed after its last checkpoint); they are logged again."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)

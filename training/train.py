"""Two-stage training: pre-train the disentangled VAE on unchanged pairs, then fine-tune encoder +
classifier on negatives and the few positives. Produces a self-describing checkpoint.

Stage 1 (pre-training) sees negatives only: reconstruction + KL of both dates, a similarity loss
between the two common posteriors, and an activation loss that keeps the common features from
collapsing to the prior. Stage 2 (fine-tuning) trains C(mu_c_A, mu_c_B) with binary cross-entropy on
balanced batches (half positives, resampled with replacement: the positives are few), with the
encoder at a smaller learning rate so that it is adapted, not overwritten, by a few dozen labels.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from serving import tiling
from serving.quality import auroc, best_threshold, binary_scores
from training import losses
from training.data import PatchSet
from training.model import (
    ChangeDetector,
    DisentangledVAE,
    DistanceClassifier,
    ModelConfig,
    bce_change_loss,
)
from training.plots import plot_history

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "rarechange-checkpoint/1"


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"  # "auto": a GPU when present, else the CPU
    # stage 1
    pretrain_epochs: float = 4.0  # passes over the negatives
    pretrain_steps: int | None = None  # when set, exactly this many steps instead of epochs
    pretrain_lr: float = 1e-3
    beta: float = 1.0  # weight of the KL terms
    similarity: losses.Similarity = "jeffrey"
    similarity_weight: float = 1.0
    activation: losses.Activation = "spread"
    activation_weight: float = 25.0
    sparsity_target: float = 0.05
    # stage 2
    finetune_steps: int = 400
    finetune_steps_per_epoch: int = 100  # fine-tuning has no natural epoch: checkpoint this often
    finetune_lr: float = 1e-3
    encoder_lr_scale: float = 0.1  # encoder lr = finetune_lr * this; 0 freezes the encoder
    freeze_encoder_steps: int = 0  # classifier-only warm-up before the encoder learns
    balance: Literal["balanced", "undersample"] = "balanced"
    positive_fraction: float = 0.25  # a patch is positive when at least this much of it changed
    max_positives: int | None = None  # the label budget: keep only this many positive patches
    val_fraction: float = 0.2
    # the from-scratch siamese baseline: no VAE pre-training; the encoder learns from the labels
    # alone, at the classifier's rate from the first step (encoder_lr_scale 1, no frozen warm-up)
    from_scratch: bool = False
    # a fixed mask threshold (e.g. one a leave-one-pair-out study chose on other folds) instead of
    # the best on this run's own validation data, which is optimistic for that same data
    threshold: float | None = None


@dataclass(frozen=True)
class InputScaling:
    """How raw pixels become the network's input: ``(x - offset) * scale``, then clipped to
    ``clip`` when set. Stored in the checkpoint so that export builds the same step into the ONNX
    graph: a model trained on one scaling and served with another would see other numbers."""

    input_dtype: Literal["uint8", "uint16", "float32"] = "uint8"
    input_range: tuple[float, float] = (0.0, 255.0)  # the raw values the model is meant for
    offset: float = 0.0
    scale: float = 1.0 / 255.0
    clip: tuple[float, float] | None = None  # e.g. (0, 1): saturate rare very bright pixels

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if not self.input_range[0] < self.input_range[1]:
            raise ValueError(f"input_range must be (min, max) with min < max: {self.input_range}")
        if self.clip is not None and not self.clip[0] < self.clip[1]:
            raise ValueError(f"clip must be (min, max) with min < max: {self.clip}")

    @property
    def is_uint8_default(self) -> bool:
        return self == UINT8

    @classmethod
    def from_payload(cls, data: dict[str, Any] | None) -> InputScaling:
        """From a checkpoint; checkpoints written before scaling was recorded are uint8 / 255."""
        if not data:
            return UINT8
        clip = data.get("clip")
        return cls(
            input_dtype=data["input_dtype"],
            input_range=tuple(data["input_range"]),
            offset=float(data["offset"]),
            scale=float(data["scale"]),
            clip=None if clip is None else tuple(clip),
        )


UINT8 = InputScaling()


@dataclass
class DataInfo:
    """What the model was trained on; goes into the checkpoint, then the ONNX metadata."""

    name: str
    licence: str
    description: str = ""
    band_names: tuple[str, ...] = ("red", "green", "blue")


@dataclass
class RunResult:
    checkpoint: Path
    metrics: dict[str, float]
    threshold: float
    history: list[dict[str, float]] = field(default_factory=list)


def to_unit(
    x: np.ndarray, device: torch.device | str = "cpu", scaling: InputScaling | None = None
) -> torch.Tensor:
    """Raw patches -> network input: the same scaling the exported graph applies.

    uint8 / 255 by default (kept exactly as before, so earlier runs reproduce bit for bit)."""
    if scaling is None or scaling.is_uint8_default:
        return torch.from_numpy(x).to(device).float().div_(255.0)
    if x.dtype != np.uint8:
        x = x.astype(np.float32)  # torch has no arithmetic on uint16; exact for 16-bit ints
    t = torch.from_numpy(x).to(device).float().sub_(scaling.offset).mul_(scaling.scale)
    return t.clamp_(*scaling.clip) if scaling.clip is not None else t


def resolve_device(name: str) -> torch.device:
    """ "auto": the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class EpochCheckpoints:
    """Per-epoch checkpoints of one stage, so that a killed run resumes where it stopped.

    Every epoch draws its batches from a generator seeded by (seed, stage, epoch) and reseeds
    torch the same way, so a resumed run takes exactly the steps an uninterrupted one would.
    Metrics rows are appended to ``metrics.jsonl`` only when their epoch's checkpoint is written.
    """

    def __init__(self, run_dir: Path | None, stage: str) -> None:
        self.path = run_dir / f"{stage}_last.pt" if run_dir else None
        self.metrics = run_dir / "metrics.jsonl" if run_dir else None
        self.stage = stage

    def load(self, module: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list[dict]]:
        """(epochs already done, their history); (0, []) when starting fresh."""
        if self.path is None or not self.path.exists():
            return 0, []
        state = torch.load(self.path, map_location=device_of(module), weights_only=False)
        module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        log.info("%s: resuming after epoch %d", self.stage, state["epoch"])
        return state["epoch"], state["history"]

    def save(
        self,
        module: nn.Module,
        opt: torch.optim.Optimizer,
        epoch: int,
        history: list[dict],
        rows: list[dict],
    ) -> None:
        if self.path is None:
            return
        payload = {
            "model": module.state_dict(),
            "optimizer": opt.state_dict(),
            "epoch": epoch,
            "history": history,
        }
        save_checkpoint(self.path, payload)
        with self.metrics.open("a") as f:
            for row in rows:
                f.write(json.dumps({"stage": self.stage, **row}) + "\n")


STAGE_CODES = {"pretrain": 1, "finetune": 2}


def run_epochs(
    stage: str,
    module: nn.Module,
    opt: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    step_fn: Callable[[int, np.random.Generator], dict[str, float]],
    seed: int,
    run_dir: Path | None,
    progress: bool,
    log_every: int = 20,
) -> list[dict[str, float]]:
    """The loop both stages share: epochs of steps, deterministic per epoch, checkpointed."""
    ckpt = EpochCheckpoints(run_dir, stage)
    n_epochs = max(1, math.ceil(total_steps / steps_per_epoch)) if total_steps else 0
    done, history = ckpt.load(module, opt)
    module.train()
    bar = tqdm(
        total=total_steps,
        initial=min(done * steps_per_epoch, total_steps),
        desc=stage,
        disable=not progress,
    )
    for epoch in range(done, n_epochs):
        gen = np.random.default_rng([seed, STAGE_CODES[stage], epoch])
        torch.manual_seed(seed * 1_000_003 + STAGE_CODES[stage] * 10_007 + epoch)
        rows = []
        first, last = epoch * steps_per_epoch, min((epoch + 1) * steps_per_epoch, total_steps)
        for step in range(first, last):
            row = step_fn(step, gen)
            if step % log_every == 0 or step == total_steps - 1:
                rows.append({"epoch": epoch, "step": step, **row})
            bar.update(1)
        history += rows
        ckpt.save(module, opt, epoch + 1, history, rows)
    bar.close()
    return history


def pretrain(
    vae: DisentangledVAE,
    negatives: PatchSet,
    cfg: TrainConfig,
    progress: bool = True,
    run_dir: Path | None = None,
    scaling: InputScaling | None = None,
) -> list[dict[str, float]]:
    """Stage 1 on unchanged pairs only; returns the loss history (one row per logged step)."""
    device = resolve_device(cfg.device)
    vae.to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.pretrain_lr)
    likelihood = vae.cfg.likelihood
    steps_per_epoch = max(1, len(negatives) // cfg.batch_size)
    total = cfg.pretrain_steps
    if total is None:
        total = round(cfg.pretrain_epochs * steps_per_epoch)

    def step(_: int, gen: np.random.Generator) -> dict[str, float]:
        idx = gen.integers(0, len(negatives), cfg.batch_size)
        x_a = to_unit(negatives.before[idx], device, scaling)
        x_b = to_unit(negatives.after[idx], device, scaling)
        q_a, rec_a = vae(x_a)
        q_b, rec_b = vae(x_b)
        recon = losses.reconstruction_nll(rec_a, x_a, likelihood) + losses.reconstruction_nll(
            rec_b, x_b, likelihood
        )
        kl = sum(
            losses.kl_to_standard_normal(mu, lv)
            for q in (q_a, q_b)
            for mu, lv in ((q.mu_c, q.logvar_c), (q.mu_s, q.logvar_s))
        )
        sim = losses.similarity_loss(cfg.similarity, q_a.mu_c, q_a.logvar_c, q_b.mu_c, q_b.logvar_c)
        act = losses.activation_loss(
            cfg.activation, torch.cat([q_a.mu_c, q_b.mu_c]), cfg.sparsity_target
        )
        loss = (recon + cfg.beta * kl + cfg.similarity_weight * sim).mean()
        loss = loss + cfg.activation_weight * act
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {
            "loss": loss.item(),
            "recon": recon.mean().item(),
            "kl": kl.mean().item(),
            "similarity": sim.mean().item(),
            "activation": act.item(),
        }

    return run_epochs(
        "pretrain", vae, opt, total, steps_per_epoch, step, cfg.seed, run_dir, progress
    )


def finetune(
    detector: ChangeDetector,
    negatives: PatchSet,
    positives: PatchSet,
    cfg: TrainConfig,
    progress: bool = True,
    run_dir: Path | None = None,
    scaling: InputScaling | None = None,
) -> list[dict[str, float]]:
    """Stage 2: BCE on [mu_c_A, mu_c_B] with the imbalance handled as ``cfg.balance`` says.

    ``balanced``: every batch is half positives (resampled with replacement) and half negatives,
    i.e. over-sampling; ``undersample``: batches drawn from all positives plus as many randomly
    chosen negatives, i.e. under-sampling. The encoder learns at ``encoder_lr_scale`` times the
    classifier's rate, frozen for the first ``freeze_encoder_steps`` steps (0 scale: frozen).
    """
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError("fine-tuning needs at least one positive and one negative patch pair")
    if cfg.balance == "undersample":
        keep = np.random.default_rng([cfg.seed, 3]).choice(
            len(negatives), min(len(negatives), len(positives)), replace=False
        )
        negatives = negatives.select(np.sort(keep))
    device = resolve_device(cfg.device)
    detector.to(device)
    if isinstance(detector.classifier, DistanceClassifier):
        sample = negatives.select(
            np.sort(np.random.default_rng([cfg.seed, 4]).permutation(len(negatives))[:4096])
        )
        with torch.no_grad():
            mu_a = detector.encoder.common(to_unit(sample.before, device, scaling))
            mu_b = detector.encoder.common(to_unit(sample.after, device, scaling))
            detector.classifier.calibrate(mu_a, mu_b)
    groups = [{"params": list(detector.classifier.parameters()), "lr": cfg.finetune_lr}]
    if cfg.encoder_lr_scale > 0:
        groups.append(
            {
                "params": list(detector.encoder.parameters()),
                "lr": cfg.finetune_lr * cfg.encoder_lr_scale,
            }
        )
    opt = torch.optim.Adam(groups)
    half = cfg.batch_size // 2
    steps_per_epoch = cfg.finetune_steps_per_epoch

    def step(i: int, gen: np.random.Generator) -> dict[str, float]:
        detector.encoder.requires_grad_(cfg.encoder_lr_scale > 0 and i >= cfg.freeze_encoder_steps)
        ip = gen.integers(0, len(positives), half)
        ineg = gen.integers(0, len(negatives), half)
        before = np.concatenate([positives.before[ip], negatives.before[ineg]])
        after = np.concatenate([positives.after[ip], negatives.after[ineg]])
        y = torch.cat([torch.ones(half), torch.zeros(half)]).to(device)
        # either date may come first at serving time: swap half of the pairs
        swap = torch.from_numpy(gen.random(2 * half) < 0.5)[:, None, None, None].to(device)
        x_a, x_b = to_unit(before, device, scaling), to_unit(after, device, scaling)
        x_a, x_b = torch.where(swap, x_b, x_a), torch.where(swap, x_a, x_b)
        loss = bce_change_loss(detector.logits(x_a, x_b), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"bce": loss.item()}

    try:
        return run_epochs(
            "finetune",
            detector,
            opt,
            cfg.finetune_steps,
            steps_per_epoch,
            step,
            cfg.seed,
            run_dir,
            progress,
        )
    finally:
        detector.encoder.requires_grad_(True)


@torch.no_grad()
def predict(
    detector: ChangeDetector,
    patches: PatchSet,
    batch: int = 512,
    scaling: InputScaling | None = None,
) -> np.ndarray:
    detector.eval()
    device = device_of(detector)
    out = [
        detector(
            to_unit(patches.before[i : i + batch], device, scaling),
            to_unit(patches.after[i : i + batch], device, scaling),
        ).cpu()
        for i in range(0, len(patches), batch)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def probability_map(
    detector: ChangeDetector,
    before: np.ndarray,
    after: np.ndarray,
    stride: int,
    scaling: InputScaling | None = None,
) -> np.ndarray:
    """The serving path's tiling and stitching around the PyTorch model: (H, W) probabilities."""
    p = detector.cfg.patch_size
    tiles = tiling.grid(before.shape[0], before.shape[1], p, stride)
    b, a = tiling.extract_patches(before, after, tiles, p, stride)
    probs = predict(detector, PatchSet(b, a, np.zeros(len(b), np.float32)), scaling=scaling)
    return tiling.stitch(probs, tiles, before.shape[0], before.shape[1], p)


def pixel_threshold(
    detector: ChangeDetector,
    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    stride: int,
    scaling: InputScaling | None = None,
    fixed: float | None = None,
) -> tuple[float, dict[str, float]]:
    """Choose the mask threshold on whole validation scenes, where the mask is actually made.

    The served mask thresholds the blended map, not single patches, so the threshold is chosen
    (max pixel F1) and reported on stitched maps of held-out scenes.
    """
    maps = [probability_map(detector, b, a, stride, scaling) for b, a, _ in pairs]
    scores = np.concatenate([m.ravel() for m in maps])
    truth = np.concatenate([m.ravel() > 0 for _, _, m in pairs])
    threshold = best_threshold(scores, truth) if fixed is None else fixed
    metrics = {f"pixel_{k}": v for k, v in binary_scores(scores >= threshold, truth).items()}
    metrics["pixel_auroc"] = auroc(scores, truth)
    return threshold, metrics


def balanced_test_scores(detector: ChangeDetector, test: PatchSet) -> dict[str, float]:
    """The paper's change-detection accuracy (balanced test set, threshold 0.5) and AUROC, in %."""
    p = predict(detector, test, batch=2048)
    y = test.changed_fraction > 0.5
    return {"accuracy": 100.0 * float(((p >= 0.5) == y).mean()), "auroc": 100.0 * auroc(p, y)}


def split_validation(patches: PatchSet, fraction: float, seed: int) -> tuple[PatchSet, PatchSet]:
    order = np.random.default_rng(seed).permutation(len(patches))
    n_val = round(len(patches) * fraction)
    return patches.select(np.sort(order[n_val:])), patches.select(np.sort(order[:n_val]))


def evaluate_patches(
    detector: ChangeDetector,
    patches: PatchSet,
    positive_fraction: float,
    threshold: float,
    scaling: InputScaling | None = None,
) -> dict[str, float]:
    """Patch-level metrics on unambiguous patches (none changed, or at least positive_fraction)."""
    neg, pos = patches.split(positive_fraction)
    both = PatchSet.concat([neg, pos])
    labels = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    scores = predict(detector, both, scaling=scaling)
    out = binary_scores(scores >= threshold, labels)
    out["auroc"] = auroc(scores, labels)
    out["n_negative"], out["n_positive"] = float(len(neg)), float(len(pos))
    return out


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary name, then rename: a killed run never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a rarechange checkpoint (unreadable: {exc})") from exc
    fmt = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
    if fmt != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a rarechange checkpoint (format {fmt!r})")
    return payload


def detector_from_checkpoint(payload: dict[str, Any]) -> ChangeDetector:
    """The architecture comes from the checkpoint itself, never from a second copy of the config."""
    detector = ChangeDetector(ModelConfig(**payload["model_config"]))
    detector.load_state_dict(payload["detector_state"])
    return detector.eval()


def train(
    train_patches: PatchSet,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: Path,
    data: DataInfo,
    progress: bool = True,
    validation_pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
    stride: int | None = None,
    stage: Literal["both", "pretrain", "finetune"] = "both",
    scaling: InputScaling | None = None,
    validation_patches: PatchSet | None = None,
) -> RunResult | None:
    """Both stages end to end; writes ``out_dir/checkpoint.pt`` and ``out_dir/metrics.json``.

    With ``validation_pairs`` (before, after, mask) the decision threshold is chosen on their
    stitched maps at ``stride``; without, on validation patches; with ``val_fraction`` 0 it is
    0.5 (for balanced problems). ``validation_patches`` (patches of held-out scenes) replace the
    random ``val_fraction`` split, whose patches would overlap the training ones on a dense grid.
    ``stage="pretrain"`` stops after stage 1 (returns None); ``stage="finetune"`` needs the
    finished stage 1 of the same run folder. ``scaling`` maps raw pixels to the network input
    (default uint8 / 255) and is recorded for export. ``cfg.from_scratch`` skips stage 1.
    """
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    scaling = scaling or UINT8
    if cfg.from_scratch:
        # the baseline: nothing to adapt carefully, the encoder learns at the classifier's rate
        cfg = replace(cfg, encoder_lr_scale=1.0, freeze_encoder_steps=0)
    if validation_patches is not None:
        fit, val = train_patches, validation_patches
    else:
        fit, val = split_validation(train_patches, cfg.val_fraction, cfg.seed)
    negatives, positives = fit.split(cfg.positive_fraction)
    if cfg.max_positives is not None and len(positives) > cfg.max_positives:
        keep = np.random.default_rng(cfg.seed + 2).choice(len(positives), cfg.max_positives, False)
        positives = positives.select(np.sort(keep))
    log.info("training on %d negatives, %d positives", len(negatives), len(positives))

    out_dir.mkdir(parents=True, exist_ok=True)
    needs_pretrain = not cfg.from_scratch
    if stage == "finetune" and needs_pretrain and not (out_dir / "pretrain_last.pt").exists():
        raise FileNotFoundError(
            f"{out_dir} has no pre-training checkpoint; run the pretrain stage first"
        )
    vae = DisentangledVAE(model_cfg)  # from scratch: its random encoder starts fine-tuning
    pre_history = (
        pretrain(vae, negatives, cfg, progress, run_dir=out_dir, scaling=scaling)
        if needs_pretrain
        else []
    )
    if stage == "pretrain":
        plot_history([{"stage": "pretrain", **r} for r in pre_history], out_dir / "loss_curves.png")
        return None
    detector = ChangeDetector(model_cfg)
    detector.encoder.load_state_dict(vae.encoder.state_dict())
    fine_history = finetune(
        detector, negatives, positives, cfg, progress, run_dir=out_dir, scaling=scaling
    )

    # the threshold is chosen on validation patches, never on the patches it was trained on
    stride = stride or model_cfg.patch_size // 4
    fixed = cfg.threshold
    if validation_pairs:
        threshold, pixel_metrics = pixel_threshold(
            detector, validation_pairs, stride, scaling, fixed
        )
        method = f"max pixel F1 on {len(validation_pairs)} held-out scenes, stride {stride}"
    elif len(val) == 0:
        threshold, pixel_metrics, method = 0.5, {}, "fixed 0.5: balanced training batches"
    else:
        vneg, vpos = val.split(cfg.positive_fraction)
        vscores = predict(detector, PatchSet.concat([vneg, vpos]), scaling=scaling)
        threshold = best_threshold(vscores, np.r_[np.zeros(len(vneg)), np.ones(len(vpos))])
        pixel_metrics, method = {}, "max F1 of the change class on the validation patches"
    if fixed is not None:
        threshold, method = fixed, f"fixed by train.threshold = {fixed:g}"
    metrics = (
        evaluate_patches(detector, val, cfg.positive_fraction, threshold, scaling)
        if len(val)
        else {}
    )
    metrics.update(pixel_metrics)
    metrics["train_seconds"] = time.perf_counter() - t0
    payload = {
        "format": CHECKPOINT_FORMAT,
        "stage": "finetune",
        "model_config": model_cfg.to_dict(),
        "train_config": asdict(cfg),
        "data": asdict(data),
        "input_scaling": asdict(scaling),
        "detector_state": detector.state_dict(),
        "vae_state": vae.state_dict(),
        "threshold": threshold,
        "threshold_method": method,
        "recommended_stride": stride,
        "metrics": metrics,
        "n_positives": len(positives),
        "n_negatives": len(negatives),
    }
    checkpoint = out_dir / "checkpoint.pt"
    save_checkpoint(checkpoint, payload)
    history = [{"stage": "pretrain", **r} for r in pre_history]
    history += [{"stage": "finetune", **r} for r in fine_history]
    (out_dir / "metrics.json").write_text(
        json.dumps({"metrics": metrics, "threshold": threshold, "history": history}, indent=1)
    )
    plot_history(history, out_dir / "loss_curves.png")
    return RunResult(checkpoint, metrics, threshold, history)

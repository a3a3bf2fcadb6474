"""The epoch loop: ``fit`` trains one model and picks its best epoch.

``fit`` reads like torchvision's references/classification/train.py: data (cached, augmented,
balanced; the mode's setup from ``flystage.training.modes``), model, optimiser and schedule,
then the epoch loop (``train_one_epoch``, one metric line per epoch, early stopping on valid
top-1 (then loss), a ``TrainState`` checkpoint every epoch, resumed on restart, and a clean
stop on SIGTERM (``STOP``)). Runs data-parallel when torch.distributed is initialised.

The metric line, which SageMaker's metric definitions (``flystage.jobdef``) read::

    epoch=3 train_loss=0.8123 valid_loss=0.4100 valid_top1=0.8200 valid_top3=0.9700
"""

from __future__ import annotations

import copy
import functools
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from flystage.channels import DataError
from flystage.files import atomic_write
from flystage.manifest import Record, sort_labels
from flystage.options import UsageError
from flystage.training.config import TrainConfig
from flystage.training.data import ImageCache, class_weights, make_sampler
from flystage.training.modes import SETUPS
from flystage.training.ordinal import OrdinalLoss
from flystage.training.unlabelled import PseudoLabel

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
SAVED_MODEL_PREFIX = "saved model: "


@dataclass
class FitResult:
    """What ``fit`` returns: the model (eval mode, best weights), its labels, and how it went."""

    model: nn.Module
    labels: list[str]
    # One dict per epoch: epoch, train_loss, valid_loss, valid_top1, valid_top3, ...
    history: list[dict[str, float]]
    best: dict[str, float]  # the history entry of the best epoch
    config: TrainConfig
    samples_seen: int = 0  # training samples this process saw (all epochs of this run)
    # Rebuilds the architecture (flystage.training.models.build_from_spec).
    spec: dict[str, Any] = field(default_factory=dict)
    # Unlabelled images that joined the training images (self-training), with their stage.
    pseudo_labels: list[PseudoLabel] = field(default_factory=list)


class TrainingStopped(Exception):
    """Training stopped on request (SIGTERM or ``stop_after_epoch``) after saving a checkpoint."""

    def __init__(
        self, message: str, epoch: int, checkpoint: Path | None, result: FitResult | None = None
    ):
        super().__init__(message)
        self.epoch = epoch
        self.checkpoint = checkpoint
        self.result = result  # the best model so far (None before the first finished epoch)


# SIGTERM (SageMaker stop, spot interruption) sets this; the loop finishes the current step,
# saves a checkpoint and raises TrainingStopped.
STOP = threading.Event()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    # DataLoader seeds torch per worker; numpy and random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def dist_info() -> tuple[int, int]:
    """This process's rank and the world size; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum ``values`` over all processes (identity when not distributed)."""
    tensor = torch.tensor(list(values), dtype=torch.float64)
    if dist_info()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def make_optimizer(
    param_groups: list[dict[str, Any]], config: TrainConfig
) -> torch.optim.Optimizer:
    """AdamW or SGD over ``param_groups`` (from the mode's setup); a group's ``lr_scale``
    multiplies ``config.learning_rate`` (a fine-tuned backbone learns slower than its head)."""
    groups = [{**g, "lr": config.learning_rate * g.get("lr_scale", 1.0)} for g in param_groups]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.learning_rate, momentum=config.momentum, nesterov=True
        )
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """Stepped every batch: linear warm-up then cosine decay to 0, or one-cycle."""
    total = config.epochs * steps_per_epoch
    if config.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total
        )
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def metric_line(entry: dict[str, float]) -> str:
    """The per-epoch line that ``flystage.jobdef.METRIC_DEFINITIONS`` reads."""
    return (
        f"epoch={entry['epoch']} train_loss={entry['train_loss']:.4f} "
        f"valid_loss={entry['valid_loss']:.4f} valid_top1={entry['valid_top1']:.4f} "
        f"valid_top3={entry['valid_top3']:.4f}"
    )


def saved_model_line(best: dict[str, float]) -> str:
    """The saved model's metrics in the metric line's format, printed last: a tuning job ranks a
    trial by the last value of its objective, and the artefact is the best epoch, not the last."""
    return SAVED_MODEL_PREFIX + metric_line(best)


def _is_better(entry: dict[str, float], best: dict[str, float] | None) -> bool:
    """Best epoch: higher valid top-1, then lower valid loss (top-3 is 1.0 for every epoch
    when there are three stages or fewer, so it cannot rank them)."""
    if best is None:
        return True
    if entry["valid_top1"] != best["valid_top1"]:
        return entry["valid_top1"] > best["valid_top1"]
    return entry["valid_loss"] < best["valid_loss"]


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader: DataLoader, num_classes: int) -> dict[str, float]:
    """Valid loss (plain cross-entropy), top-1 and top-3 accuracy, summed over all processes."""
    model.eval()
    loss_sum = top1 = top3 = n = 0.0
    k = min(3, num_classes)
    for x, y in loader:
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        ranked = logits.topk(k, dim=1).indices
        top1 += (ranked[:, 0] == y).sum().item()
        top3 += (ranked == y[:, None]).any(dim=1).sum().item()
        n += len(y)
    loss_sum, top1, top3, n = _all_reduce_sum([loss_sum, top1, top3, n])
    return {"valid_loss": loss_sum / n, "valid_top1": top1 / n, "valid_top3": top3 / n}


@dataclass
class TrainState:
    """How far the epoch loop is. With the model, optimiser and schedule it is what a
    checkpoint holds: plain tensors and Python types, so ``torch.load(weights_only=True)``
    reads it back."""

    epoch: int = 0  # the last finished epoch
    history: list[dict[str, float]] = field(default_factory=list)  # one metric dict per epoch
    best: dict[str, float] | None = None  # the history entry of the best epoch
    best_state: dict[str, torch.Tensor] | None = None  # the model's weights after the best epoch
    bad_epochs: int = 0  # epochs since the best one
    samples_seen: int = 0  # training samples this process saw in this run (not checkpointed)

    def record(self, entry: dict[str, float], model: nn.Module) -> None:
        """A finished epoch; its weights are kept when it is the best so far."""
        self.history.append(entry)
        self.epoch = int(entry["epoch"])
        if _is_better(entry, self.best):
            self.best, self.bad_epochs = dict(entry), 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.bad_epochs += 1

    def out_of_patience(self, config: TrainConfig) -> bool:
        return bool(config.patience) and self.bad_epochs >= config.patience

    def checkpoint(
        self,
        labels: list[str],
        config: TrainConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
    ) -> dict[str, Any]:
        """The checkpoint (format ``CHECKPOINT_FORMAT``) after ``self.epoch``."""
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "labels": labels,
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": self.history,
            "best": self.best,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
        }

    @classmethod
    def restore(
        cls,
        checkpoint: dict[str, Any],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
    ) -> TrainState:
        """Load a checkpoint's weights, optimiser and schedule; return its progress."""
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        return cls(
            checkpoint["epoch"],
            checkpoint["history"],
            checkpoint["best"],
            checkpoint["best_state"],
            checkpoint["bad_epochs"],
        )


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically: a reader (or a restart after SIGKILL) sees the old or the new file, never
    half."""
    with atomic_write(path, "wb") as f:
        torch.save(state, f)


def _load_checkpoint(path: Path, labels: list[str], config: TrainConfig) -> dict[str, Any]:
    # weights_only: a checkpoint synced from S3 (spot jobs) must not be able to run code.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(
            f"{path}: not a readable flystage checkpoint ({type(exc).__name__}); remove it or use "
            "another checkpoint dir"
        ) from None
    if not isinstance(state, dict):
        raise DataError(
            f"{path}: not a flystage checkpoint; remove it or use another checkpoint dir"
        )
    if state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(
            f"{path}: not a flystage checkpoint of format {CHECKPOINT_FORMAT}; remove it or use "
            "another checkpoint dir"
        )
    mismatch = []
    if state["labels"] != labels:
        mismatch.append(f"labels {state['labels']} (now {labels})")
    keys = ("arch", "mode", "feature_taps", "hog_features", "probe_flips", "probe_columns")
    for key in (*keys, "preprocess"):
        # A checkpoint from before probe_flips/probe_columns was trained without them.
        saved = {"probe_flips": "none", "probe_columns": 1, **state["config"]}.get(key)
        now = config.to_dict()[key]
        if saved != now:
            mismatch.append(f"{key} {saved} (now {now})")
    if mismatch:
        raise DataError(
            f"{path} belongs to another training run: "
            + "; ".join(mismatch)
            + ". Use an empty checkpoint dir for a new run, or remove that file."
        )
    return state


def labels_and_cache(
    train_records: Sequence[Record],
    valid_records: Sequence[Record],
    config: TrainConfig,
    labels: Sequence[str] | None,
    image_cache: ImageCache | None,
) -> tuple[list[str], ImageCache]:
    """The label order (given, or every label of both sets in stage order) and an image cache
    for ``config.preprocess`` (given, or a new one)."""
    if labels is None:
        labels = sort_labels({r.label for r in train_records} | {r.label for r in valid_records})
    if image_cache is None:
        image_cache = ImageCache(
            config.preprocess, config.cache_dtype, workers=max(1, torch.get_num_threads())
        )
    elif image_cache.config != config.preprocess:
        raise ValueError("image_cache was made for another PreprocessConfig than config.preprocess")
    return list(labels), image_cache


def _resume(
    path: Path | None,
    labels: list[str],
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    say: Callable[[str], None],
) -> TrainState:
    """The run's state from the checkpoint at ``path`` (weights, optimiser and schedule loaded),
    or a fresh one. Rank 0's checkpoint is the truth (only rank 0 writes one): it is broadcast,
    and its error stops every rank."""
    rank, world = dist_info()
    saved, error = None, None
    if rank == 0 and path is not None and path.is_file():
        try:
            saved = _load_checkpoint(path, labels, config)
        except DataError as exc:
            error = exc
    if world > 1:
        shared = [saved, str(error) if error else None]
        dist.broadcast_object_list(shared, src=0)
        saved, error = shared[0], (error or (DataError(shared[1]) if shared[1] else None))
    if error is not None:
        raise error
    if saved is None:
        return TrainState()
    state = TrainState.restore(saved, model, optimizer, scheduler)
    best = state.best
    say(
        f"resuming from checkpoint {path} after epoch {state.epoch}"
        + (f" (best valid_top1={best['valid_top1']:.4f} at epoch {best['epoch']})" if best else "")
    )
    return state


def _save_state(
    path: Path | None,
    state: TrainState,
    labels: list[str],
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> None:
    """Rank 0 checkpoints the run to ``path`` (None: no checkpoints)."""
    if path is not None and dist_info()[0] == 0:
        _save_checkpoint(path, state.checkpoint(labels, config, model, optimizer, scheduler))


def _stop_requested(world: int) -> bool:
    """SIGTERM on any rank: every rank must stop at the same step, or the others would wait in
    all-reduce."""
    return _all_reduce_sum([float(STOP.is_set())])[0] > 0 if world > 1 else STOP.is_set()


def _best_so_far(
    state: TrainState, model: nn.Module, setup: Any, labels: list[str], config: TrainConfig
) -> FitResult | None:
    """The model at its best epoch so far: a stopped job (MaxRuntime, tuning early stop, spot)
    still leaves a usable model. None before the first finished epoch. Called only as the run
    stops, after its checkpoint is saved, so the live weights are not needed again."""
    if state.best_state is None:
        return None
    return _result_at_best(state, setup, model, labels, config)


def _result_at_best(
    state: TrainState, setup: Any, model: nn.Module, labels: list[str], config: TrainConfig
) -> FitResult:
    model.load_state_dict(state.best_state)
    return FitResult(
        setup.finish(model).eval(),
        labels,
        state.history,
        state.best,
        config,
        state.samples_seen,
        spec=config.model_spec(),
    )


def _setup(
    train_records: Sequence[Record],
    valid_records: Sequence[Record],
    config: TrainConfig,
    labels: Sequence[str] | None,
    image_cache: ImageCache | None,
    say: Callable[[str], None],
    unlabelled: Sequence[Path] = (),
) -> tuple[list[str], Any]:
    """The label order and the mode's setup (flystage.training.modes): what is trained on which
    samples,
    augmented images or a frozen backbone's cached features. Images are preprocessed once and
    augmented per sample; the label order is the stage order."""
    if not train_records or not valid_records:
        raise DataError(
            f"need training and validation images; got {len(train_records)} and "
            f"{len(valid_records)}"
        )
    labels, image_cache = labels_and_cache(
        train_records, valid_records, config, labels, image_cache
    )
    untrained = sorted(set(labels) - {r.label for r in train_records})
    if untrained:
        say(f"warning: no training images for label(s) {untrained}: the model cannot learn them")
    t0 = time.perf_counter()
    _seed_everything(config.seed)
    if unlabelled and config.mode_of() != "probe":
        raise UsageError(
            f"unlabelled images are used by the probe only, not by mode {config.mode_of()}: "
            "train with mode probe, or leave out --unlabelled"
        )
    extra = {"unlabelled": list(unlabelled)} if unlabelled else {}
    setup = SETUPS[config.mode_of()](
        train_records, valid_records, labels, image_cache, config, say, **extra
    )
    say(
        f"data: {len(train_records)} train, {len(valid_records)} valid images, labels {labels}, "
        f"ready in {time.perf_counter() - t0:.1f} s"
    )
    return labels, setup


def _loaders(setup: Any, config: TrainConfig) -> tuple[Any, DataLoader, DataLoader]:
    """The training sampler and loader (this rank's share of the batch) and this rank's shard
    of the validation set."""
    rank, world = dist_info()
    sampler = make_sampler(setup.targets, config.balance, rank, world, config.seed)
    per_rank_batch = max(1, config.batch_size // world)
    # BatchNorm cannot train on a batch of one: drop a last batch of exactly one.
    drop_last = len(sampler) % per_rank_batch == 1 and len(sampler) > 1
    loader_args = dict(
        num_workers=config.num_workers, worker_init_fn=_seed_worker if config.num_workers else None
    )
    train_loader = DataLoader(
        setup.train_set, per_rank_batch, sampler=sampler, drop_last=drop_last, **loader_args
    )
    valid_shard = Subset(setup.valid_set, range(rank, len(setup.valid_set), world))
    valid_loader = DataLoader(valid_shard, per_rank_batch * 2, shuffle=False, **loader_args)
    return sampler, train_loader, valid_loader


def train_one_epoch(
    net: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loader: DataLoader,
    penalty: Callable[[], torch.Tensor] | None,
    epoch: int,
    config: TrainConfig,
) -> tuple[float, float, bool]:
    """One pass over ``loader``, stepping the optimiser and the schedule every batch. Returns
    this process's summed loss and sample count, and whether a stop was requested (the epoch
    then ends after the step that saw it)."""
    rank, world = dist_info()
    net.train()
    loss_sum = seen = 0.0
    bar = tqdm(
        loader,
        desc=f"epoch {epoch}/{config.epochs}",
        leave=False,
        disable=None if rank == 0 else True,
    )
    for x, y in bar:
        loss = criterion(net(x), y)
        if penalty is not None:
            loss = loss + penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item() * len(y)
        seen += len(y)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if _stop_requested(world):
            bar.close()
            return loss_sum, seen, True
    return loss_sum, seen, False


def _finish_epoch(
    epoch: int,
    loss_sum: float,
    seen: float,
    t0: float,
    model: nn.Module,
    valid_loader: DataLoader,
    num_classes: int,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    say: Callable[[str], None],
) -> dict[str, float]:
    """The epoch's history entry (training loss over every process, validation metrics, learning
    rate, speed), said as the metric line and a line of speed."""
    train_seconds = time.perf_counter() - t0
    train_loss_sum, train_n = _all_reduce_sum([loss_sum, seen])
    entry = {"epoch": epoch, "train_loss": train_loss_sum / train_n}
    # The bare model: DDP's forward would sync buffers, and ranks may hold unequal shares.
    entry.update(evaluate_loader(model, valid_loader, num_classes))
    entry["lr"] = optimizer.param_groups[0]["lr"]
    entry["seconds"] = time.perf_counter() - t0
    entry["images_per_second"] = train_n / train_seconds
    say(metric_line(entry))
    say(
        f"epoch {epoch}/{config.epochs}: {int(train_n)} images in {train_seconds:.1f} s "
        f"({entry['images_per_second']:.1f} images/s), lr {entry['lr']:.2e}"
    )
    return entry


def _plan_line(config: TrainConfig, model: nn.Module, train_loader: DataLoader, world: int) -> str:
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (
        f"training {config.arch} ({config.mode_of()}: {trained:,} trained parameters) for "
        f"{config.epochs} epochs, {len(train_loader)} steps of {train_loader.batch_size} x "
        f"{world} images, {config.optimizer} lr {config.learning_rate:g}, {config.scheduler}, "
        f"balance {config.balance}, {torch.get_num_threads()} threads"
    )


def fit(
    train_records: Sequence[Record],
    valid_records: Sequence[Record],
    config: TrainConfig,
    work_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    *,
    labels: Sequence[str] | None = None,
    image_cache: ImageCache | None = None,
    unlabelled: Sequence[Path] = (),
) -> FitResult:
    """Train on ``train_records``, pick the best epoch on ``valid_records``.

    ``work_dir`` is the checkpoint folder: a checkpoint is written there after every epoch
    and training resumes from it when it holds one (None: no checkpoints). ``log`` receives
    every line to print (the metric lines only on rank 0). ``labels`` fixes the label order
    (default: every label of both sets, in stage order). ``image_cache`` shares
    preprocessed images between calls (cross-validation folds); it must use
    ``config.preprocess``. ``unlabelled`` are paths of images without a stage, used by the
    probe (``flystage.training.unlabelled``). Runs data-parallel when torch.distributed is
    initialised.

    Raises ``TrainingStopped`` on SIGTERM (``STOP``) or at ``config.stop_after_epoch``.
    """
    rank, world = dist_info()
    say = log if rank == 0 else (lambda line: None)
    if config.threads > 0:
        torch.set_num_threads(config.threads)

    labels, setup = _setup(
        train_records, valid_records, config, labels, image_cache, say, unlabelled
    )
    model = setup.model
    if setup.solved:
        return _solved(setup, labels, config, say)
    sampler, train_loader, valid_loader = _loaders(setup, config)

    # Loss, optimiser, schedule. The same seed on every rank gave the same initial weights
    # (DDP also broadcasts rank 0's). Then resume after an interruption.
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    weight = class_weights(setup.targets, len(labels)) if config.balance == "loss" else None
    criterion = (
        OrdinalLoss(len(labels), config.ordinal_smoothing, weight, config.label_smoothing)
        if config.ordinal_smoothing
        else nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    )
    optimizer = make_optimizer(setup.param_groups, config)
    scheduler = make_scheduler(optimizer, config, len(train_loader))
    checkpoint = Path(work_dir) / CHECKPOINT_FILE if work_dir is not None else None
    state = _resume(checkpoint, labels, config, model, optimizer, scheduler, say)
    run = (labels, config, model, optimizer, scheduler)  # what a checkpoint saves besides the state
    best_so_far = functools.partial(_best_so_far, state, model, setup, labels, config)

    say(_plan_line(config, model, train_loader, world))
    for epoch in range(state.epoch + 1, 0 if state.out_of_patience(config) else config.epochs + 1):
        # Reseeding from (seed, rank, epoch) makes a resumed run draw what the original would.
        _seed_everything(config.seed + 1000 * rank + epoch)
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        loss_sum, seen, stopped = train_one_epoch(
            net, criterion, optimizer, scheduler, train_loader, setup.penalty, epoch, config
        )
        state.samples_seen += int(seen)
        if stopped:
            _stop_on_sigterm(epoch, state, checkpoint, run, say, best_so_far)
        entry = _finish_epoch(
            epoch, loss_sum, seen, t0, model, valid_loader, len(labels), optimizer, config, say
        )
        state.record(entry, model)
        _save_state(checkpoint, state, *run)
        if state.out_of_patience(config):
            say(
                f"early stop: no better valid_top1 for {state.bad_epochs} epochs (best "
                f"{state.best['valid_top1']:.4f} at epoch {state.best['epoch']})"
            )
            break
        if config.stop_after_epoch and epoch >= config.stop_after_epoch and epoch < config.epochs:
            say(
                f"stopping after epoch {epoch} as asked (stop_after_epoch); checkpoint saved to "
                f"{checkpoint}"
            )
            raise TrainingStopped(
                f"stopped after epoch {epoch} (stop_after_epoch)", epoch, checkpoint, best_so_far()
            )

    return _best_result(state, setup, model, labels, config, checkpoint, say)


def _stop_on_sigterm(
    epoch: int,
    state: TrainState,
    checkpoint: Path | None,
    run: tuple,
    say: Callable[[str], None],
    best_so_far: Callable[[], FitResult],
) -> NoReturn:
    """Save the state reached in ``epoch`` and raise ``TrainingStopped`` (SIGTERM)."""
    # The checkpoint says epoch - 1: a restart runs this epoch again, from the weights
    # reached so far.
    _save_state(checkpoint, state, *run)
    say(
        f"SIGTERM: stopped in epoch {epoch} after a step; "
        + (
            f"checkpoint saved to {checkpoint}"
            if checkpoint
            else "no checkpoint dir, nothing saved"
        )
    )
    raise TrainingStopped(
        f"stopped by SIGTERM in epoch {epoch}", state.epoch, checkpoint, best_so_far()
    )


def _best_result(
    state: TrainState,
    setup: Any,
    model: nn.Module,
    labels: list[str],
    config: TrainConfig,
    checkpoint: Path | None,
    say: Callable[[str], None],
) -> FitResult:
    """The model at its best epoch, said and returned as the run's result."""
    if state.best_state is None:  # resumed from a checkpoint of a run that had already finished
        raise DataError(f"{checkpoint} holds no trained epoch; remove it and train again")
    say(
        f"best epoch {state.best['epoch']}: valid_top1={state.best['valid_top1']:.4f} "
        f"valid_top3={state.best['valid_top3']:.4f} valid_loss={state.best['valid_loss']:.4f}"
    )
    return _result_at_best(state, setup, model, labels, config)


def _solved(
    setup: Any, labels: list[str], config: TrainConfig, say: Callable[[str], None]
) -> FitResult:
    """The result of a mode that fitted its model in closed form: one metric line (epoch 1),
    so tuners and logs read it like any run."""
    rank, world = dist_info()
    train = DataLoader(Subset(setup.train_set, range(rank, len(setup.train_set), world)), 256)
    valid = DataLoader(Subset(setup.valid_set, range(rank, len(setup.valid_set), world)), 256)
    entry = {
        "epoch": 1,
        "train_loss": evaluate_loader(setup.model, train, len(labels))["valid_loss"],
    }
    entry.update(evaluate_loader(setup.model, valid, len(labels)))
    say(metric_line(entry))
    model = setup.finish(setup.model).eval()
    return FitResult(
        model,
        labels,
        [entry],
        dict(entry),
        config,
        len(setup.train_set),
        spec=config.model_spec(),
        pseudo_labels=setup.pseudo_labels,
    )

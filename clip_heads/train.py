"""The one training loop of clip-heads: heads on cached vectors and full CLIP fine-tuning use it.

A :class:`Trainer` owns a model, a ``loss_fn(batch) -> loss`` closure and a per-epoch batch
factory ``batches(epoch) -> iterable`` (or ``batches(epoch, start)``, which resumes mid-epoch
without producing the skipped batches: a DataLoader then need not decode them). It builds AdamW (no decay on biases and norms), a
warm-up + cosine schedule, accumulates gradients, autocasts on GPU if asked, early-stops on a
validation callback keeping the best weights, and can be checkpointed and resumed exactly
through ``state_dict()`` / ``load_state_dict()``.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import logging
import math
import random
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "TensorBatches", "fit_loop", "cosine_with_warmup", "seed_everything",
           "get_rng_state", "set_rng_state"]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Snapshot of every random stream a training step may draw from.

    Only tensors and plain Python values, so a checkpoint loads with ``torch.load(weights_only=True)``.
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a snapshot taken by :func:`get_rng_state`."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                       min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to the base lr over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio * lr`` at ``total_steps``. Step it once per optimizer step."""
    def factor(step: int) -> float:
        # (step + 1) so that the very first update is not wasted at lr 0.
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TensorBatches:
    """Per-epoch mini-batches of in-memory tensors, by slicing one random permutation.

    The order of epoch ``e`` depends only on ``(seed, e)``, so resuming needs no generator
    state, and no per-sample Python work is done: each batch is one fancy-index per tensor.

    Parameters
    ----------
    *tensors : torch.Tensor
        Tensors sharing their first dimension ``n_samples``.
    batch_size : int
        Rows per batch; the last batch of an epoch may be smaller unless ``drop_last``.
    shuffle : bool
        Draw a fresh permutation per epoch; otherwise keep the stored order.
    seed : int
        Seed of the permutations.
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        if len({len(t) for t in tensors}) != 1:
            raise ValueError(f"tensors must share their first dimension, got {[len(t) for t in tensors]}")
        self.tensors, self.batch_size, self.shuffle, self.seed = tensors, int(batch_size), shuffle, seed
        self.drop_last, self.n = drop_last, len(tensors[0])

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __call__(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches of ``epoch``, from batch number ``start`` on (a resumed run skips the rest)."""
        device = self.tensors[0].device
        if self.shuffle:
            # SeedSequence mixes (seed, epoch) into independent, reproducible streams.
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
            order = torch.randperm(self.n, generator=g).to(device)
        else:
            order = torch.arange(self.n, device=device)
        for i in range(start, len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield tuple(t.index_select(0, idx) for t in self.tensors)  # ~5x faster than t[idx] on CPU


class Trainer:
    """Generic loop: ``for epoch: for batch in batches(epoch): loss_fn(batch).backward() ...``.

    Parameters
    ----------
    model : torch.nn.Module
        Trained in place; on return it holds the best weights if ``eval_fn`` was given.
    loss_fn : callable
        ``loss_fn(batch) -> scalar tensor``; the batch arrives already moved to ``device``.
    batches : callable
        ``batches(epoch) -> iterable of batches``; ``len(batches)`` (or ``steps_per_epoch``)
        gives micro-batches per epoch for the schedule. The order of an epoch must depend on
        ``epoch`` only, so a resumed run sees the same batches. If it takes a ``start``
        argument, ``batches(epoch, start)`` must yield that epoch's batches from ``start`` on;
        otherwise the first ``start`` batches are produced and dropped.
    epochs : int
        Maximum number of epochs.
    lr, weight_decay, betas : float
        AdamW settings; weight decay spares parameters with fewer than two dimensions.
    warmup_steps : int or float
        Warm-up in optimizer steps, or a fraction of all steps when < 1.
    schedule : {"cosine", "constant", "plateau"}
        Learning-rate shape after warm-up. ``"plateau"`` is a constant rate that runs until the
        monitored score has not improved for ``patience`` epochs: training ends because it has
        converged, and ``epochs`` is only a safety cap (a warning says so when the cap is what
        stopped it). The monitored score is ``eval_fn()`` when given, otherwise minus the
        epoch's mean training loss.
    grad_accum : int
        Micro-batches summed into one optimizer step.
    max_grad_norm : float, optional
        Clip the gradient norm before each step.
    amp : bool or {"bf16", "fp16"}
        Autocast, used on CUDA only: ``True`` or ``"bf16"`` (no loss scaling needed), or
        ``"fp16"`` with a ``GradScaler`` (part of ``state_dict()``).
    eval_fn : callable, optional
        ``eval_fn() -> float``, higher is better, run after every epoch in inference mode.
    patience : int, optional
        Stop after this many epochs without an improvement of the monitored score by more
        than ``min_delta``. Required by ``"plateau"``.
    min_delta : float
        How much the score must rise to count as an improvement.
    seed : int
        Seeds torch at the start of training; the caller's torch stream is left untouched.
    on_step, on_epoch_end : callable, optional
        ``f(trainer, logs)`` hooks, after every optimizer step (the short last step of an epoch
        included) and every epoch; set ``trainer.should_stop = True`` to stop, call
        ``trainer.state_dict()`` inside them to checkpoint.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[Any], torch.Tensor],
                 batches: Callable[[int], Iterable], *, epochs: int = 10, lr: float = 1e-3,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 warmup_steps: float = 0, schedule: str = "cosine", grad_accum: int = 1,
                 max_grad_norm: float | None = None, device: str | torch.device = "cpu", amp: bool | str = False,
                 eval_fn: Callable[[], float] | None = None, patience: int | None = None,
                 min_delta: float = 0.0,
                 steps_per_epoch: int | None = None, seed: int = 0,
                 on_step: Callable[["Trainer", dict], None] | None = None,
                 on_epoch_end: Callable[["Trainer", dict], None] | None = None) -> None:
        if schedule not in ("cosine", "constant", "plateau"):
            raise ValueError(f"schedule must be 'cosine', 'constant' or 'plateau', got {schedule!r}")
        if schedule == "plateau" and (patience is None or patience < 1):
            raise ValueError(f"schedule 'plateau' needs patience >= 1 (epochs without improvement), got {patience!r}")
        if grad_accum < 1 or epochs < 1:
            raise ValueError(f"grad_accum and epochs must be >= 1, got {grad_accum} and {epochs}")
        self.model, self.loss_fn, self.batches = model, loss_fn, batches
        self.epochs, self.grad_accum, self.max_grad_norm = epochs, grad_accum, max_grad_norm
        self.device, self.eval_fn, self.patience, self.seed = torch.device(device), eval_fn, patience, seed
        self.schedule, self.min_delta = schedule, min_delta
        if amp not in (False, True, "bf16", "fp16"):
            raise ValueError(f"amp must be False, True, 'bf16' or 'fp16', got {amp!r}")
        self.amp = bool(amp) and self.device.type == "cuda"
        self.amp_dtype = torch.float16 if amp == "fp16" else torch.bfloat16
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler("cuda") if self.amp and amp == "fp16" else None
        self.on_step, self.on_epoch_end = on_step, on_epoch_end
        micro = steps_per_epoch if steps_per_epoch is not None else len(batches)  # type: ignore[arg-type]
        total = epochs * math.ceil(micro / grad_accum)
        warmup = int(warmup_steps * total) if 0 < warmup_steps < 1 else int(warmup_steps)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)
        if schedule == "cosine":
            self.scheduler = cosine_with_warmup(self.optimizer, warmup, total)
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)))
        # Progress: `epoch` epochs are complete, plus `batch_in_epoch` micro-batches of the next.
        self.epoch = self.step = self.batch_in_epoch = 0
        self.loss_curve: list[float] = []
        self.val_scores: list[float] = []
        self.best_score, self.best_epoch, self._best_weights = -math.inf, -1, None
        # Why the last fit() ended: "plateau", "early_stop", "epochs" (the cap) or "stopped" (a hook).
        self.stop_reason: str | None = None
        self.should_stop, self._rng, self._running = False, None, False

    def _rng_fork(self) -> contextlib.AbstractContextManager:
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def _to_device(self, batch: Any) -> Any:
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to_device(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self._to_device(v) for k, v in batch.items()}
        return batch

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip true gradients, not scaled ones
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def fit(self) -> "Trainer":
        """Train from the current progress (zero, or what ``load_state_dict`` restored)."""
        with self._rng_fork():
            if self._rng is None:
                torch.manual_seed(self.seed)
            else:
                set_rng_state(self._rng)
            self._running, self.stop_reason = True, None
            try:
                self._run()
            finally:
                self._rng, self._running = get_rng_state(), False
        if self.stop_reason is None:
            self.stop_reason = "stopped" if self.should_stop else "epochs"
        if self.stop_reason == "epochs" and self.schedule == "plateau":
            logger.warning("training stopped at its epoch cap (epochs=%d) before the %s reached a plateau "
                           "(best at epoch %d, patience %d): raise epochs", self.epochs,
                           "validation score" if self.eval_fn is not None else "training loss",
                           self.best_epoch, self.patience)
        if self._best_weights is not None:
            self.model.load_state_dict(self._best_weights)
        return self

    def _run(self) -> None:
        self.model.train()
        while self.epoch < self.epochs and not self.should_stop:
            loss_sum, n = torch.zeros((), device=self.device), 0
            for batch in self._epoch_batches():
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                    loss = self.loss_fn(self._to_device(batch))
                scaled = loss / self.grad_accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                loss_sum += loss.detach().float()
                n += 1
                self.batch_in_epoch += 1
                if self.batch_in_epoch % self.grad_accum == 0:
                    self._step_and_report(loss)
                    if self.should_stop:
                        return
            if self.batch_in_epoch % self.grad_accum:  # a short tail still counts as a step
                # Round progress up to a step boundary, so a checkpoint taken in on_step does not
                # take this step again on resume.
                self.batch_in_epoch += self.grad_accum - self.batch_in_epoch % self.grad_accum
                self._step_and_report(loss)
            self.loss_curve.append(loss_sum.item() / max(n, 1))
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            logs = {"epoch": self.epoch, "loss": self.loss_curve[-1], "lr": self.scheduler.get_last_lr()[0]}
            if self.eval_fn is not None:
                logs["val_score"] = self._evaluate()
            elif self.schedule == "plateau":
                self._monitor(-self.loss_curve[-1])
            logger.debug("epoch %d: %s", self.epoch, logs)
            if self.on_epoch_end is not None:
                self.on_epoch_end(self, logs)

    def _epoch_batches(self) -> Iterable:
        # Resuming mid-epoch replays the same order and skips what was already seen.
        start = self.batch_in_epoch
        try:
            takes_start = "start" in inspect.signature(self.batches).parameters
        except (TypeError, ValueError):
            takes_start = False
        if takes_start:
            return self.batches(self.epoch, start=start)
        return itertools.islice(self.batches(self.epoch), start, None)

    def _step_and_report(self, loss: torch.Tensor) -> None:
        self._optimizer_step()
        if self.on_step is not None:
            self.on_step(self, {"step": self.step, "epoch": self.epoch, "loss": loss.item(),
                                "lr": self.scheduler.get_last_lr()[0]})

    def _evaluate(self) -> float:
        self.model.eval()
        with torch.inference_mode():
            score = float(self.eval_fn())  # type: ignore[misc]
        self.model.train()
        self.val_scores.append(score)
        self._monitor(score)
        return score

    def _monitor(self, score: float) -> None:
        """Track the best score (and, with ``eval_fn``, its weights); stop once it stops improving."""
        if score > self.best_score + self.min_delta:
            self.best_score, self.best_epoch = score, self.epoch
            if self.eval_fn is not None:
                self._best_weights = copy.deepcopy(self.model.state_dict())
        elif self.patience is not None and self.epoch - self.best_epoch >= self.patience:
            plateau = self.schedule == "plateau"
            logger.info("%s at epoch %d: no improvement for %d epochs, best %.4g at epoch %d",
                        "converged" if plateau else "early stop", self.epoch, self.patience, self.best_score,
                        self.best_epoch)
            self.should_stop, self.stop_reason = True, "plateau" if plateau else "early_stop"

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: weights, optimizer, schedule, loss scaler, RNG, progress."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": get_rng_state() if self._running else self._rng,
                "progress": {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch},
                "history": {"loss_curve": list(self.loss_curve), "val_scores": list(self.val_scores),
                            "best_score": self.best_score, "best_epoch": self.best_epoch},
                "best_weights": self._best_weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next :meth:`fit` continues where it stopped."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._rng = state["rng"]
        self.epoch, self.step, self.batch_in_epoch = (state["progress"][k] for k in ("epoch", "step", "batch_in_epoch"))
        h = state["history"]
        self.loss_curve, self.val_scores = list(h["loss_curve"]), list(h["val_scores"])
        self.best_score, self.best_epoch, self._best_weights = h["best_score"], h["best_epoch"], state["best_weights"]
        self.should_stop = False


def fit_loop(model: torch.nn.Module, loss_fn: Callable[[Any], torch.Tensor], batches: Callable[[int], Iterable],
             **config: Any) -> Trainer:
    """Build a :class:`Trainer` with ``config`` and run it; returns the trainer (its history)."""
    return Trainer(model, loss_fn, batches, **config).fit()

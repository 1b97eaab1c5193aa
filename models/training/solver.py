"""Optimizers, learning-rate schedules, the L1 penalty and the training step for :mod:`cvserve.models.training.engine`."""

from __future__ import annotations

from typing import Any

# isort: split

import torch
from detectron2.solver.build import get_default_optimizer_params
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
from fvcore.common.param_scheduler import (
    ConstantParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)

from cvserve.models.precision import autocast
from cvserve.models.training.options import TrainOptions

__all__ = ["build_lr_scheduler", "build_optimizer", "l1_penalty", "train_step"]


def build_optimizer(model: torch.nn.Module, options: TrainOptions) -> torch.optim.Optimizer:
    """The optimizer ``options.optimizer`` names, without weight decay on norm layers."""
    params = get_default_optimizer_params(
        model, base_lr=options.lr, weight_decay=options.weight_decay, weight_decay_norm=0.0
    )
    if options.optimizer == "sgd":
        return torch.optim.SGD(params, lr=options.lr, momentum=options.momentum)
    if options.optimizer == "adam":
        return torch.optim.Adam(params, lr=options.lr)
    if options.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=options.lr)
    if options.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=options.lr, momentum=options.momentum)
    raise ValueError(f"unknown optimizer {options.optimizer!r}")


def _multiplier(options: TrainOptions) -> ParamScheduler:
    if options.lr_schedule == "constant":
        return ConstantParamScheduler(1.0)
    if options.lr_schedule == "linear":
        return LinearParamScheduler(1.0, 0.0)
    if options.lr_schedule == "cosine":
        return CosineParamScheduler(1.0, 0.0)
    steps = list(options.lr_steps) or [int(options.max_iter * 2 / 3), int(options.max_iter * 8 / 9)]
    # fvcore needs strictly increasing milestones inside (0, max_iter); short runs collapse them.
    steps = sorted({s for s in steps if 0 < s < options.max_iter})
    return MultiStepParamScheduler(
        values=[0.1**k for k in range(len(steps) + 1)], milestones=steps, num_updates=options.max_iter
    )


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, options: TrainOptions
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up from 0.1% of the base rate, then the chosen schedule; step once per iteration."""
    sched = _multiplier(options)
    if options.warmup_iters:
        sched = WarmupParamScheduler(sched, 0.001, options.warmup_iters / options.max_iter, "linear")
    return LRMultiplier(optimizer, sched, options.max_iter)


def l1_penalty(model: torch.nn.Module) -> torch.Tensor:
    """Sum of absolute values of conv and linear weights (tensors of 2 or more dims)."""
    terms = [p.abs().sum() for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def _clip_gradients(model: torch.nn.Module, options: TrainOptions) -> None:
    # detectron2's CLIP_TYPE "norm" clips each parameter's gradient on its own; clipping the
    # whole model's norm to the same value throttles training from scratch, where the
    # global norm is large. "full_model" is the global variant, for those who want it.
    if options.grad_clip_type == "full_model":
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
        return
    for p in model.parameters():
        if p.grad is not None:
            torch.nn.utils.clip_grad_norm_(p, options.grad_clip)


def train_step(
    model: torch.nn.Module,
    batch: list[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    options: TrainOptions,
    device: str = "cpu",
    precision: str = "fp32",
) -> dict[str, float]:
    """One optimisation step on ``batch``; returns the loss values (``total_loss`` included).

    Raises:
        FloatingPointError: the loss is NaN or infinite.
    """
    with autocast(device, precision):  # the serving path's context: one for CUDA fp16 and CPU bf16
        loss_dict = model(batch)
    total = sum(loss_dict.values())
    values = {k: float(v.detach()) for k, v in loss_dict.items()}
    if options.l1:
        penalty = options.l1 * l1_penalty(model)
        total = total + penalty
        values["l1_loss"] = float(penalty.detach())
    if not torch.isfinite(total):
        raise FloatingPointError(
            f"training diverged: loss is {float(total)} ({values}); lower --lr or raise --warmup-iters"
        )
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if options.grad_clip:
        scaler.unscale_(optimizer)
        _clip_gradients(model, options)
    scaler.step(optimizer)
    scaler.update()
    values["total_loss"] = float(total.detach())
    return values

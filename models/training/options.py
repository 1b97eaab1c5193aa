"""Training hyper-parameters and the command-line flags every training command shares."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from cvserve.models.repository import PRECISIONS

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainOptions",
    "add_train_options",
    "options_from_args",
]

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("step", "linear", "cosine", "constant")


@dataclass
class TrainOptions:
    """How to train. Defaults suit the tiny models on a CPU.

    Attributes:
        optimizer: ``sgd``, ``adam``, ``adamw`` or ``rmsprop``.
        lr: base learning rate.
        momentum: SGD / RMSprop momentum (Adam's beta1 stays at its default).
        weight_decay: L2 penalty (decoupled for AdamW); not applied to norm layers.
        l1: L1 penalty weight on conv / linear weights, 0 = off.
        dropout: dropout probability for models that read ``MODEL.SEM_SEG_HEAD.DROPOUT``.
        batch_size: images per iteration.
        max_iter: training iterations.
        warmup_iters: linear warm-up iterations.
        lr_schedule: ``step`` (x0.1 at each of ``lr_steps``), ``linear`` (straight down to 0
            at ``max_iter``), ``cosine`` or ``constant``.
        lr_steps: iterations of the step decays; empty = 2/3 and 8/9 of ``max_iter``.
        grad_clip: gradient norm clip, 0 = off.
        grad_clip_type: ``norm`` clips each parameter's gradient (detectron2's
            ``CLIP_TYPE: norm``); ``full_model`` clips the norm of all gradients together.
        hflip: random horizontal flips.
        vflip: random vertical flips.
        scale_jitter: ``(min, max)`` short-edge range, factors (<= 8) or pixels; None = config.
        crop: relative random crop size, None = off.
        rotation: maximum random rotation in degrees, 0 = off.
        color_jitter: colour jitter strength in [0, 1), 0 = off.
        noise_std: maximum Gaussian noise std (pixel values), 0 = off.
        eval_period: evaluate on the validation set every this many iterations (and at the end).
        early_stop_patience: evaluations without improvement before stopping, 0 = off.
        early_stop_metric: metric selecting the best checkpoint, e.g. ``segm/AP``,
            ``bbox/AP``, ``sem_seg/mIoU``; empty = the first of those the evaluator reports.
        seed: seed of every random generator.
        num_workers: data loader processes (at most 2) of each training process.
        processes: data-parallel training processes on this machine, each taking
            ``batch_size / processes`` images per iteration: single-thread processes sharing
            the CPU cores, or one GPU each (``device`` ``cuda``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``: the forward and loss under
            autocast (:func:`cvserve.models.precision.resolve_precision`); weights,
            gradients and optimizer state stay fp32.
        log_period: iterations between progress lines.
    """

    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    l1: float = 0.0
    dropout: float = 0.0
    batch_size: int = 4
    max_iter: int = 600
    warmup_iters: int = 100
    lr_schedule: str = "step"
    lr_steps: tuple[int, ...] = ()
    grad_clip: float = 5.0
    grad_clip_type: str = "norm"
    hflip: bool = True
    vflip: bool = False
    scale_jitter: tuple[float, float] | None = None
    crop: float | None = None
    rotation: float = 0.0
    color_jitter: float = 0.0
    noise_std: float = 0.0
    eval_period: int = 200
    early_stop_patience: int = 0
    early_stop_metric: str = ""
    seed: int = 0
    num_workers: int = 1
    processes: int = 1
    device: str = "auto"
    precision: str = "auto"
    log_period: int = 20

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        checks = [
            (self.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}"),
            (self.lr_schedule in SCHEDULES, "lr_schedule", f"one of {', '.join(SCHEDULES)}"),
            (self.lr > 0, "lr", "> 0"),
            (self.momentum >= 0, "momentum", ">= 0"),
            (self.weight_decay >= 0, "weight_decay", ">= 0"),
            (self.l1 >= 0, "l1", ">= 0"),
            (0 <= self.dropout < 1, "dropout", "in [0, 1)"),
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.max_iter >= 1, "max_iter", ">= 1"),
            (0 <= self.warmup_iters <= self.max_iter, "warmup_iters", "in [0, max_iter]"),
            (all(0 < s < self.max_iter for s in self.lr_steps), "lr_steps", "inside (0, max_iter)"),
            (self.grad_clip >= 0, "grad_clip", ">= 0"),
            (self.grad_clip_type in ("norm", "full_model"), "grad_clip_type", "norm or full_model"),
            (self.crop is None or 0 < self.crop <= 1, "crop", "in (0, 1]"),
            (0 <= self.rotation <= 180, "rotation", "in [0, 180]"),
            (0 <= self.color_jitter < 1, "color_jitter", "in [0, 1)"),
            (self.noise_std >= 0, "noise_std", ">= 0"),
            (self.eval_period >= 1, "eval_period", ">= 1"),
            (self.early_stop_patience >= 0, "early_stop_patience", ">= 0"),
            (0 <= self.num_workers <= 2, "num_workers", "in [0, 2]"),
            (self.processes >= 1, "processes", ">= 1"),
            (
                self.batch_size % self.processes == 0,
                "batch_size",
                f"a multiple of processes ({self.processes})",
            ),
            (self.log_period >= 1, "log_period", ">= 1"),
            (self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"training option {name} must be {rule}, got {getattr(self, name)!r}")
        if self.scale_jitter is not None and (
            len(self.scale_jitter) != 2 or not 0 < self.scale_jitter[0] <= self.scale_jitter[1]
        ):
            raise ValueError(
                f"training option scale_jitter must be (min, max), 0 < min <= max, got {self.scale_jitter}"
            )


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`TrainOptions` field (``--max-iter`` for ``max_iter``...)."""
    d = TrainOptions()
    g = parser.add_argument_group("training")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    g.add_argument("--lr", type=float, default=d.lr, help=f"base learning rate (default {d.lr})")
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 penalty")
    g.add_argument("--l1", type=float, default=d.l1, help="L1 penalty weight on weights (0 = off)")
    g.add_argument("--dropout", type=float, default=d.dropout, help="head dropout where the model has one")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--max-iter", type=int, default=d.max_iter)
    g.add_argument("--warmup-iters", type=int, default=d.warmup_iters)
    g.add_argument("--lr-schedule", choices=SCHEDULES, default=d.lr_schedule)
    g.add_argument(
        "--lr-steps", type=int, nargs="*", default=list(d.lr_steps), help="iterations of x0.1 decays"
    )
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient norm clip (0 = off)")
    g.add_argument(
        "--grad-clip-type",
        choices=["norm", "full_model"],
        default=d.grad_clip_type,
        help="clip each parameter's gradient norm (detectron2's 'norm') or the whole model's",
    )
    _add_augmentation_flags(g, d)
    g.add_argument("--eval-period", type=int, default=d.eval_period)
    g.add_argument(
        "--early-stop-patience",
        type=int,
        default=d.early_stop_patience,
        help="evaluations without improvement before stopping (0 = off)",
    )
    g.add_argument(
        "--early-stop-metric",
        default=d.early_stop_metric,
        help="e.g. segm/AP, bbox/AP, sem_seg/mIoU (default: the first reported)",
    )
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--num-workers", type=int, default=d.num_workers, help="data loader processes (0-2)")
    g.add_argument(
        "--processes",
        type=int,
        default=d.processes,
        help="data-parallel training processes: CPU cores shared out, or one GPU each (default 1)",
    )
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="autocast precision; auto: fp16 on CUDA, bf16 on a CPU with native bf16, else fp32",
    )
    g.add_argument("--log-period", type=int, default=d.log_period)


def _add_augmentation_flags(g: argparse._ArgumentGroup, d: TrainOptions) -> None:
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=d.hflip)
    g.add_argument("--vflip", action=argparse.BooleanOptionalAction, default=d.vflip)
    g.add_argument(
        "--scale-jitter",
        type=float,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=d.scale_jitter,
        help="short-edge range: factors (<= 8) of the training size or pixels",
    )
    g.add_argument("--crop", type=float, default=d.crop, help="relative random crop size (default off)")
    g.add_argument("--rotation", type=float, default=d.rotation, help="max rotation in degrees (0 = off)")
    g.add_argument("--color-jitter", type=float, default=d.color_jitter, help="strength in [0, 1) (0 = off)")
    g.add_argument("--noise-std", type=float, default=d.noise_std, help="max Gaussian noise std (0 = off)")


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """Build :class:`TrainOptions` from parsed flags; raises ``ValueError`` on an invalid value."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainOptions) if hasattr(args, f.name)}
    if values.get("lr_steps") is not None:
        values["lr_steps"] = tuple(values["lr_steps"])
    if values.get("scale_jitter") is not None:
        values["scale_jitter"] = tuple(values["scale_jitter"])
    return TrainOptions(**values)

"""The demo build's recipe: dataset sizes, and how each model trains.

:data:`cvserve.models.demo.build.DEMO_SCALE` is the shipped demo; :func:`cvserve.models.demo.build.toy_scale` is a
seconds-long one for tests. Every figure the comments quote is in benchmarks/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DemoScale"]


@dataclass(frozen=True)
class DemoScale:
    """Sizes of the demo build; the defaults are the shipped demo, tests use toy values."""

    train_images: int = 400
    val_images: int = 50
    test_images: int = 100
    image_size: int = 256  # the dataset's images
    # The detector trains at a short edge drawn per image from these (INPUT.MIN_SIZE_TRAIN),
    # about the cost of 192 px, and is tested at the images' own 256 px: 75.2 test segm AP
    # against 70.1 at 192 px, and 70.6 for training and testing at 192 (benchmarks/README.md,
    # "Several training sizes, testing at 256 px, and AdamW"). Predictions are in image pixels.
    instance_train_sizes: tuple[int, ...] = (160, 176, 192, 208, 224)
    instance_test_size: int = 256
    # The segmenter's short edge in training and testing (INPUT.MIN_SIZE_*): at 192 px a
    # step costs 0.7 of one at 256 (benchmarks/README.md, "The demo recipe at 192 px").
    semantic_input_size: int = 192
    # A 6.6-minute build on the faster of the 2-core machines measured; the previous recipe,
    # of the same cost, took 10.5 on the slower, which leaves room for a 10-20 % drift under
    # the 12-minute budget. More iterations buy accuracy: 800 detector and 1100 segmenter
    # steps scored 88.1 / 80.8 AP and 88.2 mIoU against 86.8 / 78.5 and 87.6, for 1.09x the
    # time (benchmarks/README.md).
    # The detector trains data-parallel: 2 single-thread processes of 4 images each moved
    # 1.3x the images per second of one 2-thread process (benchmarks/train_speed.py).
    # That is the CPU's count; on CUDA the build runs one process per GPU (at most as many as
    # divide the batch: models.device.data_parallel_processes), the same 8 images per step.
    # bf16 autocast (training_precision below) trains 1.26x faster on this project's 2-core
    # AVX512-BF16 CPU; the build spends that on steps: 880 / 1300 iterations in bf16 built in
    # 658 s to 88.7 bbox / 81.8 segm AP and 89.1 mIoU, against 700 / 1000 in fp32 in 689 s to
    # 86.5 / 78.5 and 87.9 (benchmarks/README.md, "Training in bf16"). On a CPU without native
    # bf16 the same recipe trains in fp32: by the step counts about 1.25x that fp32 build (not measured).
    instance_iters: int = 880
    instance_eval_period: int = 440
    instance_batch_size: int = 8
    # AdamW (decoupled weight decay, none on norm layers): in the same 800 steps, 88.1 bbox
    # and 80.9 segm test AP against 84.0 / 75.2 for SGD with momentum at lr 0.02
    # (benchmarks/README.md, "Several training sizes, testing at 256 px, and AdamW").
    instance_optimizer: str = "adamw"
    instance_lr: float = 0.001
    instance_weight_decay: float = 0.01
    processes: int = 2
    # Training precision of both models (cvserve.models.precision.resolve_precision):
    # auto is bf16 autocast on a CPU with native bf16, fp16 on CUDA, else fp32.
    training_precision: str = "auto"
    # Iterations of 4 images, 0.11-0.19 s each; 8 images on two processes did worse in the
    # same time (benchmarks/README.md).
    semantic_iters: int = 1300
    semantic_eval_period: int = 650
    # AdamW: from the same encoder in the same 1100 iterations, 87.9 test mIoU at 2e-3 and
    # 85.2 at 1e-3, against 82.8 for SGD with momentum at 0.02 (benchmarks/README.md,
    # "Several training sizes, testing at 256 px, and AdamW").
    semantic_optimizer: str = "adamw"
    semantic_lr: float = 0.002
    semantic_weight_decay: float = 0.01  # decoupled (AdamW)
    # ENet weights from the training labels: object pixels weigh 12-18 times background
    # ones (see models/semseg/class_weights.py and benchmarks/README.md).
    semantic_class_weights: str | None = "balanced"
    # Both runs divide the rate by 10 at these fractions of their iterations (detectron2's
    # 3x schedule steps at 0.78 and 0.93). Stepping at 2/3 and 8/9 instead cost the detector
    # 2.4 bbox and 4.3 segm test AP in the same 900 steps (benchmarks/README.md, "Later
    # learning-rate steps").
    lr_step_fractions: tuple[float, ...] = (0.85, 0.98)
    num_workers: int = 1

    def lr_steps(self, iters: int) -> tuple[int, ...]:
        """The iterations of a run of ``iters`` at which the rate drops (none that do not fit)."""
        return tuple(sorted({s for f in self.lr_step_fractions if 0 < (s := round(f * iters)) < iters}))

# The C extension built from _roi_align.c (see cvserve.models.instance.nhwc_roi_align).

from collections.abc import Sequence

def pool(
    maps: Sequence[tuple[int, int, int, float]],
    is_bf16: bool,
    n_images: int,
    channels: int,
    rois: int,
    n_rois: int,
    levels: int,
    pooled_h: int,
    pooled_w: int,
    sampling_ratio: int,
    aligned: bool,
    output: int,
    out_bf16: bool,
    threads: int,
    /,
) -> int: ...
def set_openmp(gomp_parallel: int, /) -> None: ...
def isa() -> str: ...

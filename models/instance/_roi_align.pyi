# The C extension built from _roi_align.c (see cvserve.models.instance.nhwc_roi_align).

def forward(
    input: int,
    is_bf16: bool,
    n_images: int,
    height: int,
    width: int,
    channels: int,
    rois: int,
    n_rois: int,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    output: int,
    /,
) -> int: ...
def isa() -> str: ...

# The C extension built from _nms.c (see cvserve.models.instance.proposals).

def groups(
    boxes: int,
    members: int,
    starts: int,
    n_groups: int,
    k: int,
    iou_threshold: float,
    keep: int,
    threads: int,
    /,
) -> None: ...
def set_openmp(gomp_parallel: int, /) -> None: ...

/*
 * Greedy NMS within groups of boxes, each group stopping once it keeps k boxes, on the CPU.
 *
 * The arithmetic is torchvision's CPU nms kernel (torchvision/csrc/ops/cpu/nms_kernel.cpp),
 * operation for operation in fp32: areas (x2 - x1) * (y2 - y1), the intersection from
 * std::max / std::min (written here as the same comparisons, so NaN coordinates behave the
 * same), IoU inter / (area_i + area_j - inter), compared with the threshold in double. Each
 * kept box suppresses every later box of its group whose IoU exceeds the threshold; doing so
 * also for boxes already suppressed (which torchvision skips) changes nothing and lets the
 * loop vectorise. Compiled with -ffp-contract=off: no fused multiply-adds.
 *
 * Greedy NMS decides a box from the higher-scoring kept boxes of its own group only, so the
 * first k boxes it keeps are the same whether it runs over the whole group or stops there.
 * The groups are independent and may be spread over the calling thread's OpenMP team:
 * GOMP_parallel of the libgomp torch runs on, handed over by the caller (set_openmp).
 *
 * The caller (cvserve/models/instance/proposals.py) passes the members of each group in
 * descending score order, without ties (torchvision's order is then the same).
 */
#include "_kernels.h"

/* std::max(a, b) and std::min(a, b), NaN handling included. */
static inline float max_as_std(float a, float b) { return (a < b) ? b : a; }
static inline float min_as_std(float a, float b) { return (b < a) ? b : a; }

/* One group: members[0..n) indices into boxes (x1, y1, x2, y2 rows), best first. Marks at
 * most k kept boxes in keep. scratch: 6 * n floats. */
CVSERVE_CLONES static void nms_group(const float *boxes, const int64_t *members, Py_ssize_t n,
                                     Py_ssize_t k, double threshold, uint8_t *keep,
                                     float *scratch) {
    float *x1 = scratch, *y1 = x1 + n, *x2 = y1 + n, *y2 = x2 + n, *area = y2 + n, *gone = area + n;
    for (Py_ssize_t i = 0; i < n; i++) {
        const float *b = boxes + members[i] * 4;
        x1[i] = b[0], y1[i] = b[1], x2[i] = b[2], y2[i] = b[3];
        area[i] = (x2[i] - x1[i]) * (y2[i] - y1[i]);
        gone[i] = 0.f;
    }
    Py_ssize_t kept = 0;
    for (Py_ssize_t i = 0; i < n && kept < k; i++) {
        if (gone[i] != 0.f) continue;
        keep[members[i]] = 1;
        kept++;
        const float ix1 = x1[i], iy1 = y1[i], ix2 = x2[i], iy2 = y2[i], iarea = area[i];
        for (Py_ssize_t j = i + 1; j < n; j++) {
            const float w = max_as_std(0.f, min_as_std(ix2, x2[j]) - max_as_std(ix1, x1[j]));
            const float h = max_as_std(0.f, min_as_std(iy2, y2[j]) - max_as_std(iy1, y1[j]));
            const float inter = w * h;
            const float ovr = inter / (iarea + area[j] - inter);
            gone[j] = ((double)ovr > threshold) ? 1.f : gone[j];
        }
    }
}

typedef struct {
    const float *boxes;
    const int64_t *members;
    const int64_t *starts; /* n_groups + 1 offsets into members */
    Py_ssize_t n_groups, k;
    double threshold;
    uint8_t *keep;
    Py_ssize_t next; /* the next group no thread has taken (atomic) */
    int failed;      /* a thread ran out of memory (atomic) */
} Job;

static void run_job(void *arg) {
    Job *job = (Job *)arg;
    Py_ssize_t largest = 0;
    for (Py_ssize_t g = 0; g < job->n_groups; g++) {
        const Py_ssize_t size = job->starts[g + 1] - job->starts[g];
        largest = size > largest ? size : largest;
    }
    float *scratch = (float *)malloc(sizeof(float) * 6 * (size_t)(largest > 0 ? largest : 1));
    if (scratch == NULL) {
        __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (;;) {
        const Py_ssize_t g = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (g >= job->n_groups) break;
        nms_group(job->boxes, job->members + job->starts[g], job->starts[g + 1] - job->starts[g],
                  job->k, job->threshold, job->keep, scratch);
    }
    free(scratch);
}

/* groups(boxes_ptr, members_ptr, starts_ptr, n_groups, k, iou_threshold, keep_ptr, threads)
 * boxes: (N, 4) fp32 rows; members: int64 indices into boxes, group after group, each best
 * first; starts: n_groups + 1 int64 offsets of the groups in members; keep: N bytes, set to
 * 1 for every kept box (others untouched). threads > 1 spreads the groups over the calling
 * thread's OpenMP team when set_openmp was given libgomp. The GIL is released meanwhile. */
static PyObject *py_groups(PyObject *self, PyObject *args) {
    unsigned long long boxes, members, starts, keep;
    Py_ssize_t n_groups, k;
    double threshold;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKnndKi", &boxes, &members, &starts, &n_groups, &k, &threshold,
                          &keep, &threads))
        return NULL;
    if (n_groups < 0 || k < 0) {
        PyErr_SetString(PyExc_ValueError, "nms: negative group count or k");
        return NULL;
    }
    Job job = {(const float *)(uintptr_t)boxes, (const int64_t *)(uintptr_t)members,
               (const int64_t *)(uintptr_t)starts, n_groups, k, threshold,
               (uint8_t *)(uintptr_t)keep, 0, 0};
    Py_BEGIN_ALLOW_THREADS;
    run_on_team(run_job, &job, n_groups > 1 ? threads : 1);
    Py_END_ALLOW_THREADS;
    if (job.failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"groups", py_groups, METH_VARARGS, "Greedy NMS within groups, first k kept (see _nms.c)."},
    CVSERVE_SET_OPENMP_METHOD,
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_nms", NULL, -1, methods};

PyMODINIT_FUNC PyInit__nms(void) { return PyModule_Create(&module); }

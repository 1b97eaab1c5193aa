/*
 * RoIAlign's forward over channels-last (NHWC) feature maps, fp32 or bf16, on the CPU.
 *
 * The arithmetic is torchvision's CPU kernel (torchvision/csrc/ops/cpu/roi_align_kernel.cpp
 * and roi_align_common.h), operation for operation in fp32: the same sample positions,
 * bilinear weights, summation order and division by the sample count. Only the loop order
 * differs: torchvision runs over one channel's plane at a time (NCHW), this kernel over
 * the channels of each sample's four neighbouring pixels, which lie next to each other in
 * NHWC and vectorise. Each output element goes through the same floating-point operations
 * in the same order, so the results are equal bit for bit (compiled with
 * -ffp-contract=off: no fused multiply-adds). bf16 values are widened to fp32 exactly
 * before any arithmetic; a bf16 output is the fp32 result rounded as torch rounds it
 * (to nearest even; a NaN becomes 0xFFFF, as in torch's CPU cast).
 *
 * One call pools the boxes of all the levels of a feature pyramid (detectron2's ROIPooler
 * assigns each box one level): box r reads map levels[r] and is written to output row r,
 * in the maps' dtype or fp32. The boxes are independent, so the call may spread them over
 * the calling thread's OpenMP team: GOMP_parallel of the libgomp torch runs on, whose
 * address the caller hands over (set_openmp), so no second thread pool is made. Which
 * thread pools which box changes no value.
 *
 * The caller (cvserve/models/instance/nhwc_roi_align.py) passes contiguous NHWC maps of a
 * checked dtype and shape. pool() itself checks every box first (check_roi: image index,
 * coordinate and sample-count limits; level index) and leaves boxes outside the limits to
 * the caller; a box with a NaN or infinite coordinate pools to zeros.
 */
#include "_kernels.h"

#include <math.h>
#include <string.h>

typedef struct {
    long pos1, pos2, pos3, pos4; /* pixel indices (y * width + x) of the four neighbours */
    float w1, w2, w3, w4;
} PreCalc;

/* torchvision's kernel has no defined result for a box with a NaN or infinite coordinate
 * (its sample count overflows an int); here such a box pools to zeros. */
static inline int finite_box(const float *roi) {
    return isfinite(roi[1]) && isfinite(roi[2]) && isfinite(roi[3]) && isfinite(roi[4]);
}

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* torchvision's pre_calc_for_bilinear_interpolate, unchanged in its arithmetic. */
static void pre_calc(int height, int width, int pooled_h, int pooled_w, float roi_start_h,
                     float roi_start_w, float bin_h, float bin_w, int grid_h, int grid_w,
                     PreCalc *pc) {
    long k = 0;
    for (int ph = 0; ph < pooled_h; ph++) {
        for (int pw = 0; pw < pooled_w; pw++) {
            for (int iy = 0; iy < grid_h; iy++) {
                const float yy = roi_start_h + ph * bin_h + (float)(iy + .5f) * bin_h / (float)grid_h;
                for (int ix = 0; ix < grid_w; ix++, k++) {
                    const float xx =
                        roi_start_w + pw * bin_w + (float)(ix + .5f) * bin_w / (float)grid_w;
                    float x = xx, y = yy;
                    if (!(y >= -1.0 && y <= height && x >= -1.0 && x <= width)) {
                        pc[k].pos1 = pc[k].pos2 = pc[k].pos3 = pc[k].pos4 = 0;
                        pc[k].w1 = pc[k].w2 = pc[k].w3 = pc[k].w4 = 0;
                        continue;
                    }
                    if (y <= 0) y = 0;
                    if (x <= 0) x = 0;
                    int y_low = (int)y, x_low = (int)x, y_high, x_high;
                    if (y_low >= height - 1) {
                        y_high = y_low = height - 1;
                        y = (float)y_low;
                    } else {
                        y_high = y_low + 1;
                    }
                    if (x_low >= width - 1) {
                        x_high = x_low = width - 1;
                        x = (float)x_low;
                    } else {
                        x_high = x_low + 1;
                    }
                    const float ly = y - y_low, lx = x - x_low;
                    const float hy = 1. - ly, hx = 1. - lx;
                    pc[k].w1 = hy * hx;
                    pc[k].w2 = hy * lx;
                    pc[k].w3 = ly * hx;
                    pc[k].w4 = ly * lx;
                    pc[k].pos1 = (long)y_low * width + x_low;
                    pc[k].pos2 = (long)y_low * width + x_high;
                    pc[k].pos3 = (long)y_high * width + x_low;
                    pc[k].pos4 = (long)y_high * width + x_high;
                }
            }
        }
    }
}

static inline uint16_t float_to_bf16(float f) {
    /* As torch's vectorised CPU cast (ATen's cvtfp32_bf16): to nearest even, NaN to 0xFFFF. */
    if (isnan(f)) return 0xFFFF;
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (uint16_t)((bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16);
}

/* Scratch space of one thread: the channel accumulators and one box's sample table. */
typedef struct {
    float *acc;
    PreCalc *pc;
    long capacity;
} Scratch;

/*
 * One kernel per input and output element type, for one box. base: the box's image,
 * (height, width, channels); roi: (image, x0, y0, x1, y1) fp32; out: the box's
 * (channels, pooled_h, pooled_w) output. Returns 0, or -1 when memory ran out.
 */
#define DEFINE_KERNEL(NAME, T, LOAD, OUT_T, STORE)                                               \
    CVSERVE_CLONES static int NAME(const T *base, int height, int width, int channels,           \
                                   const float *roi, int pooled_h, int pooled_w, float scale,    \
                                   int sampling_ratio, int aligned, Scratch *scratch,            \
                                   OUT_T *out) {                                                 \
        const int bins = pooled_h * pooled_w;                                                    \
        float *acc = scratch->acc;                                                               \
        if (!finite_box(roi)) {                                                                  \
            memset(out, 0, sizeof(OUT_T) * (size_t)channels * bins);                             \
            return 0;                                                                            \
        }                                                                                        \
        const float offset = aligned ? 0.5f : 0.0f;                                              \
        const float start_w = roi[1] * scale - offset, start_h = roi[2] * scale - offset;        \
        const float end_w = roi[3] * scale - offset, end_h = roi[4] * scale - offset;            \
        float roi_w = end_w - start_w, roi_h = end_h - start_h;                                  \
        if (!aligned) {                                                                          \
            roi_w = roi_w > 1.f ? roi_w : 1.f;                                                   \
            roi_h = roi_h > 1.f ? roi_h : 1.f;                                                   \
        }                                                                                        \
        const float bin_h = roi_h / (float)pooled_h, bin_w = roi_w / (float)pooled_w;            \
        const int grid_h = sampling_ratio > 0 ? sampling_ratio : (int)ceilf(roi_h / pooled_h);   \
        const int grid_w = sampling_ratio > 0 ? sampling_ratio : (int)ceilf(roi_w / pooled_w);   \
        /* torchvision loops iy < grid_h, ix < grid_w: a negative grid has no samples. */         \
        const int samples = (grid_h > 0 && grid_w > 0) ? grid_h * grid_w : 0;                    \
        const float count = grid_h * grid_w > 1 ? grid_h * grid_w : 1;                           \
        const long need = (long)samples * bins;                                                  \
        if (need > scratch->capacity) {                                                          \
            free(scratch->pc);                                                                   \
            scratch->pc = (PreCalc *)malloc(sizeof(PreCalc) * (size_t)need);                     \
            scratch->capacity = scratch->pc == NULL ? 0 : need;                                  \
            if (scratch->pc == NULL) return -1;                                                  \
        }                                                                                        \
        PreCalc *pc = scratch->pc;                                                               \
        pre_calc(height, width, pooled_h, pooled_w, start_h, start_w, bin_h, bin_w, grid_h,      \
                 grid_w, pc);                                                                    \
        long k = 0;                                                                              \
        for (int bin = 0; bin < bins; bin++) {                                                   \
            for (int c = 0; c < channels; c++) acc[c] = 0.f;                                     \
            for (int s = 0; s < samples; s++, k++) {                                             \
                const T *p1 = base + pc[k].pos1 * channels;                                      \
                const T *p2 = base + pc[k].pos2 * channels;                                      \
                const T *p3 = base + pc[k].pos3 * channels;                                      \
                const T *p4 = base + pc[k].pos4 * channels;                                      \
                const float w1 = pc[k].w1, w2 = pc[k].w2, w3 = pc[k].w3, w4 = pc[k].w4;          \
                for (int c = 0; c < channels; c++)                                               \
                    acc[c] += w1 * LOAD(p1[c]) + w2 * LOAD(p2[c]) + w3 * LOAD(p3[c]) +           \
                              w4 * LOAD(p4[c]);                                                  \
            }                                                                                    \
            for (int c = 0; c < channels; c++) out[(long)c * bins + bin] = STORE(acc[c] / count); \
        }                                                                                        \
        return 0;                                                                                \
    }

#define LOAD_F32(v) (v)
#define LOAD_BF16(v) bf16_to_float(v)
#define STORE_F32(v) (v)
#define STORE_BF16(v) float_to_bf16(v)
DEFINE_KERNEL(f32_to_f32, float, LOAD_F32, float, STORE_F32)
DEFINE_KERNEL(bf16_to_f32, uint16_t, LOAD_BF16, float, STORE_F32)
DEFINE_KERNEL(f32_to_bf16, float, LOAD_F32, uint16_t, STORE_BF16)
DEFINE_KERNEL(bf16_to_bf16, uint16_t, LOAD_BF16, uint16_t, STORE_BF16)

/* Limits of the boxes the kernels take (see check_roi). */
#define MAX_COORD 16777216.0   /* 2**24 feature pixels: far from int overflow in the casts */
#define MAX_SAMPLES 67108864L  /* 2**26 samples per RoI: the size of its scratch table */
#define MAX_MAPS 16

enum { ROIS_OK = 0, ROIS_OUT_OF_LIMITS = 1, ROIS_BAD_IMAGE = 2, ROIS_BAD_LEVEL = 3 };

/* Whether a RoI has an image index in [0, n_images), finite scaled coordinates under
 * MAX_COORD, and at most MAX_SAMPLES samples (an upper bound of the kernels' grid). */
static int check_roi(const float *roi, int n_images, double scale, int pooled_h, int pooled_w,
                     int sampling_ratio) {
    if (!(roi[0] > -1.0f && roi[0] < (float)n_images)) return ROIS_BAD_IMAGE; /* (int) truncates */
    if (!finite_box(roi)) return ROIS_OK; /* pooled as zeros by the kernels */
    double lo[2], hi[2];
    for (int i = 0; i < 2; i++) {
        lo[i] = roi[1 + i] * scale;
        hi[i] = roi[3 + i] * scale;
    }
    for (int i = 0; i < 2; i++)
        if (!(fabs(lo[i]) < MAX_COORD && fabs(hi[i]) < MAX_COORD)) return ROIS_OUT_OF_LIMITS;
    if (sampling_ratio <= 0) {
        const double grid_w = ceil((fabs(hi[0] - lo[0]) + 1.0) / pooled_w) + 1.0;
        const double grid_h = ceil((fabs(hi[1] - lo[1]) + 1.0) / pooled_h) + 1.0;
        if (grid_w * grid_h * pooled_h * pooled_w > (double)MAX_SAMPLES) return ROIS_OUT_OF_LIMITS;
    } else if ((double)sampling_ratio * sampling_ratio * pooled_h * pooled_w > (double)MAX_SAMPLES) {
        return ROIS_OUT_OF_LIMITS;
    }
    return ROIS_OK;
}

typedef struct {
    const void *data; /* (n_images, height, width, channels) */
    int height, width;
    float scale;
} Map;

/* One pool() call, shared by the threads that run it. */
typedef struct {
    Map maps[MAX_MAPS];
    int is_bf16, out_bf16, n_images, channels, pooled_h, pooled_w, sampling_ratio, aligned;
    const float *rois;
    const int64_t *levels; /* NULL: every box on maps[0] */
    Py_ssize_t n_rois;
    void *output;
    Py_ssize_t next; /* the next box no thread has taken (atomic) */
    int failed;      /* a thread ran out of memory (atomic) */
} Job;

#define BOXES_PER_TAKE 4

static int pool_box(const Job *job, Py_ssize_t r, Scratch *scratch) {
    const float *roi = job->rois + r * 5;
    const Map *map = &job->maps[job->levels == NULL ? 0 : job->levels[r]];
    const long offset = (long)(int)roi[0] * map->height * map->width * job->channels;
    const long row = (long)job->channels * job->pooled_h * job->pooled_w;
#define POOL_BOX(KERNEL, IN_T, OUT_T)                                                            \
    KERNEL((const IN_T *)map->data + offset, map->height, map->width, job->channels, roi,        \
           job->pooled_h, job->pooled_w, map->scale, job->sampling_ratio, job->aligned, scratch, \
           (OUT_T *)job->output + r * row)
    switch (job->is_bf16 * 2 + job->out_bf16) {
        case 0: return POOL_BOX(f32_to_f32, float, float);
        case 1: return POOL_BOX(f32_to_bf16, float, uint16_t);
        case 2: return POOL_BOX(bf16_to_f32, uint16_t, float);
        default: return POOL_BOX(bf16_to_bf16, uint16_t, uint16_t);
    }
#undef POOL_BOX
}

/* The body every thread of the team runs: take boxes until none is left. */
static void run_job(void *arg) {
    Job *job = (Job *)arg;
    Scratch scratch = {(float *)malloc(sizeof(float) * (size_t)job->channels), NULL, 0};
    if (scratch.acc == NULL) {
        __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (;;) {
        const Py_ssize_t first = __atomic_fetch_add(&job->next, BOXES_PER_TAKE, __ATOMIC_RELAXED);
        if (first >= job->n_rois || __atomic_load_n(&job->failed, __ATOMIC_RELAXED)) break;
        const Py_ssize_t end = first + BOXES_PER_TAKE < job->n_rois ? first + BOXES_PER_TAKE : job->n_rois;
        for (Py_ssize_t r = first; r < end; r++) {
            if (pool_box(job, r, &scratch) < 0) {
                __atomic_store_n(&job->failed, 1, __ATOMIC_RELAXED);
                break;
            }
        }
    }
    free(scratch.pc);
    free(scratch.acc);
}

/* Below this many boxes one thread pools them: waking the team would cost more. */
#define MIN_BOXES_TO_SHARE 8

/* pool(maps, is_bf16, n_images, channels, rois_ptr, n_rois, levels_ptr, pooled_h, pooled_w,
 *      sampling_ratio, aligned, output_ptr, out_bf16, threads) -> status
 * maps: a sequence of (data_ptr, height, width, spatial_scale), one per level; levels_ptr:
 * 0 when every box is on the first map, else the int64 level of each box. Output rows are
 * the boxes', in the maps' dtype when out_bf16 says so, else fp32. threads > 1 spreads
 * the boxes over the calling thread's OpenMP team when set_openmp was given libgomp.
 * Status 0: output written; 1: a box outside the limits above, 2: an image index outside
 * [0, n_images), 3: a level outside the maps (nothing written for 1-3). The GIL is released
 * while it runs. */
static PyObject *py_pool(PyObject *self, PyObject *args) {
    PyObject *maps;
    unsigned long long rois, levels, output;
    int is_bf16, n_images, channels, pooled_h, pooled_w, sampling_ratio, aligned, out_bf16, threads;
    Py_ssize_t n_rois;
    if (!PyArg_ParseTuple(args, "OpiiKnKiiipKpi", &maps, &is_bf16, &n_images, &channels, &rois,
                          &n_rois, &levels, &pooled_h, &pooled_w, &sampling_ratio, &aligned,
                          &output, &out_bf16, &threads))
        return NULL;
    Job job;
    memset(&job, 0, sizeof job);
    PyObject *seq = PySequence_Fast(maps, "roi_align: maps must be a sequence");
    if (seq == NULL) return NULL;
    const Py_ssize_t n_maps = PySequence_Fast_GET_SIZE(seq);
    if (n_maps < 1 || n_maps > MAX_MAPS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "roi_align: 1 to %d maps, got %zd", MAX_MAPS, n_maps);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n_maps; i++) {
        unsigned long long data;
        double scale;
        Map *m = &job.maps[i];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "Kiid", &data, &m->height, &m->width,
                              &scale)) {
            Py_DECREF(seq);
            return NULL;
        }
        m->data = (const void *)(uintptr_t)data;
        m->scale = (float)scale;
        if (m->height <= 0 || m->width <= 0) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "roi_align: empty map");
            return NULL;
        }
    }
    Py_DECREF(seq);
    if (channels <= 0 || pooled_h <= 0 || pooled_w <= 0 || n_rois < 0 || n_images < 0) {
        PyErr_SetString(PyExc_ValueError, "roi_align: no channels, empty output size or negative counts");
        return NULL;
    }
    job.is_bf16 = is_bf16, job.out_bf16 = out_bf16, job.n_images = n_images, job.channels = channels;
    job.pooled_h = pooled_h, job.pooled_w = pooled_w, job.sampling_ratio = sampling_ratio;
    job.aligned = aligned, job.rois = (const float *)(uintptr_t)rois, job.n_rois = n_rois;
    job.levels = (const int64_t *)(uintptr_t)levels, job.output = (void *)(uintptr_t)output;
    int status = ROIS_OK;
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t r = 0; r < n_rois && status == ROIS_OK; r++) {
        const int64_t level = job.levels == NULL ? 0 : job.levels[r];
        if (level < 0 || level >= n_maps)
            status = ROIS_BAD_LEVEL;
        else
            status = check_roi(job.rois + r * 5, n_images, (double)job.maps[level].scale, pooled_h,
                               pooled_w, sampling_ratio);
    }
    if (status == ROIS_OK) {
        run_on_team(run_job, &job, n_rois >= MIN_BOXES_TO_SHARE ? threads : 1);
    }
    Py_END_ALLOW_THREADS;
    if (job.failed) return PyErr_NoMemory();
    return PyLong_FromLong(status);
}

/* isa() -> the instruction set the kernels dispatch to on this CPU. */
static PyObject *py_isa(PyObject *self, PyObject *noargs) {
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return PyUnicode_FromString("avx512f");
    if (__builtin_cpu_supports("avx2")) return PyUnicode_FromString("avx2");
#endif
    return PyUnicode_FromString("default");
}

static PyMethodDef methods[] = {
    {"pool", py_pool, METH_VARARGS, "RoIAlign forward over NHWC maps (see _roi_align.c)."},
    CVSERVE_SET_OPENMP_METHOD,
    {"isa", py_isa, METH_NOARGS, "The instruction set the kernels run with on this CPU."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_roi_align", NULL, -1, methods};

PyMODINIT_FUNC PyInit__roi_align(void) { return PyModule_Create(&module); }

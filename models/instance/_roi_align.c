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
 * before any arithmetic.
 *
 * The caller (cvserve/models/instance/nhwc_roi_align.py) passes contiguous NHWC maps of a
 * checked dtype and shape. forward() itself checks every box first (check_rois: image index,
 * coordinate and sample-count limits) and leaves boxes outside the limits to the caller;
 * a box with a NaN or infinite coordinate pools to zeros.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define CVSERVE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CVSERVE_CLONES
#endif

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

/*
 * One kernel per element type. input: (n_images, height, width, channels); rois: (n_rois, 5)
 * fp32 as (image, x0, y0, x1, y1); output: (n_rois, channels, pooled_h, pooled_w) fp32.
 * Returns 0, or -1 when memory ran out.
 */
#define DEFINE_KERNEL(NAME, T, LOAD)                                                             \
    CVSERVE_CLONES static int NAME(const T *input, int height, int width, int channels,          \
                                   const float *rois, Py_ssize_t n_rois, int pooled_h,           \
                                   int pooled_w, float scale, int sampling_ratio, int aligned,   \
                                   float *output) {                                              \
        const int bins = pooled_h * pooled_w;                                                    \
        float *acc = (float *)malloc(sizeof(float) * (size_t)channels);                          \
        PreCalc *pc = NULL;                                                                      \
        long capacity = 0;                                                                       \
        if (acc == NULL) return -1;                                                              \
        for (Py_ssize_t n = 0; n < n_rois; n++) {                                                \
            const float *roi = rois + n * 5;                                                     \
            float *out = output + (long)n * channels * bins;                                     \
            if (!finite_box(roi)) {                                                              \
                memset(out, 0, sizeof(float) * (size_t)channels * bins);                         \
                continue;                                                                        \
            }                                                                                    \
            const int image = (int)roi[0];                                                       \
            const float offset = aligned ? 0.5f : 0.0f;                                          \
            const float start_w = roi[1] * scale - offset, start_h = roi[2] * scale - offset;    \
            const float end_w = roi[3] * scale - offset, end_h = roi[4] * scale - offset;        \
            float roi_w = end_w - start_w, roi_h = end_h - start_h;                              \
            if (!aligned) {                                                                      \
                roi_w = roi_w > 1.f ? roi_w : 1.f;                                               \
                roi_h = roi_h > 1.f ? roi_h : 1.f;                                               \
            }                                                                                    \
            const float bin_h = roi_h / (float)pooled_h, bin_w = roi_w / (float)pooled_w;        \
            const int grid_h = sampling_ratio > 0 ? sampling_ratio : (int)ceilf(roi_h / pooled_h); \
            const int grid_w = sampling_ratio > 0 ? sampling_ratio : (int)ceilf(roi_w / pooled_w); \
            /* torchvision loops iy < grid_h, ix < grid_w: a negative grid has no samples. */     \
            const int samples = (grid_h > 0 && grid_w > 0) ? grid_h * grid_w : 0;                \
            const float count = grid_h * grid_w > 1 ? grid_h * grid_w : 1;                       \
            const long need = (long)samples * bins;                                              \
            if (need > capacity) {                                                               \
                free(pc);                                                                        \
                pc = (PreCalc *)malloc(sizeof(PreCalc) * (size_t)need);                          \
                capacity = need;                                                                 \
                if (pc == NULL) {                                                                \
                    free(acc);                                                                   \
                    return -1;                                                                   \
                }                                                                                \
            }                                                                                    \
            pre_calc(height, width, pooled_h, pooled_w, start_h, start_w, bin_h, bin_w, grid_h,  \
                     grid_w, pc);                                                                \
            const T *base = input + (long)image * height * width * channels;                     \
            long k = 0;                                                                          \
            for (int bin = 0; bin < bins; bin++) {                                               \
                for (int c = 0; c < channels; c++) acc[c] = 0.f;                                 \
                for (int s = 0; s < samples; s++, k++) {                                         \
                    const T *p1 = base + pc[k].pos1 * channels;                                  \
                    const T *p2 = base + pc[k].pos2 * channels;                                  \
                    const T *p3 = base + pc[k].pos3 * channels;                                  \
                    const T *p4 = base + pc[k].pos4 * channels;                                  \
                    const float w1 = pc[k].w1, w2 = pc[k].w2, w3 = pc[k].w3, w4 = pc[k].w4;      \
                    for (int c = 0; c < channels; c++)                                           \
                        acc[c] += w1 * LOAD(p1[c]) + w2 * LOAD(p2[c]) + w3 * LOAD(p3[c]) +       \
                                  w4 * LOAD(p4[c]);                                              \
                }                                                                                \
                for (int c = 0; c < channels; c++) out[(long)c * bins + bin] = acc[c] / count;   \
            }                                                                                    \
        }                                                                                        \
        free(pc);                                                                                \
        free(acc);                                                                               \
        return 0;                                                                                \
    }

#define LOAD_F32(v) (v)
#define LOAD_BF16(v) bf16_to_float(v)
DEFINE_KERNEL(forward_f32, float, LOAD_F32)
DEFINE_KERNEL(forward_bf16, uint16_t, LOAD_BF16)

/* Limits of the boxes the kernels take (see check_rois). */
#define MAX_COORD 16777216.0   /* 2**24 feature pixels: far from int overflow in the casts */
#define MAX_SAMPLES 67108864L  /* 2**26 samples per RoI: the size of its scratch table */

enum { ROIS_OK = 0, ROIS_OUT_OF_LIMITS = 1, ROIS_BAD_IMAGE = 2 };

/* Whether every RoI has an image index in [0, n_images), finite scaled coordinates under
 * MAX_COORD, and at most MAX_SAMPLES samples (an upper bound of the kernels' grid). */
static int check_rois(const float *rois, Py_ssize_t n_rois, int n_images, double scale,
                      int pooled_h, int pooled_w, int sampling_ratio) {
    for (Py_ssize_t n = 0; n < n_rois; n++) {
        const float *roi = rois + n * 5;
        if (!(roi[0] > -1.0f && roi[0] < (float)n_images)) return ROIS_BAD_IMAGE; /* (int) truncates */
        double lo[2], hi[2];
        for (int i = 0; i < 2; i++) {
            lo[i] = roi[1 + i] * scale;
            hi[i] = roi[3 + i] * scale;
        }
        if (!finite_box(roi)) continue; /* pooled as zeros by the kernels */
        for (int i = 0; i < 2; i++)
            if (!(fabs(lo[i]) < MAX_COORD && fabs(hi[i]) < MAX_COORD)) return ROIS_OUT_OF_LIMITS;
        if (sampling_ratio <= 0) {
            const double grid_w = ceil((fabs(hi[0] - lo[0]) + 1.0) / pooled_w) + 1.0;
            const double grid_h = ceil((fabs(hi[1] - lo[1]) + 1.0) / pooled_h) + 1.0;
            if (grid_w * grid_h * pooled_h * pooled_w > (double)MAX_SAMPLES) return ROIS_OUT_OF_LIMITS;
        } else if ((double)sampling_ratio * sampling_ratio * pooled_h * pooled_w > (double)MAX_SAMPLES) {
            return ROIS_OUT_OF_LIMITS;
        }
    }
    return ROIS_OK;
}

/* forward(input_ptr, is_bf16, n_images, height, width, channels, rois_ptr, n_rois, pooled_h,
 *         pooled_w, spatial_scale, sampling_ratio, aligned, output_ptr) -> status
 * 0: output written; 1: a box outside the limits above, 2: an image index outside
 * [0, n_images) (nothing written for either). The GIL is released while it runs. */
static PyObject *py_forward(PyObject *self, PyObject *args) {
    unsigned long long input, rois, output;
    int is_bf16, n_images, height, width, channels, pooled_h, pooled_w, sampling_ratio, aligned;
    Py_ssize_t n_rois;
    double scale;
    if (!PyArg_ParseTuple(args, "KpiiiiKniidipK", &input, &is_bf16, &n_images, &height, &width,
                          &channels, &rois, &n_rois, &pooled_h, &pooled_w, &scale,
                          &sampling_ratio, &aligned, &output))
        return NULL;
    if (height <= 0 || width <= 0 || channels <= 0 || pooled_h <= 0 || pooled_w <= 0 || n_rois < 0) {
        PyErr_SetString(PyExc_ValueError, "roi_align: empty map or output size");
        return NULL;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS;
    status = check_rois((const float *)(uintptr_t)rois, n_rois, n_images, (double)(float)scale,
                        pooled_h, pooled_w, sampling_ratio);
    if (status != ROIS_OK)
        ;
    else if (is_bf16)
        status = forward_bf16((const uint16_t *)(uintptr_t)input, height, width, channels,
                              (const float *)(uintptr_t)rois, n_rois, pooled_h, pooled_w,
                              (float)scale, sampling_ratio, aligned, (float *)(uintptr_t)output);
    else
        status = forward_f32((const float *)(uintptr_t)input, height, width, channels,
                             (const float *)(uintptr_t)rois, n_rois, pooled_h, pooled_w,
                             (float)scale, sampling_ratio, aligned, (float *)(uintptr_t)output);
    Py_END_ALLOW_THREADS;
    if (status < 0) return PyErr_NoMemory();
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
    {"forward", py_forward, METH_VARARGS, "RoIAlign forward over an NHWC map (see roi_align.c)."},
    {"isa", py_isa, METH_NOARGS, "The instruction set the kernels run with on this CPU."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_roi_align", NULL, -1, methods};

PyMODINIT_FUNC PyInit__roi_align(void) { return PyModule_Create(&module); }

/*
 * What cvserve's CPU kernels (_roi_align.c, _nms.c) share: instruction-set clones, and running
 * on the calling thread's OpenMP team through the GOMP_parallel of the libgomp torch runs on,
 * whose address Python hands over (set_openmp; cvserve/models/threads.py,
 * gomp_parallel_address), so no kernel makes a thread pool of its own.
 */
#ifndef CVSERVE_KERNELS_H
#define CVSERVE_KERNELS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>

/* Each marked function is compiled for AVX-512, AVX2 and a baseline, picked at load time. */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define CVSERVE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CVSERVE_CLONES
#endif

/* libgomp's entry point for `#pragma omp parallel num_threads(n)` (GCC's ABI since 4.9). */
typedef void (*GompParallel)(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);
static GompParallel gomp_parallel = NULL;

/* Run fn(data) on `threads` threads of the calling thread's team, or on the calling thread
 * alone when threads < 2 or no GOMP_parallel was handed over. */
static void run_on_team(void (*fn)(void *), void *data, int threads) {
    if (threads > 1 && gomp_parallel != NULL)
        gomp_parallel(fn, data, (unsigned)threads, 0);
    else
        fn(data);
}

/* set_openmp(gomp_parallel_address) -> None: libgomp's GOMP_parallel, or 0 for one thread. */
static PyObject *py_set_openmp(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long address;
    if (!PyArg_ParseTuple(args, "K", &address)) return NULL;
    gomp_parallel = (GompParallel)(uintptr_t)address;
    Py_RETURN_NONE;
}

#define CVSERVE_SET_OPENMP_METHOD \
    {"set_openmp", py_set_openmp, METH_VARARGS, "Hand over libgomp's GOMP_parallel (or 0)."}

#endif

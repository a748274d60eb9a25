/* Fused server kernels for distgrad: one pass over the center instead of several.
 *
 * Each function reads the buffers once and writes the center once, so a commit
 * costs about as much memory traffic as a copy. The element-wise arithmetic is
 * the same sequence of IEEE float operations as the torch reference path in
 * distgrad/fast.py (compiled with -ffp-contract=off: no fused multiply-adds), so
 * the center comes out bit-identical; only the reductions (a sum of squares for
 * the distance, the sum of ADAG's factors) are summed in a fixed order of their
 * own: float partial sums per chunk, added into doubles.
 *
 * Arguments are raw addresses of contiguous float32 buffers (tensor.data_ptr()),
 * passed as Python integers; the Python side checks dtype, device, contiguity and
 * sizes before calling.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

/* Work in chunks that stay in L1: an element-wise loop with no reductions (which the
 * compiler vectorizes without reordering any float operation), then a reduction of the
 * chunk's temporaries over LANES independent float partial sums, added into doubles.
 * The computational loops are plain functions of restrict pointers, so that the
 * vectorizer sees them without the Python API around them. */
#define CHUNK 1024
#define LANES 16

static double reduce(const float *restrict t, ptrdiff_t m) {
    float part[LANES] = {0};
    ptrdiff_t j = 0;
    for (; j + LANES <= m; j += LANES)
        for (int l = 0; l < LANES; l++) part[l] += t[j + l];
    double acc = 0.0;
    for (int l = 0; l < LANES; l++) acc += (double)part[l];
    for (; j < m; j++) acc += (double)t[j];
    return acc;
}

static void sq_diff(const float *restrict a, const float *restrict b, float *restrict t,
                    ptrdiff_t m) {
    for (ptrdiff_t j = 0; j < m; j++) {
        float d = a[j] - b[j];
        t[j] = d * d;
    }
}

static void add1(float *restrict c, const float *restrict p, ptrdiff_t m) {
    for (ptrdiff_t j = 0; j < m; j++) c[j] = c[j] + p[j];
}

static void add_alpha(float *restrict c, const float *restrict p, float alpha, ptrdiff_t m) {
    for (ptrdiff_t j = 0; j < m; j++) c[j] = c[j] + alpha * p[j];
}

static void adag_thesis(float *restrict c, float *restrict p, const float *restrict s,
                        float *restrict t2, float *restrict tf, ptrdiff_t m, float k) {
    for (ptrdiff_t j = 0; j < m; j++) {
        float d = c[j] - s[j];
        float d2 = d * d;
        float f = 1.0f / (d2 * k + 1.0f);
        float q = p[j] * f;
        t2[j] = d2;
        tf[j] = f;
        p[j] = q;
        c[j] = c[j] + q;
    }
}

static void adag_rewrite2(float *restrict c, float *restrict p, const float *restrict s,
                          float *restrict t2, float *restrict tf, ptrdiff_t m, float k) {
    for (ptrdiff_t j = 0; j < m; j++) {
        float d = c[j] - s[j];
        float e = d * k;
        float f = 1.0f / (e * e + 1.0f);
        float q = p[j] * f;
        t2[j] = d * d;
        tf[j] = f;
        p[j] = q;
        c[j] = c[j] + q;
    }
}

static double add_scaled_impl(float *c, const float *p, const float *s, ptrdiff_t n,
                              float alpha) {
    float t[CHUNK];
    double acc = 0.0;
    for (ptrdiff_t i = 0; i < n; i += CHUNK) {
        ptrdiff_t m = n - i < CHUNK ? n - i : CHUNK;
        if (s) {
            sq_diff(c + i, s + i, t, m);
            acc += reduce(t, m);
        }
        if (alpha == 1.0f)
            add1(c + i, p + i, m);
        else
            add_alpha(c + i, p + i, alpha, m);
    }
    return acc;
}

static void adag_impl(float *c, float *p, const float *s, ptrdiff_t n, float k, int form,
                      double *sq, double *fs) {
    float t2[CHUNK], tf[CHUNK];
    for (ptrdiff_t i = 0; i < n; i += CHUNK) {
        ptrdiff_t m = n - i < CHUNK ? n - i : CHUNK;
        if (form == 0)
            adag_thesis(c + i, p + i, s + i, t2, tf, m, k);
        else
            adag_rewrite2(c + i, p + i, s + i, t2, tf, m, k);
        *sq += reduce(t2, m);
        *fs += reduce(tf, m);
    }
}

static double sqdist_impl(const float *a, const float *b, ptrdiff_t n) {
    float t[CHUNK];
    double acc = 0.0;
    for (ptrdiff_t i = 0; i < n; i += CHUNK) {
        ptrdiff_t m = n - i < CHUNK ? n - i : CHUNK;
        sq_diff(a + i, b + i, t, m);
        acc += reduce(t, m);
    }
    return acc;
}

/* add_scaled(center, payload, stale or 0, n, alpha): center += alpha * payload
 * (center + payload when alpha == 1); returns sum((center_before - stale)^2). */
static PyObject *add_scaled(PyObject *self, PyObject *args) {
    unsigned long long pc, pp, ps;
    Py_ssize_t n;
    float alpha;
    if (!PyArg_ParseTuple(args, "KKKnf", &pc, &pp, &ps, &n, &alpha)) return NULL;
    double acc;
    Py_BEGIN_ALLOW_THREADS
    acc = add_scaled_impl((float *)(uintptr_t)pc, (const float *)(uintptr_t)pp,
                          (const float *)(uintptr_t)ps, n, alpha);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(acc);
}

/* adag(center, payload, stale, n, k, form): d = center - stale; f = 1 / (d^2 k + 1)
 * (form 0, k = 1/gamma) or 1 / ((d k)^2 + 1) (form 1, "rewrite2"); payload *= f;
 * center += payload. Returns (sum(d^2), sum(f)). */
static PyObject *adag(PyObject *self, PyObject *args) {
    unsigned long long pc, pp, ps;
    Py_ssize_t n;
    float k;
    int form;
    if (!PyArg_ParseTuple(args, "KKKnfi", &pc, &pp, &ps, &n, &k, &form)) return NULL;
    double sq = 0.0, fs = 0.0;
    Py_BEGIN_ALLOW_THREADS
    adag_impl((float *)(uintptr_t)pc, (float *)(uintptr_t)pp, (const float *)(uintptr_t)ps, n,
              k, form, &sq, &fs);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(dd)", sq, fs);
}

/* sqdist(a, b, n): sum((a - b)^2) */
static PyObject *sqdist(PyObject *self, PyObject *args) {
    unsigned long long pa, pb;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "KKn", &pa, &pb, &n)) return NULL;
    double acc;
    Py_BEGIN_ALLOW_THREADS
    acc = sqdist_impl((const float *)(uintptr_t)pa, (const float *)(uintptr_t)pb, n);
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(acc);
}

static PyMethodDef methods[] = {
    {"add_scaled", add_scaled, METH_VARARGS, "center += alpha*payload, returns sum((c-s)^2)"},
    {"adag", adag, METH_VARARGS, "ADAG commit in one pass, returns (sum d^2, sum f)"},
    {"sqdist", sqdist, METH_VARARGS, "sum((a-b)^2)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "distgrad._ext.kernels",
                                    "fused server kernels", -1, methods};

PyMODINIT_FUNC PyInit_kernels(void) { return PyModule_Create(&module); }

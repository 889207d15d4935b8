/* Fused element-wise passes around the int8 matmuls of vpr_ros (precision "int8").
 *
 * Built on first use by vpr_ros/models/int8_kernels.py with the machine's C compiler
 * (-O3 -march=native, OpenMP) and called through ctypes on contiguous tensors.  Each
 * function replaces several torch element-wise ops, and so several passes over memory,
 * by one pass per row.  Every row is computed on its own, the same way whatever the number
 * of rows, so results stay batch-invariant.  The compile flags keep IEEE semantics
 * (-ffp-contract=off, no -ffast-math): quantize_rows and dequantize give bit-identical
 * results to the torch fallback in int8_linear.py, which the tests check.
 *
 * Layouts: row-major, rows of length k (input) or n (output); row_scale (m), col_scale (n),
 * bias (n) or NULL.  num_threads: torch's intra-op thread count, passed explicitly because
 * the OpenMP thread-count setting is per calling thread.
 */

#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
#endif
#include <stdint.h>
#include <string.h>

#define INT8_MAX_F 127.0f
#define TINY_SCALE 1e-30f

/* max |x| of a row, as the bit patterns of non-negative floats compare like unsigned
 * integers (exact; an integer max vectorises without -ffast-math). */
static inline float row_absmax(const float *x, int64_t k) {
    const uint32_t *u = (const uint32_t *)x;
    uint32_t m = 0;
    for (int64_t j = 0; j < k; ++j) {
        uint32_t a = u[j] & 0x7fffffffu;
        m = a > m ? a : m;
    }
    float f;
    memcpy(&f, &m, sizeof f);
    return f;
}

/* Symmetric int8 of one row: q = round_half_even(x * (1 / absmax) * 127); returns the
 * row's scale absmax / 127.  Same operations, in the same order, as the torch path. */
static inline float quantize_row(const float *x, int64_t k, int8_t *q) {
    float amax = row_absmax(x, k);
    if (amax < TINY_SCALE) amax = TINY_SCALE;
    const float mult = (1.0f / amax) * INT8_MAX_F;
    for (int64_t j = 0; j < k; ++j) q[j] = (int8_t)(int32_t)rintf(x[j] * mult);
    return amax / INT8_MAX_F;
}

void vpr_quantize_rows(const float *x, int64_t m, int64_t k, int8_t *q, float *scale,
                       int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < m; ++i) scale[i] = quantize_row(x + i * k, k, q + i * k);
}

/* acc (int32) -> float in the same memory: ((float)acc * row_scale) * col_scale + bias,
 * one rounding per operation as the torch path does it. */
static inline void dequantize_row(int32_t *acc, int64_t n, float rs, const float *cs,
                                  const float *bias) {
    float *out = (float *)acc;   /* same element size; each element read before written */
    if (bias) {
        for (int64_t j = 0; j < n; ++j) {
            float v = (float)acc[j] * rs;
            v = v * cs[j];
            out[j] = v + bias[j];
        }
    } else {
        for (int64_t j = 0; j < n; ++j) {
            float v = (float)acc[j] * rs;
            out[j] = v * cs[j];
        }
    }
}

void vpr_dequantize(int32_t *acc, int64_t m, int64_t n, const float *row_scale,
                    const float *col_scale, const float *bias, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < m; ++i) dequantize_row(acc + i * n, n, row_scale[i], col_scale, bias);
}

/* residual + dequantised, written as float into the int32 buffer itself (no new
 * allocation; `residual` is only read, since the caller may still hold it). */
void vpr_dequantize_add(int32_t *acc, int64_t m, int64_t n, const float *row_scale,
                        const float *col_scale, const float *bias, const float *residual,
                        int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < m; ++i) {
        int32_t *a = acc + i * n;
        const float *r = residual + i * n;
        dequantize_row(a, n, row_scale[i], col_scale, bias);
        float *d = (float *)a;
        for (int64_t j = 0; j < n; ++j) d[j] = r[j] + d[j];
    }
}

/* erf(x) = x P(u) / Q(u) with u = x^2 / 16 on |x| < 4: a rational least-squares fit
 * (degrees 6 and 4) made for this file, within 4.3e-7 of erf in float32 evaluation; for
 * |x| >= 4, erf(x) rounds to +-1 in float32.  No exp and one division, so it costs a
 * third of an exp-based formula; plain arithmetic, so it vectorises and gives an element
 * the same value in the vector body and in the scalar tail. */
static inline float erf_approx(float x) {
    float a = fabsf(x);
    a = a > 4.0f ? 4.0f : a;
    const float u = a * a * 0.0625f;
    float p = 0.3238071108944737f;
    p = p * u - 2.074733257144354f;
    p = p * u + 9.983159340006697f;
    p = p * u + 17.0427783802853f;
    p = p * u + 13.316556712420814f;
    p = p * u + 3.373705619127639f;
    p = p * u + 1.1283787576429363f;
    float q = 69.85265041972103f;
    q = q * u + 62.602576459518744f;
    q = q * u + 30.596249891560916f;
    q = q * u + 8.323124286937238f;
    q = q * u + 1.0f;
    float y = a * p / q;
    y = a >= 4.0f ? 1.0f : y;
    return copysignf(y, x);
}

/* The fc1 -> GELU -> (quantise for fc2) step of a transformer MLP in one pass per row:
 * dequantise the int32 row, add the bias, apply exact-form GELU 0.5 x (1 + erf(x/sqrt2)),
 * and quantise the result to int8 with its own row scale.  The float row lives only in
 * the (cache-hot) int32 buffer it came from. */
void vpr_dequantize_gelu_quantize(int32_t *acc, int64_t m, int64_t n, const float *row_scale,
                                  const float *col_scale, const float *bias, int8_t *q,
                                  float *q_scale, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < m; ++i) {
        int32_t *a = acc + i * n;
        dequantize_row(a, n, row_scale[i], col_scale, bias);
        float *h = (float *)a;
        for (int64_t j = 0; j < n; ++j) {
            const float x = h[j];
            h[j] = 0.5f * x * (1.0f + erf_approx(x * 0.70710678118654752f));
        }
        q_scale[i] = quantize_row(h, n, q + i * n);
    }
}

/* Sum of a row in a fixed order (16 interleaved partial sums, then a fixed tree): the
 * same result for a row wherever it sits in memory, and it vectorises without
 * -ffast-math. */
static inline float row_sum(const float *x, int64_t k) {
    float part[16] = {0};
    int64_t j = 0;
    for (; j + 16 <= k; j += 16)
        for (int l = 0; l < 16; ++l) part[l] += x[j + l];
    for (int l = 0; j < k; ++j, ++l) part[l] += x[j];
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) part[l] += part[l + w];
    return part[0];
}

static inline float row_centered_sq_sum(const float *x, int64_t k, float mean) {
    float part[16] = {0};
    int64_t j = 0;
    for (; j + 16 <= k; j += 16)
        for (int l = 0; l < 16; ++l) {
            const float d = x[j + l] - mean;
            part[l] += d * d;
        }
    for (int l = 0; j < k; ++j, ++l) {
        const float d = x[j] - mean;
        part[l] += d * d;
    }
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) part[l] += part[l + w];
    return part[0];
}

/* LayerNorm of each row (biased variance, as torch), then int8 quantisation of the
 * result; the normalised float row only lives in per-thread scratch (tmp: num_threads * k
 * floats). */
void vpr_layer_norm_quantize(const float *x, int64_t m, int64_t k, const float *weight,
                             const float *bias, float eps, int8_t *q, float *q_scale,
                             float *tmp, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < m; ++i) {
        float *h = tmp + (int64_t)omp_get_thread_num() * k;
        const float *r = x + i * k;
        const float mean = row_sum(r, k) / (float)k;
        const float var = row_centered_sq_sum(r, k, mean) / (float)k;
        const float rstd = 1.0f / sqrtf(var + eps);
        for (int64_t j = 0; j < k; ++j) h[j] = (r[j] - mean) * rstd * weight[j] + bias[j];
        q_scale[i] = quantize_row(h, k, q + i * k);
    }
}

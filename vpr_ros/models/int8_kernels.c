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

/* exp(v) for v <= 0 (GELU's erf only needs that range): Cody-Waite reduction
 * v = n ln2 + r, |r| <= ln2/2, degree-6 Taylor polynomial (relative error < 2e-7), and
 * 2^n through the exponent bits.  Plain arithmetic, so it vectorises and gives the same
 * value for an element whether it lands in the vector body or the scalar tail. */
static inline float exp_nonpositive(float v) {
    v = v < -87.0f ? -87.0f : v;
    const float n = rintf(v * 1.44269504088896341f);
    const float r = (v - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* erf by Abramowitz & Stegun 7.1.26: 1.5e-7 in exact arithmetic, 6.4e-7 measured in
 * float32 over [-6, 6]; GELU built on it is within 5e-7 of the exact GELU there. */
static inline float erf_approx(float x) {
    const float a = fabsf(x);
    const float t = 1.0f / (1.0f + 0.3275911f * a);
    float p = 1.061405429f;
    p = p * t - 1.453152027f;
    p = p * t + 1.421413741f;
    p = p * t - 0.284496736f;
    p = p * t + 0.254829592f;
    p = p * t;
    const float y = 1.0f - p * exp_nonpositive(-a * a);
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

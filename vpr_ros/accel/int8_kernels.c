/* Fused element-wise passes around the int8 matmuls of vpr_ros (precision "int8"), and
 * an int8 multi-head attention (at the end of this file).
 *
 * Built on first use by vpr_ros/accel/int8_kernels.py with the machine's C compiler
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
static inline int omp_get_num_threads(void) { return 1; }
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
 * row's scale absmax / 127 (quantize_row_amax: with the row's absmax already known).
 * Same operations, in the same order, as the torch path. */
static inline float quantize_row_amax(const float *x, int64_t k, float amax, int8_t *q) {
    if (amax < TINY_SCALE) amax = TINY_SCALE;
    const float mult = (1.0f / amax) * INT8_MAX_F;
    for (int64_t j = 0; j < k; ++j) q[j] = (int8_t)(int32_t)rintf(x[j] * mult);
    return amax / INT8_MAX_F;
}

static inline float quantize_row(const float *x, int64_t k, int8_t *q) {
    return quantize_row_amax(x, k, row_absmax(x, k), q);
}

void vpr_quantize_rows(const float *x, int64_t m, int64_t k, int8_t *q, float *scale,
                       int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < m; ++i) scale[i] = quantize_row(x + i * k, k, q + i * k);
}

/* acc (int32) -> float in the same memory: ((float)acc * row_scale) * col_scale + bias,
 * one rounding per operation as the torch path does it. */
static inline void dequantize_to(const int32_t *acc, float *out, int64_t n, float rs,
                                 const float *cs, const float *bias) {
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

static inline void dequantize_row(int32_t *acc, int64_t n, float rs, const float *cs,
                                  const float *bias) {
    /* same element size; each element read before written */
    dequantize_to(acc, (float *)acc, n, rs, cs, bias);
}

void vpr_dequantize(int32_t *acc, int64_t m, int64_t n, const float *row_scale,
                    const float *col_scale, const float *bias, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < m; ++i) dequantize_row(acc + i * n, n, row_scale[i], col_scale, bias);
}

/* residual + dequantised, written as float into the int32 buffer itself (no new
 * allocation; `residual` is only read, since the caller may still hold it). */
static inline void dequantize_add_row(int32_t *a, int64_t n, float rs, const float *cs,
                                      const float *bias, const float *r) {
    dequantize_row(a, n, rs, cs, bias);
    float *d = (float *)a;
    for (int64_t j = 0; j < n; ++j) d[j] = r[j] + d[j];
}

void vpr_dequantize_add(int32_t *acc, int64_t m, int64_t n, const float *row_scale,
                        const float *col_scale, const float *bias, const float *residual,
                        int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < m; ++i)
        dequantize_add_row(acc + i * n, n, row_scale[i], col_scale, bias, residual + i * n);
}

/* erf(x) = x P(u) / Q(u) with u = x^2 / 16 on |x| < 4: a rational least-squares fit
 * (degrees 6 and 4) made for this file, within 4.3e-7 of erf in float32 evaluation; for
 * |x| >= 4, erf(x) rounds to +-1 in float32.  No exp and one division, so it costs a
 * third of an exp-based formula; plain arithmetic, so it vectorises and gives an element
 * the same value in the vector body and in the scalar tail.  Horner steps are explicit
 * fused multiply-adds (fmaf: one rounding, whatever -ffp-contract says, in the vector
 * body and the scalar tail alike): 9 instructions fewer per 16 elements than separate
 * multiplies and adds. */
static inline float erf_approx(float x) {
    float a = fabsf(x);
    a = a > 4.0f ? 4.0f : a;
    const float u = a * a * 0.0625f;
    float p = 0.3238071108944737f;
    p = fmaf(p, u, -2.074733257144354f);
    p = fmaf(p, u, 9.983159340006697f);
    p = fmaf(p, u, 17.0427783802853f);
    p = fmaf(p, u, 13.316556712420814f);
    p = fmaf(p, u, 3.373705619127639f);
    p = fmaf(p, u, 1.1283787576429363f);
    float q = 69.85265041972103f;
    q = fmaf(q, u, 62.602576459518744f);
    q = fmaf(q, u, 30.596249891560916f);
    q = fmaf(q, u, 8.323124286937238f);
    q = fmaf(q, u, 1.0f);
    float y = a * p / q;
    y = a >= 4.0f ? 1.0f : y;
    return copysignf(y, x);
}

/* The fc1 -> GELU -> (quantise for fc2) step of a transformer MLP in one pass per row:
 * dequantise the int32 row, add the bias, apply exact-form GELU 0.5 x (1 + erf(x/sqrt2)),
 * and quantise the result to int8 with its own row scale.  The float row lives only in
 * the (cache-hot) int32 buffer it came from. */
static inline float gelu_quantize_row(int32_t *a, int64_t n, float rs, const float *col_scale,
                                      const float *bias, int8_t *q) {
    float *h = (float *)a;   /* each element read before it is written */
    uint32_t amax_bits = 0;  /* |h| bit patterns: the integer max of row_absmax */
    /* dequantise + bias (as dequantize_row), GELU and the row maximum in one pass */
    for (int64_t j = 0; j < n; ++j) {
        float x = (float)a[j] * rs;
        x = x * col_scale[j];
        if (bias) x = x + bias[j];
        const float g = 0.5f * x * (1.0f + erf_approx(x * 0.70710678118654752f));
        h[j] = g;
        uint32_t bits;
        memcpy(&bits, &g, sizeof bits);
        bits &= 0x7fffffffu;
        amax_bits = bits > amax_bits ? bits : amax_bits;
    }
    float amax;
    memcpy(&amax, &amax_bits, sizeof amax);
    return quantize_row_amax(h, n, amax, q);
}

void vpr_dequantize_gelu_quantize(int32_t *acc, int64_t m, int64_t n, const float *row_scale,
                                  const float *col_scale, const float *bias, int8_t *q,
                                  float *q_scale, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < m; ++i)
        q_scale[i] = gelu_quantize_row(acc + i * n, n, row_scale[i], col_scale, bias, q + i * n);
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

/* LayerNorm of one row r (biased variance, as torch) into h, then its int8 codes q;
 * returns the row scale. */
static inline float layer_norm_quantize_row(const float *r, int64_t k, const float *weight,
                                            const float *bias, float eps, float *h, int8_t *q) {
    const float mean = row_sum(r, k) / (float)k;
    const float var = row_centered_sq_sum(r, k, mean) / (float)k;
    const float rstd = 1.0f / sqrtf(var + eps);
    for (int64_t j = 0; j < k; ++j) h[j] = (r[j] - mean) * rstd * weight[j] + bias[j];
    return quantize_row(h, k, q);
}

/* LayerNorm of each row (biased variance, as torch), then int8 quantisation of the
 * result; the normalised float row only lives in per-thread scratch (tmp: num_threads * k
 * floats). */
void vpr_layer_norm_quantize(const float *x, int64_t m, int64_t k, const float *weight,
                             const float *bias, float eps, int8_t *q, float *q_scale,
                             float *tmp, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < m; ++i) {
        q_scale[i] = layer_norm_quantize_row(x + i * k, k, weight, bias, eps,
                                             tmp + (int64_t)omp_get_thread_num() * k, q + i * k);
    }
}

/* ---------------------------------------------------------------------------------------
 * Multi-head attention on integer Q, K, V and softmax weights (one image, one head at a
 * time; the heads of all images are shared out between the threads).
 *
 *   Q, K: int16 codes, one scale per token (absmax of its head_dim values / L), with
 *         L = min(32767, floor(sqrt((2^31 - 1) / d_pad))) so that a dot product of
 *         head_dim codes stays exact in int32 (d_pad: head_dim rounded up to 16;
 *         L = 5792 at head_dim 64);
 *         S = (Q K^T) * q_scale * k_scale * scale, exact in int32 before the floats.
 *   P:    e = exp(S - rowmax) in float32, then int16 codes round(32767 e / sum(e)): the
 *         softmax weights in steps of 1/32767 of the row's total;
 *   V:    int16 codes, one scale per channel over the image's tokens (absmax / 32767);
 *   out = (P_codes V_codes) * v_scale / sum(P_codes), exact in int32 before the floats
 *         (|sum| <= 32767 * sum(P_codes) <= 32767 * (32767 + n / 2): n < 32768 tokens).
 *
 * 8-bit codes were tried first (int8 Q, K as the linear layers use, weights in steps of
 * 1/255 of the row maximum): 1.5x faster than these, but with one dominant key (an
 * attention sink, logits of tens) the rounding of the scores and weights moved the
 * output by several percent.  With AVX512-VNNI both products are vpdpwssd (int16 pairs
 * -> int32).  Without it plain C loops compute the same integers, and the float steps
 * are the same operations in the same order, so both give the same bits.  Everything is
 * computed per (image, head), so the result does not depend on the batch.
 * ------------------------------------------------------------------------------------ */

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#include <limits.h>
#include <sched.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define VPR_HAVE_VNNI 1
#else
#define VPR_HAVE_VNNI 0
#endif
#include <stdlib.h>

#define ATT_BLOCK 16            /* keys per score vector, channels per output vector */
#define ROWS 4                  /* query rows computed together (each load of B serves 4) */
#define EXP_FLOOR (-87.0f)      /* below: exp underflows float32; clamped to it */
#define INT16_MAX_F 32767.0f

/* e^x for x <= 0 (float32, within 3e-7 relative): x = n ln2 + r with |r| <= ln2 / 2, a
 * degree-6 Taylor polynomial in r by explicit fused multiply-adds (fmaf: one rounding
 * whatever -ffp-contract says, as the AVX-512 form below), times 2^n (n >= -126: a
 * normal float, so p * 2^n is the one rounding vscalefps makes).  Below EXP_FLOOR the
 * result is e^EXP_FLOOR (~1.6e-38) instead of 0: such a weight is far below the
 * 1/32767 step of the codes, so the codes and their sum are the same. */
static inline float exp_nonpositive(float x) {
    const float xc = x < EXP_FLOOR ? EXP_FLOOR : x;
    const float n = rintf(xc * 1.4426950408889634f);
    float r = fmaf(-n, 0.693145751953125f, xc);
    r = fmaf(-n, 1.4286068203094173e-06f, r);
    float p = 1.0f / 720.0f;
    p = fmaf(p, r, 1.0f / 120.0f);
    p = fmaf(p, r, 1.0f / 24.0f);
    p = fmaf(p, r, 1.0f / 6.0f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

static inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

/* Per-(image, head) scratch, sized for n tokens of head_dim d. */
typedef struct {
    int64_t n, d, n_pad, d_pad;
    float levels;      /* L: largest Q/K code */
    int16_t *q;        /* n_pad x d_pad: Q codes (padding rows/channels: 0) */
    float *q_scale;    /* n */
    int16_t *k;        /* VNNI layout [n_pad/16][d_pad/2][16][2] */
    float *k_scale;    /* n_pad (padding: 0) */
    int16_t *v;        /* VNNI layout [d_pad/16][n_pad/2][16][2] */
    float *v_scale;    /* d_pad */
    float *s;          /* n_pad: one row of scores, then of exp(score - max) */
    int16_t *p;        /* ROWS x n_pad: weight codes of ROWS query rows (padding: 0) */
    int32_t *ints;     /* ROWS x max(n_pad, d_pad): integer scores, then integer sums */
    int16_t *codes;    /* n_pad x d_pad: K or V codes in token order, before the re-layout */
    void *block;
} attention_scratch;

static int scratch_alloc(attention_scratch *w, int64_t n, int64_t d) {
    w->n = n;
    w->d = d;
    w->n_pad = round_up(n, ATT_BLOCK);
    w->d_pad = round_up(d, ATT_BLOCK);
    /* in double: 2^31 - 1 is not a float, and d_pad * L^2 must stay below it exactly */
    const double levels = floor(sqrt(2147483647.0 / (double)w->d_pad));
    w->levels = levels < 32767.0 ? (float)levels : INT16_MAX_F;
    const int64_t np = w->n_pad, dp = w->d_pad, wide = np > dp ? np : dp;
    const int64_t sizes[10] = {np * dp * 2, n * 4, np * dp * 2, np * 4, dp * np * 2, dp * 4,
                               np * 4, ROWS * np * 2, ROWS * wide * 4, np * dp * 2};
    int64_t total = 0;
    for (int i = 0; i < 10; ++i) total += round_up(sizes[i], 64);
    w->block = aligned_alloc(64, (size_t)total);   /* 64-byte aligned pieces of one block */
    if (!w->block) return -1;
    char *at = (char *)w->block;
    void *piece[10];
    for (int i = 0; i < 10; ++i) {
        piece[i] = at;
        at += round_up(sizes[i], 64);
    }
    w->q = piece[0];
    w->q_scale = piece[1];
    w->k = piece[2];
    w->k_scale = piece[3];
    w->v = piece[4];
    w->v_scale = piece[5];
    w->s = piece[6];
    w->p = piece[7];
    w->ints = piece[8];
    w->codes = piece[9];
    return 0;
}

/* int16 codes of one row with `levels` steps per side: code = round(x * (levels / absmax));
 * returns the row's scale absmax / levels. */
static inline float quantize_row16(const float *x, int64_t k, float levels, int16_t *q) {
    float amax = row_absmax(x, k);
    if (amax < TINY_SCALE) amax = TINY_SCALE;
    const float mult = (1.0f / amax) * levels;
    for (int64_t j = 0; j < k; ++j) q[j] = (int16_t)(int32_t)rintf(x[j] * mult);
    return amax / levels;
}

/* K codes (token order, rows of d_pad) -> VNNI layout [n_pad/16][d_pad/2][16][2]: each
 * key's channel pairs spread over 16 keys, a transpose of 32-bit words. */
static void keys_to_vnni(const int16_t *codes, int64_t np, int64_t dp, int16_t *out) {
    const int64_t g = dp / 2;
    for (int64_t jb = 0; jb < np / ATT_BLOCK; ++jb)
        for (int64_t l = 0; l < ATT_BLOCK; ++l) {
            const int16_t *src = codes + (jb * ATT_BLOCK + l) * dp;
            int16_t *dst = out + jb * g * (ATT_BLOCK * 2) + l * 2;
            for (int64_t c2 = 0; c2 < g; ++c2) memcpy(dst + c2 * (ATT_BLOCK * 2), src + 2 * c2, 4);
        }
}

/* V codes (token order, rows of d_pad) -> VNNI layout [d_pad/16][n_pad/2][16][2]: for 16
 * channels, the codes of 2 consecutive tokens side by side, a transpose of int16. */
static void values_to_vnni(const int16_t *codes, int64_t np, int64_t dp, int16_t *out,
                           int generic) {
    const int64_t t2n = np / 2;
#if VPR_HAVE_VNNI
    if (!generic) {
        /* 2 rows x 16 channels in one register, then one word permutation:
         * output word 2 l + e <- input word 16 e + l */
        int16_t order[32];
        for (int l = 0; l < ATT_BLOCK; ++l)
            for (int e = 0; e < 2; ++e) order[2 * l + e] = (int16_t)(16 * e + l);
        const __m512i idx = _mm512_loadu_si512((const void *)order);
        for (int64_t cb = 0; cb < dp / ATT_BLOCK; ++cb)
            for (int64_t t2 = 0; t2 < t2n; ++t2) {
                const int16_t *src = codes + 2 * t2 * dp + cb * ATT_BLOCK;
                __m512i z = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)src));
                z = _mm512_inserti64x4(z, _mm256_loadu_si256((const __m256i *)(src + dp)), 1);
                _mm512_store_si512((void *)(out + (cb * t2n + t2) * 32),
                                   _mm512_permutexvar_epi16(idx, z));
            }
        return;
    }
#endif
    (void)generic;
    for (int64_t cb = 0; cb < dp / ATT_BLOCK; ++cb)
        for (int64_t t2 = 0; t2 < t2n; ++t2) {
            int16_t *dst = out + (cb * t2n + t2) * 32;
            for (int l = 0; l < ATT_BLOCK; ++l)
                for (int e = 0; e < 2; ++e)
                    dst[2 * l + e] = codes[(2 * t2 + e) * dp + cb * ATT_BLOCK + l];
        }
}

/* Zero the padding of one image-head's code buffers (padding tokens and channels), before
 * its Q, K and V codes are written. */
static void attention_prepare(attention_scratch *w) {
    const int64_t n = w->n, d = w->d, np = w->n_pad, dp = w->d_pad;
    /* padding tokens and channels: code 0 (with no padding channels, only the padding
     * tokens' rows need it: every other code is written below) */
    const int64_t from = d == dp ? n * dp : 0;
    memset(w->codes + from, 0, (size_t)((np * dp - from) * 2));
    memset(w->q + from, 0, (size_t)((np * dp - from) * 2));
}

/* Token t's Q and K codes (head_dim values at q, k). */
static inline void attention_qk_row(attention_scratch *w, int64_t t, const float *q,
                                    const float *k) {
    w->q_scale[t] = quantize_row16(q, w->d, w->levels, w->q + t * w->d_pad);
    w->k_scale[t] = quantize_row16(k, w->d, w->levels, w->codes + t * w->d_pad);
}

static void attention_quantize_v(attention_scratch *w, const float *v_src, int64_t stride,
                                 int generic);

/* Quantise one image-head's Q, K (per token) and V (per channel) into the scratch.
 * Token t's head_dim values of q, k, v start at q_src, k_src, v_src + t * stride. */
static void attention_quantize(attention_scratch *w, const float *q_src, const float *k_src,
                               const float *v_src, int64_t stride, int generic) {
    attention_prepare(w);
    for (int64_t t = 0; t < w->n; ++t)
        attention_qk_row(w, t, q_src + t * stride, k_src + t * stride);
    attention_quantize_v(w, v_src, stride, generic);
}

/* After every token's attention_qk_row: the keys' re-layout, then the V codes. */
static void attention_quantize_v(attention_scratch *w, const float *v_src, int64_t stride,
                                 int generic) {
    const int64_t n = w->n, d = w->d, np = w->n_pad, dp = w->d_pad;
    int16_t *codes = w->codes;
    for (int64_t t = n; t < np; ++t) w->k_scale[t] = 0.0f;
    keys_to_vnni(codes, np, dp, w->k);
    /* V: absmax of each channel over the tokens, then codes in token order */
    float mult[dp];
    uint32_t vmax[dp];          /* |v| bit patterns: an integer max, as row_absmax */
    for (int64_t c = 0; c < dp; ++c) {
        vmax[c] = 0;
        w->v_scale[c] = 0.0f;
    }
    for (int64_t t = 0; t < n; ++t) {
        const uint32_t *x = (const uint32_t *)(v_src + t * stride);
        for (int64_t c = 0; c < d; ++c) {
            const uint32_t a = x[c] & 0x7fffffffu;
            vmax[c] = a > vmax[c] ? a : vmax[c];
        }
    }
    for (int64_t c = 0; c < d; ++c) {
        float amax;
        memcpy(&amax, vmax + c, sizeof amax);
        amax = amax < TINY_SCALE ? TINY_SCALE : amax;
        mult[c] = (1.0f / amax) * INT16_MAX_F;
        w->v_scale[c] = amax / INT16_MAX_F;
    }
    for (int64_t t = 0; t < n; ++t) {
        const float *x = v_src + t * stride;
        int16_t *vc = codes + t * dp;
        for (int64_t c = 0; c < d; ++c) vc[c] = (int16_t)(int32_t)rintf(x[c] * mult[c]);
    }
    values_to_vnni(codes, np, dp, w->v, generic);
}

/* C[r][l] = sum_k A[r][k] B[l][k] for ROWS rows r of int16 A (row stride a_stride) and
 * n_blocks blocks of 16 columns l of int16 B in the VNNI layout [n_blocks][k2][16][2]
 * (block stride b_stride elements, k2 = k / 2 pairs per column), into int32 C (row stride
 * c_stride).  The scores (A: query codes, B: keys) and the weighted sums (A: weight codes,
 * B: values) are both this product.  Integer sums are exact, so the AVX512-VNNI path and
 * the plain loops give the same result. */
static void s16_product(const int16_t *a, int64_t a_stride, const int16_t *b, int64_t b_stride,
                        int64_t n_blocks, int64_t k2, int32_t *c, int64_t c_stride,
                        int generic) {
#if VPR_HAVE_VNNI
    if (!generic) {
        int64_t jb = 0;
        /* 4 rows x 4 column blocks: 16 independent accumulator chains, and each load of B
         * serves 4 rows (one row at a time waits on the cache for B) */
        for (; jb + 4 <= n_blocks; jb += 4) {
            const int16_t *bb = b + jb * b_stride;
            __m512i acc[ROWS][4];
            for (int r = 0; r < ROWS; ++r)
                for (int l = 0; l < 4; ++l) acc[r][l] = _mm512_setzero_si512();
            for (int64_t g = 0; g < k2; ++g) {
                __m512i col[4];
                for (int l = 0; l < 4; ++l) {
                    col[l] = _mm512_load_si512((const void *)(bb + l * b_stride + g * 32));
                    /* keep the column in a register: otherwise the compiler folds the load
                     * into each of the 4 rows' vpdpwssd, 4 512-bit loads where 1 does (the
                     * loads, not the multiply-adds, then bound the loop; 1.1x measured) */
                    __asm__("" : "+v"(col[l]));
                }
                for (int r = 0; r < ROWS; ++r) {
                    int32_t two;
                    memcpy(&two, a + r * a_stride + 2 * g, 4);
                    const __m512i row = _mm512_set1_epi32(two);
                    for (int l = 0; l < 4; ++l)
                        acc[r][l] = _mm512_dpwssd_epi32(acc[r][l], row, col[l]);
                }
            }
            for (int r = 0; r < ROWS; ++r)
                for (int l = 0; l < 4; ++l)
                    _mm512_storeu_si512((void *)(c + r * c_stride + (jb + l) * ATT_BLOCK),
                                        acc[r][l]);
        }
        for (; jb < n_blocks; ++jb) {
            const int16_t *bb = b + jb * b_stride;
            __m512i acc[ROWS];
            for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_si512();
            for (int64_t g = 0; g < k2; ++g) {
                const __m512i col = _mm512_load_si512((const void *)(bb + g * 32));
                for (int r = 0; r < ROWS; ++r) {
                    int32_t two;
                    memcpy(&two, a + r * a_stride + 2 * g, 4);
                    acc[r] = _mm512_dpwssd_epi32(acc[r], _mm512_set1_epi32(two), col);
                }
            }
            for (int r = 0; r < ROWS; ++r)
                _mm512_storeu_si512((void *)(c + r * c_stride + jb * ATT_BLOCK), acc[r]);
        }
        return;
    }
#endif
    (void)generic;
    for (int r = 0; r < ROWS; ++r)
        for (int64_t jb = 0; jb < n_blocks; ++jb) {
            const int16_t *bb = b + jb * b_stride;
            for (int64_t l = 0; l < ATT_BLOCK; ++l) {
                int32_t acc = 0;
                for (int64_t g = 0; g < k2; ++g)
                    for (int64_t e = 0; e < 2; ++e)
                        acc += (int32_t)a[r * a_stride + 2 * g + e] * (int32_t)bb[g * 32 + l * 2 + e];
                c[r * c_stride + jb * ATT_BLOCK + l] = acc;
            }
        }
}

#if VPR_HAVE_VNNI
/* exp_nonpositive on 16 lanes: the same operations, so the same bits (vscalefps for the
 * product by 2^n: one instruction for the four of building 2^n and multiplying). */
static inline __m512 exp_nonpositive16(__m512 x) {
    const __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(EXP_FLOOR));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.4426950408889634f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.4286068203094173e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* The lanes of a 16-value vector that hold real values: `left` of them from the first
 * lane on (<= 0: none). */
static inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF
                      : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
}

/* 0..15: a value's lane in its vector of 16 */
#define LANE_INDEX _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
#endif

/* Softmax weight codes of one query row from its integer scores: e = exp(s - max s),
 * code = round(32767 e / sum(e)), the sum in a fixed order (e[j] into partial sum j mod 16,
 * then a fixed tree); returns the sum of the codes.  The AVX-512 form does the same
 * operations in the same order (its 16 lanes are the 16 partial sums). */
static int32_t weight_codes(const attention_scratch *w, const int32_t *dots, float q_scale,
                            float scale, int16_t *p, int generic) {
    const int64_t n = w->n;
    float *s = w->s;
    const float row = q_scale * scale;
    float part[16];
#if VPR_HAVE_VNNI
    if (!generic) {
        /* full 16-lane loads and stores up to n_pad (the buffers hold n_pad; masked memory
         * operations are slow on some CPUs), lanes past n masked in registers only */
        const int64_t np = w->n_pad;
        const __m512 vrow = _mm512_set1_ps(row);
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < np; j += 16) {
            const __m512 v = _mm512_mul_ps(
                _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)(dots + j))), vrow),
                _mm512_loadu_ps(w->k_scale + j));
            _mm512_storeu_ps(s + j, v);
            vmax = _mm512_mask_max_ps(vmax, tail_mask(n - j), vmax, v);
        }
        const __m512 smax = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < np; j += 16) {
            const __m512 e = _mm512_maskz_mov_ps(
                tail_mask(n - j), exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(s + j), smax)));
            _mm512_storeu_ps(s + j, e);
            sum = _mm512_add_ps(sum, e);               /* + 0 in padding lanes: exact */
        }
        _mm512_storeu_ps(part, sum);
        for (int half = 8; half >= 1; half /= 2)
            for (int l = 0; l < half; ++l) part[l] += part[l + half];
        const __m512 mult = _mm512_set1_ps(INT16_MAX_F / part[0]);
        __m512i psum = _mm512_setzero_si512();
        for (int64_t j = 0; j < np; j += 16) {
            /* the conversion rounds to nearest even (the default MXCSR mode), as rintf */
            const __m512i code = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(s + j), mult));
            _mm256_storeu_si256((__m256i *)(p + j), _mm512_cvtepi32_epi16(code));
            psum = _mm512_add_epi32(psum, code);
        }
        return _mm512_reduce_add_epi32(psum);
    }
#endif
    (void)generic;
    float smax = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
        s[j] = (float)dots[j] * row * w->k_scale[j];
        smax = s[j] > smax ? s[j] : smax;
    }
    for (int l = 0; l < 16; ++l) part[l] = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
        const float e = exp_nonpositive(s[j] - smax);
        s[j] = e;
        part[j % 16] += e;
    }
    for (int half = 8; half >= 1; half /= 2)
        for (int l = 0; l < half; ++l) part[l] += part[l + half];
    const float mult = INT16_MAX_F / part[0];                /* sum >= 1: the maximum's e */
    int32_t psum = 0;
    for (int64_t j = 0; j < n; ++j) {
        const int32_t code = (int32_t)rintf(s[j] * mult);
        p[j] = (int16_t)code;
        psum += code;
    }
    return psum;
}

/* One image-head, ROWS query rows at a time: rows of `out` (stride out_stride). */
static void attention_head(attention_scratch *w, float scale, float *out, int64_t out_stride,
                           int generic) {
    const int64_t n = w->n, d = w->d, np = w->n_pad, dp = w->d_pad;
    const int64_t wide = np > dp ? np : dp;
    int32_t *ints = w->ints;
    memset(w->p, 0, (size_t)(ROWS * np * 2));
    for (int64_t i0 = 0; i0 < n; i0 += ROWS) {
        const int64_t rows = n - i0 < ROWS ? n - i0 : ROWS;   /* padding rows: ignored */
        s16_product(w->q + i0 * dp, dp, w->k, (dp / 2) * (ATT_BLOCK * 2), np / ATT_BLOCK,
                    dp / 2, ints, wide, generic);
        int32_t psum[ROWS];
        for (int64_t r = 0; r < rows; ++r)
            psum[r] = weight_codes(w, ints + r * wide, w->q_scale[i0 + r], scale,
                                   w->p + r * np, generic);
        /* the token pairs past the last real token hold only padding (weight code 0):
         * left out, the sums are the same */
        s16_product(w->p, np, w->v, (np / 2) * (ATT_BLOCK * 2), dp / ATT_BLOCK, (n + 1) / 2,
                    ints, wide, generic);
        for (int64_t r = 0; r < rows; ++r) {
            const float inv = 1.0f / (float)psum[r];
            const int32_t *restrict sums = ints + r * wide;
            const float *restrict v_scale = w->v_scale;   /* hoisted: the loop vectorises */
            float *restrict o = out + (i0 + r) * out_stride;
            for (int64_t c = 0; c < d; ++c) o[c] = (float)sums[c] * v_scale[c] * inv;
        }
    }
}

/* qkv: (b, n, 3, h, d) float32 rows as the qkv linear layer writes them; out: (b, n, h, d).
 * generic != 0: the plain-C loops even where AVX512-VNNI exists (for tests).
 * Returns 0; -1 if scratch memory could not be allocated (out is then incomplete); -2 if
 * n is too large for exact int32 sums (n >= 32768; out untouched). */
int vpr_integer_attention(const float *qkv, int64_t b, int64_t n, int64_t h, int64_t d,
                       float scale, float *out, int generic, int num_threads) {
    if (n >= 32768) return -2;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        attention_scratch w = {0};
        if (scratch_alloc(&w, n, d) != 0) failed = 1;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < b * h; ++item) {
            if (!w.block) continue;
            const int64_t img = item / h, head = item % h;
            const int64_t stride = 3 * h * d;
            const float *base = qkv + img * n * stride + head * d;
            attention_quantize(&w, base, base + h * d, base + 2 * h * d, stride, generic);
            attention_head(&w, scale, out + img * n * h * d + head * d, h * d, generic);
        }
        free(w.block);
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------
 * col2im of a transposed convolution, channels last (GemmConvTranspose2d, LocalAdapt).
 *
 * cols: per image, one row per input pixel (iy * w + ix) of kh * kw * c values in the
 * order [ky][kx][co] (the layer's matmul output: pixel x weight), bfloat16 (is_bf16) or
 * float32.  Input pixel (iy, ix) adds its [ky][kx] slice to output pixel
 * (iy * sh - ph + ky * dh, ix * sw - pw + kx * dw).  Each output pixel gathers its
 * contributions in a fixed order (ky, then kx ascending; each bf16 value widened
 * exactly), starting from 0, then adds the bias: out[b][oy][ox][co] float32, channels
 * last.  Threads take output rows, so no two write the same pixel and an image's result
 * never depends on the batch.  At most COL2IM_MAX_KH kernel rows (the one limit: the
 * Python side reads it with vpr_col2im_max_kernel_height and sends taller kernels to
 * F.fold); taller kernels would drop their rows beyond it.
 * ------------------------------------------------------------------------------------ */
#define COL2IM_MAX_KH 64
int vpr_col2im_max_kernel_height(void) { return COL2IM_MAX_KH; }

void vpr_col2im_channels_last(const void *cols, int is_bf16, int64_t b, int64_t h, int64_t w,
                              int64_t c, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                              int64_t ph, int64_t pw, int64_t dh, int64_t dw, int64_t oh,
                              int64_t ow, const float *bias, float *out, int num_threads) {
    const int64_t row = kh * kw * c;            /* values per input pixel */
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t item = 0; item < b * oh; ++item) {
        const int64_t img = item / oh, oy = item % oh;
        int64_t iys[COL2IM_MAX_KH], kys[COL2IM_MAX_KH], ny = 0;  /* rows (and ky) reaching oy */
        for (int64_t ky = 0; ky < kh && ny < COL2IM_MAX_KH; ++ky) {
            const int64_t t = oy + ph - ky * dh;
            if (t >= 0 && t % sh == 0 && t / sh < h) {
                iys[ny] = t / sh;
                kys[ny++] = ky;
            }
        }
        for (int64_t ox = 0; ox < ow; ++ox) {
            float *o = out + ((img * oh + oy) * ow + ox) * c;
            for (int64_t co = 0; co < c; ++co) o[co] = 0.0f;
            for (int64_t a = 0; a < ny; ++a)
                for (int64_t kx = 0; kx < kw; ++kx) {
                    const int64_t t = ox + pw - kx * dw;
                    if (t < 0 || t % sw != 0 || t / sw >= w) continue;
                    const int64_t base = ((img * h + iys[a]) * w + t / sw) * row
                                         + (kys[a] * kw + kx) * c;
                    if (is_bf16) {
                        const uint16_t *src = (const uint16_t *)cols + base;
                        for (int64_t co = 0; co < c; ++co) {
                            const uint32_t bits = (uint32_t)src[co] << 16;
                            float f;
                            memcpy(&f, &bits, sizeof f);
                            o[co] = o[co] + f;
                        }
                    } else {
                        const float *src = (const float *)cols + base;
                        for (int64_t co = 0; co < c; ++co) o[co] = o[co] + src[co];
                    }
                }
            if (bias)
                for (int64_t co = 0; co < c; ++co) o[co] = o[co] + bias[co];
        }
    }
}

/* ------------------------------------------------------------------------------------
 * Exact mutual-nearest-neighbour re-ranking: similarity codes with a fused top-2.
 *
 * x: candidate points, n_x rows of c_pad int16 codes (row-major, followed by zero rows up
 * to a multiple of ROWS, which the tiles read but never count); q: query points in the
 * VNNI layout of the attention's keys, [n_q_pad / 16][c_pad / 2][16][2] (n_q_pad a
 * multiple of MNN_GROUP, padding 0).  The code similarity I[j][i] = sum_c x[j][c] q[i][c] is accumulated in int32 with
 * wrap-around; the caller picks codes whose norms keep every true sum inside int32, so
 * each I[j][i] is exact.  No similarity matrix is stored: tiles of 4 candidate points x
 * 64 query points go straight into
 *   row_best[j], row_idx[j], row_second[j]  over the query points i < n_q, and
 *   col_best[i], col_idx[i], col_second[i]  over the candidate points j < n_x,
 * where *_idx is the first index of the maximum and *_second the largest value of the
 * others, so an exact tie gives second == best (zero margin; the caller re-computes such
 * rows and columns in float32).  Threads take contiguous ranges of candidate points with
 * their own column state, merged in thread order (lower rows first, so first index).
 * Returns 0, or -1 when scratch memory could not be allocated.
 * ------------------------------------------------------------------------------------ */
#define MNN_GROUP 64                     /* query points per tile: 4 blocks of 16 */

#if VPR_HAVE_VNNI
/* The product loop of a 4 x 64 VNNI tile, shared by the int16 (vpdpwssd) and the int8
 * (vpdpbusd) re-ranking kernels: the 16 named accumulators aRC (row R, block C of 16 query
 * points, declared by the caller) += INSN(broadcast of the 4 bytes of candidate row R at
 * step g, the vector of query block C at step g).  ROWS_PTR: 4 rows of ROW_LEN elements;
 * PER elements make 4 bytes; QG: the query group, [4 blocks][STEPS][16][PER].  FLIP is
 * XORed into each row's 4 bytes before the broadcast (0x80808080 turns s8 into the u8
 * a + 128 that vpdpbusd multiplies; 0: as stored).  The
 * accumulators are named and the instruction goes through asm: with an array and GCC's
 * intrinsics the accumulators were copied or kept in memory on every step, and GCC folded
 * each query load into every instruction (load-bound). */
#define VNNI_DP(INSN, acc, row, col) \
    __asm__(INSN " %2, %1, %0" : "+v"(acc) : "v"(row), "v"(col))
#define VNNI_TILE_4X4(INSN, ROWS_PTR, ROW_LEN, PER, QG, STEPS, FLIP)                        \
    do {                                                                                     \
        const int64_t steps_ = (STEPS), block_ = steps_ * 16 * (PER);                        \
        for (int64_t g = 0; g < steps_; ++g) {                                               \
            int32_t f0, f1, f2, f3;                                                          \
            memcpy(&f0, (ROWS_PTR) + (PER) * g, 4);                                          \
            memcpy(&f1, (ROWS_PTR) + (ROW_LEN) + (PER) * g, 4);                              \
            memcpy(&f2, (ROWS_PTR) + 2 * (ROW_LEN) + (PER) * g, 4);                          \
            memcpy(&f3, (ROWS_PTR) + 3 * (ROW_LEN) + (PER) * g, 4);                          \
            f0 ^= (FLIP); f1 ^= (FLIP); f2 ^= (FLIP); f3 ^= (FLIP);                          \
            const __m512i r0 = _mm512_set1_epi32(f0), r1 = _mm512_set1_epi32(f1);            \
            const __m512i r2 = _mm512_set1_epi32(f2), r3 = _mm512_set1_epi32(f3);            \
            const __typeof__(*(QG)) *qq = (QG) + g * 16 * (PER);                             \
            __m512i col = _mm512_load_si512((const void *)qq);                               \
            VNNI_DP(INSN, a00, r0, col); VNNI_DP(INSN, a10, r1, col);                        \
            VNNI_DP(INSN, a20, r2, col); VNNI_DP(INSN, a30, r3, col);                        \
            col = _mm512_load_si512((const void *)(qq + block_));                            \
            VNNI_DP(INSN, a01, r0, col); VNNI_DP(INSN, a11, r1, col);                        \
            VNNI_DP(INSN, a21, r2, col); VNNI_DP(INSN, a31, r3, col);                        \
            col = _mm512_load_si512((const void *)(qq + 2 * block_));                        \
            VNNI_DP(INSN, a02, r0, col); VNNI_DP(INSN, a12, r1, col);                        \
            VNNI_DP(INSN, a22, r2, col); VNNI_DP(INSN, a32, r3, col);                        \
            col = _mm512_load_si512((const void *)(qq + 3 * block_));                        \
            VNNI_DP(INSN, a03, r0, col); VNNI_DP(INSN, a13, r1, col);                        \
            VNNI_DP(INSN, a23, r2, col); VNNI_DP(INSN, a33, r3, col);                        \
        }                                                                                    \
    } while (0)
#endif

static void mnn_tile(const int16_t *x, int64_t c_pad, const int16_t *qg, int rows,
                     int32_t tile[ROWS][MNN_GROUP], int generic) {
    /* 4 rows x 4 blocks of 16 query points, the attention's product (s16_product) in
     * other registers; exact (every partial sum of a code dot product is bounded like the
     * whole one, by Cauchy-Schwarz) */
    (void)rows;
#if VPR_HAVE_VNNI
    if (!generic) {
        /* each query load in a register serves 4 rows (VNNI_TILE_4X4) */
        __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00;
        __m512i a10 = a00, a11 = a00, a12 = a00, a13 = a00, a20 = a00, a21 = a00, a22 = a00;
        __m512i a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
        VNNI_TILE_4X4("vpdpwssd", x, c_pad, 2, qg, c_pad / 2, 0);
        const __m512i acc[4][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13},
                                   {a20, a21, a22, a23}, {a30, a31, a32, a33}};
        for (int r = 0; r < 4; ++r)
            for (int l = 0; l < 4; ++l) _mm512_store_si512((void *)&tile[r][l * 16], acc[r][l]);
        return;
    }
#endif
    s16_product(x, c_pad, qg, (c_pad / 2) * 32, MNN_GROUP / ATT_BLOCK, c_pad / 2, &tile[0][0],
                MNN_GROUP, generic);
}

static inline void top2_insert(int32_t v, int32_t index, int32_t *best, int32_t *idx,
                               int32_t *second) {
    if (v > *best) {
        *second = *best;
        *best = v;
        *idx = index;
    } else if (v > *second) {
        *second = v;
    }
}

int vpr_mnn_top2(const int16_t *x, int64_t n_x, const int16_t *q, int64_t n_q, int64_t c_pad,
                 int32_t *row_best, int32_t *row_idx, int32_t *row_second,
                 int32_t *col_best, int32_t *col_idx, int32_t *col_second,
                 int generic, int num_threads) {
    const int64_t n_q_pad = round_up(n_q, MNN_GROUP), groups = n_q_pad / MNN_GROUP;
    const int64_t group_stride = MNN_GROUP * c_pad;            /* int16 per group of q */
    if (num_threads < 1) num_threads = 1;
    int32_t *state = malloc((size_t)num_threads * 3 * n_q_pad * sizeof(int32_t));
    if (!state) return -1;
    for (int64_t i = 0; i < (int64_t)num_threads * n_q_pad; ++i) {   /* unused threads: neutral */
        int32_t *cb = state + (i / n_q_pad) * 3 * n_q_pad + i % n_q_pad;
        cb[0] = cb[2 * n_q_pad] = INT32_MIN;
        cb[n_q_pad] = 0;
    }
    for (int64_t j = 0; j < n_x; ++j) {
        row_best[j] = row_second[j] = INT32_MIN;
        row_idx[j] = 0;
    }
#pragma omp parallel num_threads(num_threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t per = round_up((n_x + nt - 1) / nt, ROWS);
        const int64_t j_start = t * per < n_x ? t * per : n_x;
        const int64_t j_end = j_start + per < n_x ? j_start + per : n_x;
        int32_t *cb = state + (int64_t)t * 3 * n_q_pad, *ci = cb + n_q_pad, *cs = ci + n_q_pad;
        int32_t tile[ROWS][MNN_GROUP] __attribute__((aligned(64)));
        for (int64_t gi = 0; gi < groups; ++gi) {
            const int16_t *qg = q + gi * group_stride;
            const int64_t i0 = gi * MNN_GROUP;
            const int valid = (int)(n_q - i0 < MNN_GROUP ? n_q - i0 : MNN_GROUP);
            for (int64_t j0 = j_start; j0 < j_end; j0 += ROWS) {
                const int rows = (int)(j_end - j0 < ROWS ? j_end - j0 : ROWS);
                mnn_tile(x + j0 * c_pad, c_pad, qg, rows, tile, generic);
                /* rows (candidate points): only values above the current second best */
                for (int r = 0; r < rows; ++r) {
                    const int64_t j = j0 + r;
#if VPR_HAVE_VNNI
                    if (!generic) {     /* most tiles hold nothing above the second best */
                        const __m512i thr = _mm512_set1_epi32(row_second[j]);
                        __mmask16 any = 0;
                        for (int l = 0; l < 4; ++l)
                            any |= _mm512_cmpgt_epi32_mask(
                                _mm512_load_si512((const void *)&tile[r][l * 16]), thr);
                        if (!any) continue;
                    }
#endif
                    int32_t best = row_best[j], idx = row_idx[j], second = row_second[j];
                    for (int e = 0; e < valid; ++e)
                        if (tile[r][e] > second) top2_insert(tile[r][e], (int32_t)(i0 + e), &best, &idx, &second);
                    row_best[j] = best;
                    row_idx[j] = idx;
                    row_second[j] = second;
                }
                /* columns (query points): every lane, in row order */
#if VPR_HAVE_VNNI
                if (!generic) {
                    for (int l = 0; l < 4; ++l) {
                        __m512i b = _mm512_loadu_si512((const void *)(cb + i0 + l * 16));
                        __m512i s = _mm512_loadu_si512((const void *)(cs + i0 + l * 16));
                        __m512i ix = _mm512_loadu_si512((const void *)(ci + i0 + l * 16));
                        for (int r = 0; r < rows; ++r) {
                            const __m512i v = _mm512_load_si512((const void *)&tile[r][l * 16]);
                            s = _mm512_max_epi32(s, _mm512_min_epi32(v, b));
                            const __mmask16 gt = _mm512_cmpgt_epi32_mask(v, b);
                            b = _mm512_max_epi32(b, v);
                            ix = _mm512_mask_mov_epi32(ix, gt, _mm512_set1_epi32((int32_t)(j0 + r)));
                        }
                        _mm512_storeu_si512((void *)(cb + i0 + l * 16), b);
                        _mm512_storeu_si512((void *)(cs + i0 + l * 16), s);
                        _mm512_storeu_si512((void *)(ci + i0 + l * 16), ix);
                    }
                    continue;
                }
#endif
                for (int r = 0; r < rows; ++r)
                    for (int e = 0; e < MNN_GROUP; ++e) {
                        const int32_t v = tile[r][e];
                        const int64_t i = i0 + e;
                        cs[i] = cs[i] > (v < cb[i] ? v : cb[i]) ? cs[i] : (v < cb[i] ? v : cb[i]);
                        if (v > cb[i]) {
                            cb[i] = v;
                            ci[i] = (int32_t)(j0 + r);
                        }
                    }
            }
        }
    }
    /* merge the threads' column state in thread order (lower candidate rows first) */
    for (int64_t i = 0; i < n_q; ++i) {
        int32_t best = INT32_MIN, idx = 0, second = INT32_MIN;
        for (int t = 0; t < num_threads; ++t) {
            const int32_t *cb = state + (int64_t)t * 3 * n_q_pad;
            const int32_t b = cb[i], ix = cb[n_q_pad + i], s = cb[2 * n_q_pad + i];
            const int32_t lo = b < best ? b : best;
            second = second > s ? second : s;
            second = second > lo ? second : lo;
            if (b > best) {
                best = b;
                idx = ix;
            }
        }
        col_best[i] = best;
        col_idx[i] = idx;
        col_second[i] = second;
    }
    free(state);
    return 0;
}

/* Exact float32 re-computation for vpr_mnn_top2's ambiguous rows and columns.
 * b (n_b x c float32, row-major) packed as panels of 32 points, [ceil(n_b/32)][c][32]
 * (padding 0), so that the re-computation reads it contiguously. */
#define EXACT_PANEL 32
void vpr_pack_panels(const float *b, int64_t n_b, int64_t c, float *out) {
    const int64_t panels = (n_b + EXACT_PANEL - 1) / EXACT_PANEL;
    for (int64_t p = 0; p < panels; ++p)
        for (int64_t k = 0; k < c; ++k) {
            float *o = out + (p * c + k) * EXACT_PANEL;
            for (int e = 0; e < EXACT_PANEL; ++e) {
                const int64_t i = p * EXACT_PANEL + e;
                o[e] = i < n_b ? b[i * c + k] : 0.0f;
            }
        }
}

/* For each selected s = sel[t]: out[t] = the first index i < n_b of the largest
 * dot(a[s], b[i]) (b packed by vpr_pack_panels), out_value[t] that value.  Each dot
 * product is one chain of fused multiply-adds in channel order from 0 - the values the
 * BLAS sgemm kernels give for these shapes (checked once per process against numpy's
 * matmul by the caller, and by the tests) - so the argmax is the plain path's, ties
 * included.  Vector lanes hold different dot products, never parts of one; groups of 4
 * selected rows share every load of b. */
void vpr_exact_argmax(const float *a, const float *b_panels, int64_t n_b, int64_t c,
                      const int64_t *sel, int64_t n_sel, int64_t *out, float *out_value,
                      int generic, int num_threads) {
    const int64_t groups = (n_sel + 3) / 4, panels = (n_b + EXACT_PANEL - 1) / EXACT_PANEL;
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int64_t gi = 0; gi < groups; ++gi) {
        const int64_t t0 = gi * 4;
        const int nr = (int)(n_sel - t0 < 4 ? n_sel - t0 : 4);
        const float *x[4];
        for (int r = 0; r < 4; ++r) x[r] = a + sel[t0 + (r < nr ? r : 0)] * c;
        float best[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
        int64_t best_i[4] = {0, 0, 0, 0};
        float v[4][EXACT_PANEL] __attribute__((aligned(64)));
        for (int64_t p = 0; p < panels; ++p) {
            const float *bp = b_panels + p * c * EXACT_PANEL;
#if VPR_HAVE_VNNI
            if (!generic) {
                __m512 acc[4][2];
                for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
                for (int64_t k = 0; k < c; ++k) {
                    __m512 b0 = _mm512_load_ps(bp + k * EXACT_PANEL);
                    __m512 b1 = _mm512_load_ps(bp + k * EXACT_PANEL + 16);
                    __asm__("" : "+v"(b0), "+v"(b1));     /* one load each, not 4 */
                    for (int r = 0; r < 4; ++r) {
                        const __m512 xk = _mm512_set1_ps(x[r][k]);
                        acc[r][0] = _mm512_fmadd_ps(xk, b0, acc[r][0]);
                        acc[r][1] = _mm512_fmadd_ps(xk, b1, acc[r][1]);
                    }
                }
                for (int r = 0; r < 4; ++r) {
                    _mm512_store_ps(v[r], acc[r][0]);
                    _mm512_store_ps(v[r] + 16, acc[r][1]);
                }
            } else
#endif
            {
                for (int r = 0; r < 4; ++r)
                    for (int e = 0; e < EXACT_PANEL; ++e) {
                        float acc = 0.0f;
                        for (int64_t k = 0; k < c; ++k)
                            acc = fmaf(x[r][k], bp[k * EXACT_PANEL + e], acc);
                        v[r][e] = acc;
                    }
            }
            const int valid = (int)(n_b - p * EXACT_PANEL < EXACT_PANEL ? n_b - p * EXACT_PANEL
                                                                        : EXACT_PANEL);
            for (int r = 0; r < nr; ++r)
                for (int e = 0; e < valid; ++e)
                    if (v[r][e] > best[r] || (p == 0 && e == 0)) {
                        best[r] = v[r][e];
                        best_i[r] = p * EXACT_PANEL + e;
                    }
        }
        for (int r = 0; r < nr; ++r) {
            out[t0 + r] = best_i[r];
            out_value[t0 + r] = best[r];
        }
    }
}

/* Per point of x (n x c float32): norm[j] = |x_j| and the largest |x_jk| over all points
 * (*absmax), in double. */
void vpr_point_norms(const float *x, int64_t n, int64_t c, double *norm, double *absmax,
                     int num_threads) {
    double amax = 0.0;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(max : amax)
    for (int64_t j = 0; j < n; ++j) {
        const float *p = x + j * c;
        double s = 0.0;
        for (int64_t k = 0; k < c; ++k) {
            const double v = p[k];
            s += v * v;
            const double a = fabs(v);
            amax = a > amax ? a : amax;
        }
        norm[j] = sqrt(s);
    }
    *absmax = amax;
}

/* int16 codes of x with one scale: code = rint(x * inv_scale) (rows of c_pad, padding 0),
 * err[j] = |x_j - scale * code_j| and hat[j] = |scale * code_j|, in double. */
void vpr_codes16(const float *x, int64_t n, int64_t c, int64_t c_pad, double scale,
                 int16_t *codes, double *err, double *hat, int num_threads) {
    const double inv = 1.0 / scale;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t j = 0; j < n; ++j) {
        const float *p = x + j * c;
        int16_t *q = codes + j * c_pad;
        double e = 0.0, h = 0.0;
        for (int64_t k = 0; k < c; ++k) {
            const double code = rint((double)p[k] * inv);
            q[k] = (int16_t)code;
            const double r = scale * code, d = (double)p[k] - r;
            e += d * d;
            h += r * r;
        }
        for (int64_t k = c; k < c_pad; ++k) q[k] = 0;
        err[j] = sqrt(e);
        hat[j] = sqrt(h);
    }
}

/* ------------------------------------------------------------------------------------
 * rrspeed: exact fused mutual nearest neighbours in float32 (vpr_mnn_exact_counts).
 *
 * For K candidate maps x_k (n_x[k] x c float32, row-major, addresses in cand[k]) and one
 * query map (n_q x c, packed by vpr_pack_panels), counts[k] = the number of query points
 * i whose best candidate point j (first index of the largest similarity over j) has i as
 * its best query point (first index over i): the official mutual-nearest-neighbour count.
 * Every similarity is one chain of fused multiply-adds in channel order from 0, the value
 * the BLAS sgemm gives (as vpr_exact_argmax; the caller checks the equality once per
 * process), and the matrix is never stored: tiles of 4 candidate points x 32 query points
 * update, in registers, each candidate point's best (value, index) per lane over the
 * query panels (strict >, so the first panel per lane; the lanes are reduced at the end
 * to the smallest index of the maximum = the first index), and each query point's best
 * (value, index) over the candidate points in row order (strict >: first index).  Work
 * items are (candidate, range of candidate points); the column states of a candidate's
 * ranges are merged in range order, so the first index wins across them too.  The caller
 * guarantees finite features whose products cannot overflow (no NaN can arise).
 * Returns 0, or -1 when scratch memory could not be allocated.
 * ------------------------------------------------------------------------------------ */
#define FUSED_ROWS 4

static void mnn_exact_range(const float *x, int64_t j_begin, int64_t j_end, const float *qp,
                            int64_t n_q, int64_t c, int32_t *row_idx, float *col_best,
                            int32_t *col_idx, int generic) {
    const int64_t panels = (n_q + EXACT_PANEL - 1) / EXACT_PANEL;
    for (int64_t i = 0; i < panels * EXACT_PANEL; ++i) {
        col_best[i] = -INFINITY;
        col_idx[i] = (int32_t)j_begin;
    }
    for (int64_t j0 = j_begin; j0 < j_end; j0 += FUSED_ROWS) {
        const int nr = (int)(j_end - j0 < FUSED_ROWS ? j_end - j0 : FUSED_ROWS);
        const float *xr[FUSED_ROWS];
        for (int r = 0; r < FUSED_ROWS; ++r) xr[r] = x + (j0 + (r < nr ? r : 0)) * c;
#if VPR_HAVE_VNNI
        if (!generic) {
            __m512 rb[FUSED_ROWS][2];
            __m512i ri[FUSED_ROWS][2];
            const __m512i lane = LANE_INDEX;
            for (int r = 0; r < FUSED_ROWS; ++r)
                for (int h = 0; h < 2; ++h) {
                    rb[r][h] = _mm512_set1_ps(-INFINITY);
                    ri[r][h] = _mm512_setzero_si512();
                }
            for (int64_t p = 0; p < panels; ++p) {
                const float *bp = qp + p * c * EXACT_PANEL;
                __m512 acc[FUSED_ROWS][2];
                for (int r = 0; r < FUSED_ROWS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
                for (int64_t k = 0; k < c; ++k) {
                    __m512 b0 = _mm512_load_ps(bp + k * EXACT_PANEL);
                    __m512 b1 = _mm512_load_ps(bp + k * EXACT_PANEL + 16);
                    /* keep b in registers: folded into each FMA it is loaded 4 times, and
                     * one 512-bit load per cycle then bounds the loop */
                    __asm__("" : "+v"(b0), "+v"(b1));
                    for (int r = 0; r < FUSED_ROWS; ++r) {
                        const __m512 xk = _mm512_set1_ps(xr[r][k]);
                        acc[r][0] = _mm512_fmadd_ps(xk, b0, acc[r][0]);
                        acc[r][1] = _mm512_fmadd_ps(xk, b1, acc[r][1]);
                    }
                }
                const int64_t left = n_q - p * EXACT_PANEL;
                const __mmask16 valid[2] = {tail_mask(left), tail_mask(left - 16)};
                for (int h = 0; h < 2; ++h) {
                    const __m512i index = _mm512_add_epi32(
                        lane, _mm512_set1_epi32((int32_t)(p * EXACT_PANEL + h * 16)));
                    /* rows: lane-wise running best over the panels */
                    for (int r = 0; r < FUSED_ROWS; ++r) {
                        const __mmask16 gt = _mm512_mask_cmp_ps_mask(valid[h], acc[r][h],
                                                                     rb[r][h], _CMP_GT_OQ);
                        rb[r][h] = _mm512_mask_mov_ps(rb[r][h], gt, acc[r][h]);
                        ri[r][h] = _mm512_mask_mov_epi32(ri[r][h], gt, index);
                    }
                    /* columns: the rows of this tile in order */
                    float *cbp = col_best + p * EXACT_PANEL + h * 16;
                    int32_t *cip = col_idx + p * EXACT_PANEL + h * 16;
                    __m512 cb = _mm512_loadu_ps(cbp);
                    __m512i ci = _mm512_loadu_si512((const void *)cip);
                    for (int r = 0; r < nr; ++r) {
                        const __mmask16 gt = _mm512_cmp_ps_mask(acc[r][h], cb, _CMP_GT_OQ);
                        cb = _mm512_mask_mov_ps(cb, gt, acc[r][h]);
                        ci = _mm512_mask_mov_epi32(ci, gt, _mm512_set1_epi32((int32_t)(j0 + r)));
                    }
                    _mm512_storeu_ps(cbp, cb);
                    _mm512_storeu_si512((void *)cip, ci);
                }
            }
            for (int r = 0; r < nr; ++r) {
                const __m512 m = _mm512_max_ps(rb[r][0], rb[r][1]);
                const float best = _mm512_reduce_max_ps(m);
                const __m512 bv = _mm512_set1_ps(best);
                const __mmask16 e0 = _mm512_cmp_ps_mask(rb[r][0], bv, _CMP_EQ_OQ);
                const __mmask16 e1 = _mm512_cmp_ps_mask(rb[r][1], bv, _CMP_EQ_OQ);
                const __m512i big = _mm512_set1_epi32(INT32_MAX);
                const __m512i i0 = _mm512_mask_mov_epi32(big, e0, ri[r][0]);
                const __m512i i1 = _mm512_mask_mov_epi32(big, e1, ri[r][1]);
                row_idx[j0 + r] = _mm512_reduce_min_epi32(_mm512_min_epi32(i0, i1));
            }
            continue;
        }
#endif
        for (int r = 0; r < nr; ++r) {
            float best = -INFINITY;
            int32_t bi = 0;
            for (int64_t i = 0; i < n_q; ++i) {
                const float *b = qp + (i / EXACT_PANEL) * c * EXACT_PANEL + i % EXACT_PANEL;
                float acc = 0.0f;
                for (int64_t k = 0; k < c; ++k) acc = fmaf(xr[r][k], b[k * EXACT_PANEL], acc);
                if (acc > best || i == 0) {
                    best = acc;
                    bi = (int32_t)i;
                }
                if (acc > col_best[i] || j0 + r == j_begin) {
                    col_best[i] = acc;
                    col_idx[i] = (int32_t)(j0 + r);
                }
            }
            row_idx[j0 + r] = bi;
        }
    }
}

int vpr_mnn_exact_counts(const int64_t *cand, const int64_t *n_x, int64_t n_cand,
                         const float *q_panels, int64_t n_q, int64_t c, int64_t splits,
                         int64_t *counts, int generic, int num_threads) {
    if (num_threads < 1) num_threads = 1;
    if (splits < 1) splits = 1;
    const int64_t n_q_pad = (n_q + EXACT_PANEL - 1) / EXACT_PANEL * EXACT_PANEL;
    int64_t max_x = 0;
    for (int64_t k = 0; k < n_cand; ++k) max_x = n_x[k] > max_x ? n_x[k] : max_x;
    const int64_t items = n_cand * splits;
    int32_t *row_idx = malloc((size_t)(n_cand * max_x + 1) * sizeof(int32_t));
    float *col_best = malloc((size_t)(items * n_q_pad + 1) * sizeof(float));
    int32_t *col_idx = malloc((size_t)(items * n_q_pad + 1) * sizeof(int32_t));
    if (!row_idx || !col_best || !col_idx) {
        free(row_idx);
        free(col_best);
        free(col_idx);
        return -1;
    }
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < items; ++w) {
            const int64_t k = w / splits, s = w % splits;
            const int64_t per = round_up((n_x[k] + splits - 1) / splits, FUSED_ROWS);
            const int64_t j0 = s * per < n_x[k] ? s * per : n_x[k];
            const int64_t j1 = j0 + per < n_x[k] ? j0 + per : n_x[k];
            mnn_exact_range((const float *)(intptr_t)cand[k], j0, j1, q_panels, n_q, c,
                            row_idx + k * max_x, col_best + w * n_q_pad, col_idx + w * n_q_pad,
                            generic);
        }
#pragma omp for schedule(static)
        for (int64_t k = 0; k < n_cand; ++k) {
            int64_t count = 0;
            for (int64_t i = 0; i < n_q && n_x[k] > 0; ++i) {
                float best = -INFINITY;
                int32_t bj = 0;
                int first = 1;
                for (int64_t s = 0; s < splits; ++s) {
                    const int64_t w = k * splits + s;
                    const int64_t per = round_up((n_x[k] + splits - 1) / splits, FUSED_ROWS);
                    if (s * per >= n_x[k]) break;          /* empty range */
                    const float v = col_best[w * n_q_pad + i];
                    if (first || v > best) {
                        best = v;
                        bj = col_idx[w * n_q_pad + i];
                        first = 0;
                    }
                }
                count += row_idx[k * max_x + bj] == (int32_t)i;
            }
            counts[k] = count;
        }
    }
    free(row_idx);
    free(col_best);
    free(col_idx);
    return 0;
}

/* One float32 dot product as one chain of fused multiply-adds in channel order from 0:
 * the value of the BLAS sgemm for these shapes (as vpr_exact_argmax; checked per shape by
 * the caller). */
static inline float dot_chain(const float *a, const float *b, int64_t c) {
    float acc = 0.0f;
    for (int64_t k = 0; k < c; ++k) acc = fmaf(a[k], b[k], acc);
    return acc;
}

/* out[i][j] = dot(a[i], b[j]) as one chain of fused multiply-adds in channel order from 0
 * (a: n_a x c, b: n_b x c, row-major): the definition the exact re-ranking paths rely on,
 * in plain scalar code, for the per-shape check against numpy's BLAS. */
void vpr_fma_matrix(const float *a, int64_t n_a, const float *b, int64_t n_b, int64_t c,
                    float *out, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < n_a; ++i)
        for (int64_t j = 0; j < n_b; ++j) {
            out[i * n_b + j] = dot_chain(a + i * c, b + j * c, c);
        }
}

/* ======================================================================================
 * Fused block steps (helper "vitfwd", issue 15 items 2-3): the residual, LayerScale,
 * LayerNorm and adapter passes of the int8 ViT blocks, each in one pass per row.  Every
 * function applies, per element and in the same order, the operations of the separate
 * kernels above and of the torch ops they replace (one rounding per operation), so the
 * fused blocks give the bits of the unfused chain; only the passes over memory, the
 * ctypes calls and the Python between them go away.
 * ==================================================================================== */

/* The residual step of a block, then the next LayerNorm + quantise, per row:
 *   y = dequantise(acc)                                  (acc * rs * cs + bias)
 *   y = y + skip        if skip   (a serial adapter's own skip connection)
 *   y = y * gamma       if gamma  (LayerScale; folded away in plain blocks)
 *   x = residual + y    written as float into acc
 * and q, q_scale = quantise(LayerNorm(x)) (tmp: num_threads * n floats): the next
 * LayerNorm always follows a block's residual step here (the block's last residual step
 * is vpr_dequantize_add or vpr_dequantize_pair_residual).  residual and skip are only
 * read. */
static inline float residual_layer_norm_quantize_row(
        int32_t *a, int64_t n, float rs, const float *col_scale, const float *bias,
        const float *s, const float *gamma, const float *r, const float *ln_weight,
        const float *ln_bias, float eps, float *tmp, int8_t *q) {
    dequantize_row(a, n, rs, col_scale, bias);
    float *x = (float *)a;
    if (s)
        for (int64_t j = 0; j < n; ++j) x[j] = x[j] + s[j];
    if (gamma)
        for (int64_t j = 0; j < n; ++j) x[j] = x[j] * gamma[j];
    for (int64_t j = 0; j < n; ++j) x[j] = r[j] + x[j];
    return layer_norm_quantize_row(x, n, ln_weight, ln_bias, eps, tmp, q);
}

void vpr_residual_layer_norm_quantize(int32_t *acc, int64_t m, int64_t n,
                                      const float *row_scale, const float *col_scale,
                                      const float *bias, const float *skip, const float *gamma,
                                      const float *residual, const float *ln_weight,
                                      const float *ln_bias, float eps, int8_t *q,
                                      float *q_scale, float *tmp, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < m; ++i)
        q_scale[i] = residual_layer_norm_quantize_row(
            acc + i * n, n, row_scale[i], col_scale, bias, skip ? skip + i * n : NULL, gamma,
            residual + i * n, ln_weight, ln_bias, eps, tmp + (int64_t)omp_get_thread_num() * n,
            q + i * n);
}

/* dequantise + bias, then (relu != 0) max(x, 0), then int8 codes per row; the float row
 * stays in acc (keep_float) for a later residual.  The adapters' fc1 -> ReLU -> fc2
 * step, and the attention proj -> (serial adapter input) step. */
static inline float dequantize_quantize_row(int32_t *a, int64_t n, float rs,
                                            const float *col_scale, const float *bias, int relu,
                                            int8_t *q) {
    dequantize_row(a, n, rs, col_scale, bias);
    float *h = (float *)a;
    if (relu)
        for (int64_t j = 0; j < n; ++j) h[j] = h[j] > 0.0f ? h[j] : 0.0f;
    return quantize_row(h, n, q);
}

void vpr_dequantize_quantize(int32_t *acc, int64_t m, int64_t n, const float *row_scale,
                             const float *col_scale, const float *bias, int relu, int8_t *q,
                             float *q_scale, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < m; ++i)
        q_scale[i] = dequantize_quantize_row(acc + i * n, n, row_scale[i], col_scale, bias,
                                             relu, q + i * n);
}

/* The end of a SelaVPR adapted block: out = residual + gamma * (deq(acc) + s * deq(side)),
 * deq(acc) = acc * rs * cs + bias (MLP fc2) and deq(side) with its own scales and bias
 * (the parallel adapter's fc2); written as float into acc.  s * deq(side) + deq(acc) is
 * one fused multiply-add, as torch's add(alpha=s) computes it. */
static inline void pair_residual_row(int32_t *a, int32_t *b, int64_t n, float rs,
                                     const float *col_scale, const float *bias, float side_rs,
                                     const float *side_col_scale, const float *side_bias,
                                     float s, const float *gamma, const float *r) {
    dequantize_row(a, n, rs, col_scale, bias);
    dequantize_row(b, n, side_rs, side_col_scale, side_bias);
    float *x = (float *)a;
    const float *y = (const float *)b;
    for (int64_t j = 0; j < n; ++j) {
        float v = fmaf(s, y[j], x[j]);
        if (gamma) v = v * gamma[j];
        x[j] = r[j] + v;
    }
}

void vpr_dequantize_pair_residual(int32_t *acc, int32_t *side, int64_t m, int64_t n,
                                  const float *row_scale, const float *col_scale,
                                  const float *bias, const float *side_row_scale,
                                  const float *side_col_scale, const float *side_bias,
                                  float s, const float *gamma, const float *residual,
                                  int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < m; ++i)
        pair_residual_row(acc + i * n, side + i * n, n, row_scale[i], col_scale, bias,
                          side_row_scale[i], side_col_scale, side_bias, s, gamma,
                          residual + i * n);
}

/* The heads of vpr_integer_attention_acc, called by every thread of a parallel region:
 * the image-heads are shared out (omp for, no barrier at its end: out is complete once
 * every thread has returned, so the caller waits for the team).  Returns nonzero on the
 * threads whose scratch memory could not be allocated (their heads are then missing
 * from out). */
static int attention_heads_team(const int32_t *acc, const float *row_scale,
                                const float *col_scale, const float *bias, int64_t b, int64_t n,
                                int64_t h, int64_t d, float scale, float *out, int generic) {
    int failed = 0;
    attention_scratch w = {0};
    /* V of every token (n x d), then the one Q and K row pair being coded (2 x d) */
    float *f = (float *)aligned_alloc(64, (size_t)round_up((n + 2) * d * 4, 64));
    if (scratch_alloc(&w, n, d) != 0 || !f) failed = 1;
#pragma omp for schedule(static) nowait
    for (int64_t item = 0; item < b * h; ++item) {
        if (!w.block || !f) continue;
        const int64_t img = item / h, head = item % h;
        const int64_t width = 3 * h * d;
        /* Q and K of a token are dequantised into two L1 rows and coded at once; V
         * (coded per channel, over all tokens) into f */
        float *qk = f + n * d;
        attention_prepare(&w);
        for (int64_t t = 0; t < n; ++t) {
            const int64_t row = img * n + t;
            const int32_t *src = acc + row * width + head * d;
            if (t + 16 < n)
                for (int part = 0; part < 3; ++part)
                    for (int64_t c = 0; c < d; c += 16)
                        __builtin_prefetch(src + 16 * width + part * h * d + c);
            const float rs = row_scale[row];
            for (int part = 0; part < 3; ++part) {
                const int64_t off = part * h * d + head * d;
                dequantize_to(src + part * h * d, part < 2 ? qk + part * d : f + t * d, d,
                              rs, col_scale + off, bias ? bias + off : NULL);
            }
            attention_qk_row(&w, t, qk, qk + d);
        }
        attention_quantize_v(&w, f, d, generic);
        attention_head(&w, scale, out + img * n * h * d + head * d, h * d, generic);
    }
    free(w.block);
    free(f);
    return failed;
}

/* The integer attention straight from the qkv layer's int32 sums: for each image-head,
 * its Q, K, V slices are dequantised (the operations of dequantize_row) into per-thread
 * contiguous float rows and go through the same quantisation and attention as
 * vpr_integer_attention, so the result has the same bits as vpr_dequantize followed by
 * vpr_integer_attention, without the pass that writes the whole (b n, 3 h d) float
 * matrix and the head-strided reads of it.  acc: (b, n, 3, h, d) int32; row_scale (b n);
 * col_scale, bias (3 h d; bias may be NULL).  With q (and q_scale): after every head is
 * done, the same threads quantise the output rows for the proj layer (the bits of
 * vpr_quantize_rows on out) in the same parallel region: one wake-up of the threads and
 * one call fewer per block.  Same return values. */
int vpr_integer_attention_acc(const int32_t *acc, const float *row_scale, const float *col_scale,
                              const float *bias, int64_t b, int64_t n, int64_t h, int64_t d,
                              float scale, float *out, int8_t *q, float *q_scale, int generic,
                              int num_threads) {
    if (n >= 32768) return -2;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        failed = attention_heads_team(acc, row_scale, col_scale, bias, b, n, h, d, scale, out,
                                      generic);
        if (q) {               /* the same for every thread: all or none meet the barrier */
#pragma omp barrier
            /* out is complete */
#pragma omp for schedule(static)
            for (int64_t i = 0; i < b * n; ++i)
                q_scale[i] = quantize_row(out + i * h * d, h * d, q + i * h * d);
        }
    }
    return failed ? -1 : 0;
}
/* ====================== end of the fused block steps (vitfwd) ====================== */

/* ------------------------------------------------------------------------------------
 * Exact mutual-nearest-neighbour count of one large map from int8 code similarities
 * (vpr_mnn_int8_count; issue 15: exact re-ranking at int8 speed).
 *
 * Codes: the candidate map as u8 = code + 128 (rows of c4 = c rounded up to 4, n_x
 * rounded up to 4 rows, padding byte 128 = code 0), the query as s8 codes in the layout
 * [n_q_pad/16][c4/4][16][4] (n_q_pad a multiple of 64, padding 0), q_zero[i] = 128 times
 * the sum of query point i's codes.  vpdpbusd (u8 x s8, int32 sums, no saturation) gives
 * sum (code_x + 128) code_q; minus q_zero[i] it is the exact code dot product I[j][i]
 * (|I| <= c 127^2: no overflow).  One scale per map, so I is comparable across points.
 *
 * The caller bounds, per candidate point j (row) and per query point i (column), twice
 * the distance between a code similarity and the float32 value of the official algorithm,
 * in code units and rounded up: row_slack[j], col_slack[i] (see rerank.py).  Then an entry
 * below (row maximum - row_slack) is strictly below the row's float32 maximum, and the
 * same for columns.  So:
 *   rows: after the 4 rows of a block are complete (all query points, the block kept in
 *     a 4 x n_q_pad buffer, never the whole matrix), the entries >= max - slack are the
 *     row's candidates; one candidate is the float32 argmax (strictly larger than every
 *     other value: no tie rule involved), several go to the exact step;
 *   columns: a running maximum per query point over the rows in order; every entry >=
 *     running max - slack at its time is appended (a final candidate always is: the
 *     running max only grows), and the list is filtered by the final maximum at the end.
 *     The tiles only mark the 16 query points that have such entries; the appends run
 *     after the block from its buffer (a data-dependent branch between the tiles' products
 *     flushes them where it mispredicts: 6% of the whole count);
 *   exact step: the candidates of ambiguous rows and columns get their float32 value, one
 *     chain of fused multiply-adds in channel order (the BLAS value, as in
 *     vpr_exact_argmax), and the largest wins, first index on ties (candidates are kept
 *     in index order, and every non-candidate is strictly smaller).
 * Second and third levels (resolve_sets): the candidates of ambiguous rows and columns get
 * their exact int16 code similarity (x16, q16: codes of norm < 46340, bounds row_slack16,
 * col_slack16), and those still within that bound of the best their float32 value.
 * out[0] = mutual pairs; out[1..5] = ambiguous rows, ambiguous columns, int16 products,
 * float32 products, column entries appended.  One thread (the caller runs one candidate
 * per thread).  Returns 0; 1 when the candidates exceed max_pairs (row candidates or
 * final column candidates; 4 max_pairs running column entries): near-duplicate maps,
 * where the caller's fused float32 path is cheaper; -1 when scratch memory could not be
 * allocated.
 * ------------------------------------------------------------------------------------ */

typedef struct {            /* a growing int32 array */
    int32_t *v;
    int64_t n, cap;
} i8_list;

static int i8_reserve(i8_list *l, int64_t more) {
    if (l->n + more <= l->cap) return 0;
    int64_t cap = l->cap ? l->cap : 4096;
    while (cap < l->n + more) cap *= 2;
    int32_t *v = realloc(l->v, (size_t)cap * sizeof(int32_t));
    if (!v) return -1;
    l->v = v;
    l->cap = cap;
    return 0;
}

typedef struct {            /* the column side: running maxima and near entries */
    int32_t *max;           /* n_q_pad */
    const int32_t *slack;   /* n_q */
    i8_list i, j, v;        /* appended entries (query point, candidate point, value) */
} i8_cols;

static int i8_col_push(i8_cols *cs, int32_t i, int32_t j, int32_t v) {
    if (i8_reserve(&cs->i, 1) || i8_reserve(&cs->j, 1) || i8_reserve(&cs->v, 1)) return -1;
    cs->i.v[cs->i.n++] = i;
    cs->j.v[cs->j.n++] = j;
    cs->v.v[cs->v.n++] = v;
    return 0;
}

#if VPR_HAVE_VNNI
/* The epilogue of i8_tile: rows' lane maxima, the block buffer, the column step. */
static inline __attribute__((always_inline)) void i8_epilogue(
        const __m512i acc[4][4], const int nr, int32_t *out, int64_t out_stride, int64_t j0,
        int64_t i0, int valid, int32_t *gmax, int64_t gmax_stride, i8_cols *cs,
        uint16_t *hits) {
    __mmask16 mask[4];
    for (int l = 0; l < 4; ++l) mask[l] = tail_mask(valid - l * 16);
    /* the block buffer and the rows' lane maxima first, so that few registers stay live */
    for (int r = 0; r < 4; ++r) {
        __m512i gm = _mm512_set1_epi32(INT32_MIN);
        for (int l = 0; l < 4; ++l) {
            _mm512_storeu_si512((void *)(out + r * out_stride + l * 16), acc[r][l]);
            gm = _mm512_mask_max_epi32(gm, mask[l], gm, acc[r][l]);
        }
        _mm512_storeu_si512((void *)(gmax + r * gmax_stride), gm);
    }
    for (int l = 0; l < 4; ++l) {
        const __mmask16 m = mask[l];
        /* padding rows (r >= nr) hold zeros: only the real rows count */
        __m512i t = acc[0][l];
        for (int r = 1; r < nr; ++r) t = _mm512_max_epi32(t, acc[r][l]);
        /* columns: the running maximum after these rows; the lanes with an entry within
         * the slack of it are marked, and appended after the block (i8_col_appends; a
         * branch here would flush the next tile's products where it mispredicts) */
        const int64_t i = i0 + l * 16;
        const __m512i cm = _mm512_max_epi32(_mm512_loadu_si512((const void *)(cs->max + i)), t);
        _mm512_storeu_si512((void *)(cs->max + i), cm);
        const __m512i sl = _mm512_maskz_loadu_epi32(m, cs->slack + i);
        /* max - v <= slack for v = the tile's best (no overflow: code sums) */
        hits[l] = _mm512_mask_cmple_epi32_mask(m, _mm512_sub_epi32(cm, t), sl);
    }
}

/* The column step of a complete block of nr rows (j0..): for every 16 query points that
 * i8_epilogue marked (hits, 4 per group), the rows' entries within the slack of the
 * running maximum are appended (compressed in registers, stored as whole vectors: a
 * compress straight to memory is microcoded on Zen 4). */
static int i8_col_appends(const int32_t *blk, int64_t n_q_pad, int64_t n_q,
                          const uint16_t *hits, int nr, int64_t j0, i8_cols *cs) {
    const __m512i lane0 = LANE_INDEX;
    const int64_t vecs = n_q_pad / 16;
    for (int64_t e0 = 0; e0 < vecs; e0 += 32) {
        const __mmask32 real = vecs - e0 >= 32 ? (__mmask32)0xFFFFFFFFu
                                               : (__mmask32)((1u << (vecs - e0)) - 1u);
        const __m512i h = _mm512_maskz_loadu_epi16(real, hits + e0);
        uint32_t marked = _mm512_test_epi16_mask(h, h);
        while (marked) {
            const int64_t i = (e0 + __builtin_ctz(marked)) * 16;
            marked &= marked - 1;
            if (i8_reserve(&cs->i, 64) || i8_reserve(&cs->j, 64) || i8_reserve(&cs->v, 64))
                return -1;
            const __mmask16 m = tail_mask(n_q - i);
            const __m512i cm = _mm512_loadu_si512((const void *)(cs->max + i));
            const __m512i sl = _mm512_maskz_loadu_epi32(m, cs->slack + i);
            const __m512i lane = _mm512_add_epi32(_mm512_set1_epi32((int32_t)i), lane0);
            for (int r = 0; r < nr; ++r) {
                const __m512i v = _mm512_loadu_si512((const void *)(blk + r * n_q_pad + i));
                const __mmask16 hit = _mm512_mask_cmple_epi32_mask(m, _mm512_sub_epi32(cm, v), sl);
                const int64_t n = cs->i.n;
                _mm512_storeu_si512((void *)(cs->i.v + n), _mm512_maskz_compress_epi32(hit, lane));
                _mm512_storeu_si512((void *)(cs->v.v + n), _mm512_maskz_compress_epi32(hit, v));
                _mm512_storeu_si512((void *)(cs->j.v + n), _mm512_set1_epi32((int32_t)(j0 + r)));
                const int k = __builtin_popcount(hit);
                cs->i.n += k;
                cs->j.n += k;
                cs->v.n += k;
            }
        }
    }
    return 0;
}
#endif

/* 4 candidate rows (j0.., nr of them real) x 64 query points (i0.., valid of them real) of
 * exact code dot products into out[r][0..63]; per row, 16 lane maxima over these query
 * points into gmax[r * gmax_stride + 0..15] (INT32_MIN where none); and the column step:
 * the running maxima, and hits[0..3] marking the query points with near entries (the
 * vector path; i8_col_appends appends them) or the entries appended here (generic).
 * Inlined into the loop over groups: 7% faster than a call per tile (same run). */
static inline __attribute__((always_inline)) int i8_tile(
        const uint8_t *x, int64_t c4, const int8_t *qg, const int32_t *zero, int32_t *out,
        int64_t out_stride, int nr, int64_t j0, int64_t i0, int valid, int32_t *gmax,
        int64_t gmax_stride, i8_cols *cs, uint16_t *hits, int generic) {
#if VPR_HAVE_VNNI
    if (!generic) {
        /* the accumulators (VNNI_TILE_4X4) start at -zero (the u8 codes' zero point), so
         * they end as the code sums */
        const __m512i z0 = _mm512_sub_epi32(_mm512_setzero_si512(),
                                            _mm512_loadu_si512((const void *)zero));
        const __m512i z1 = _mm512_sub_epi32(_mm512_setzero_si512(),
                                            _mm512_loadu_si512((const void *)(zero + 16)));
        const __m512i z2 = _mm512_sub_epi32(_mm512_setzero_si512(),
                                            _mm512_loadu_si512((const void *)(zero + 32)));
        const __m512i z3 = _mm512_sub_epi32(_mm512_setzero_si512(),
                                            _mm512_loadu_si512((const void *)(zero + 48)));
        __m512i a00 = z0, a01 = z1, a02 = z2, a03 = z3, a10 = z0, a11 = z1, a12 = z2, a13 = z3;
        __m512i a20 = z0, a21 = z1, a22 = z2, a23 = z3, a30 = z0, a31 = z1, a32 = z2, a33 = z3;
        VNNI_TILE_4X4("vpdpbusd", x, c4, 4, qg, c4 / 4, 0);
        const __m512i acc[4][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13},
                                   {a20, a21, a22, a23}, {a30, a31, a32, a33}};
        /* a constant row count keeps the accumulators in registers */
        if (nr == 4)
            i8_epilogue(acc, 4, out, out_stride, j0, i0, valid, gmax, gmax_stride, cs, hits);
        else
            i8_epilogue(acc, nr, out, out_stride, j0, i0, valid, gmax, gmax_stride, cs, hits);
        return 0;
    }
#endif
    const int64_t groups = c4 / 4, block = groups * 64;
    for (int r = 0; r < 4; ++r)
        for (int e = 0; e < MNN_GROUP; ++e) {
            const int8_t *qb = qg + (e / 16) * block + (e % 16) * 4;
            int32_t acc = 0;
            for (int64_t g = 0; g < groups; ++g)
                for (int b = 0; b < 4; ++b)
                    acc += (int32_t)x[r * c4 + 4 * g + b] * (int32_t)qb[g * 64 + b];
            out[r * out_stride + e] = acc - zero[e];
        }
    for (int r = 0; r < 4; ++r)
        for (int e = 0; e < 16; ++e) gmax[r * gmax_stride + e] = INT32_MIN;
    for (int e = 0; e < valid; ++e) {
        const int64_t i = i0 + e;
        for (int r = 0; r < nr; ++r) {
            const int32_t v = out[r * out_stride + e];
            gmax[r * gmax_stride] = v > gmax[r * gmax_stride] ? v : gmax[r * gmax_stride];
            cs->max[i] = v > cs->max[i] ? v : cs->max[i];
            if ((int64_t)cs->max[i] - v <= cs->slack[i] &&
                i8_col_push(cs, (int32_t)i, (int32_t)(j0 + r), v))
                return -1;
        }
    }
    return 0;
}

/* The candidates of one complete row v[0..n_q) (entries >= best - slack) into rows
 * (in index order), reading only the groups of 64 whose lane maxima gmax[g][0..15] reach
 * the threshold; returns their number, or -1 when memory ran out. */
static int64_t i8_row_candidates(const int32_t *v, int64_t n_q, const int32_t *gmax,
                                 int64_t groups, int32_t slack, i8_list *rows, int generic) {
    int32_t best = INT32_MIN;
#if VPR_HAVE_VNNI
    if (!generic) {
        __m512i m = _mm512_set1_epi32(INT32_MIN);
        for (int64_t g = 0; g < groups; ++g)
            m = _mm512_max_epi32(m, _mm512_loadu_si512((const void *)(gmax + g * 16)));
        best = _mm512_reduce_max_epi32(m);
    } else
#endif
        for (int64_t e = 0; e < groups * 16; ++e) best = gmax[e] > best ? gmax[e] : best;
    const int64_t thr64 = (int64_t)best - slack;
    const int32_t thr = thr64 < INT32_MIN ? INT32_MIN : (int32_t)thr64;
    if (i8_reserve(rows, n_q + 16)) return -1;      /* + whole-vector stores */
    int32_t *o = rows->v + rows->n;
    int64_t n = 0;
#if VPR_HAVE_VNNI
    if (!generic) {
        /* without branches on the data: a bitmap of the groups that reach the threshold,
         * then each of their vectors compressed to its indices in registers (in index
         * order) and stored whole */
        const __m512i t = _mm512_set1_epi32(thr);
        const __m512i lane0 = LANE_INDEX;
        for (int64_t g0 = 0; g0 < groups; g0 += 64) {
            const int64_t g_end = groups - g0 < 64 ? groups : g0 + 64;
            uint64_t reach = 0;
            for (int64_t g = g0; g < g_end; ++g)
                reach |= (uint64_t)(_mm512_cmpge_epi32_mask(
                             _mm512_loadu_si512((const void *)(gmax + g * 16)), t) != 0)
                         << (g - g0);
            while (reach) {
                const int64_t base = (g0 + __builtin_ctzll(reach)) * MNN_GROUP;
                reach &= reach - 1;
                for (int l = 0; l < MNN_GROUP / 16; ++l) {
                    const int64_t i = base + 16 * l;
                    const __mmask16 real = tail_mask(n_q - i);   /* padding points: out */
                    const __mmask16 hit = _mm512_mask_cmpge_epi32_mask(
                        real, _mm512_loadu_si512((const void *)(v + i)), t);
                    _mm512_storeu_si512((void *)(o + n), _mm512_maskz_compress_epi32(
                        hit, _mm512_add_epi32(_mm512_set1_epi32((int32_t)i), lane0)));
                    n += __builtin_popcount(hit);
                }
            }
        }
        rows->n += n;
        return n;
    }
#endif
    for (int64_t g = 0; g < groups; ++g) {
        int reach = 0;
        for (int e = 0; e < 16; ++e) reach |= gmax[g * 16 + e] >= thr;
        if (!reach) continue;
        const int64_t end = (g + 1) * MNN_GROUP < n_q ? (g + 1) * MNN_GROUP : n_q;
        for (int64_t i = g * MNN_GROUP; i < end; ++i)
            if (v[i] >= thr) o[n++] = (int32_t)i;
    }
    rows->n += n;
    return n;
}

/* The exact int32 dot product of two int16 code vectors of c_pad (even) channels whose
 * norms keep every partial sum inside int32 (so wrap-around never happens in effect). */
static inline int32_t dot16(const int16_t *a, const int16_t *b, int64_t c_pad, int generic) {
    int64_t k = 0;
    int32_t s = 0;
#if VPR_HAVE_VNNI
    if (!generic) {
        __m512i acc = _mm512_setzero_si512();
        for (; k + 32 <= c_pad; k += 32)
            acc = _mm512_dpwssd_epi32(acc, _mm512_loadu_si512((const void *)(a + k)),
                                      _mm512_loadu_si512((const void *)(b + k)));
        s = (int32_t)((uint32_t)_mm512_reduce_add_epi32(acc));
    }
#endif
    for (; k < c_pad; ++k) s = (int32_t)((uint32_t)s + (uint32_t)((int32_t)a[k] * b[k]));
    return s;
}


/* Resolve n_sets candidate sets: set s belongs to point owner[s] of the "own" map, its
 * candidates are the points idx[start[s]..start[s+1]) of the "other" map in ascending
 * order, one of which has the largest float32 similarity and every non-candidate is
 * strictly below it.  Level 2: the exact int16 code similarities; candidates below the
 * best by more than slack16[owner] are strictly below the float32 maximum too.  Level 3:
 * the float32 values of the rest, first index on ties.  arg[s] = the argmax;
 * stats[0] += int16 products, stats[1] += float32 products.  Returns 0 or -1 (memory). */
static int resolve_sets(const int16_t *own16, const int16_t *other16, int64_t c_pad,
                        const float *own, const float *other, int64_t c,
                        const int32_t *owner, const int64_t *start, const int32_t *idx,
                        int64_t n_sets, const int32_t *order, const int64_t *slack16,
                        int32_t *arg, int64_t *stats, int generic) {
    int64_t most = 1;
    for (int64_t s = 0; s < n_sets; ++s)
        most = start[s + 1] - start[s] > most ? start[s + 1] - start[s] : most;
    int32_t *w = malloc((size_t)most * sizeof(int32_t));
    if (!w) return -1;
    for (int64_t u = 0; u < n_sets; ++u) {
        const int64_t s = order ? order[u] : u;
        const int64_t o = owner[s], b = start[s], n = start[s + 1] - b;
        const int16_t *a16 = own16 + o * c_pad;
        int32_t best = INT32_MIN;
        for (int64_t t = 0; t < n; ++t) {
            w[t] = dot16(a16, other16 + (int64_t)idx[b + t] * c_pad, c_pad, generic);
            best = w[t] > best ? w[t] : best;
        }
        stats[0] += n;
        const int64_t thr = (int64_t)best - slack16[o];
        int64_t kept = 0, only = -1;
        for (int64_t t = 0; t < n; ++t)
            if ((int64_t)w[t] >= thr) {
                ++kept;
                only = idx[b + t];
            }
        if (kept == 1) {
            arg[s] = (int32_t)only;
            continue;
        }
        float bv = -INFINITY;
        int first = 1;
        for (int64_t t = 0; t < n; ++t) {
            if ((int64_t)w[t] < thr) continue;
            const int32_t k = idx[b + t];
            const float v = dot_chain(own + o * c, other + (int64_t)k * c, c);
            ++stats[1];
            if (first || v > bv || (v == bv && k < arg[s])) {    /* first index on ties */
                bv = v;
                arg[s] = k;
                first = 0;
            }
        }
    }
    free(w);
    return 0;
}

int vpr_mnn_int8_count(const uint8_t *x_codes, const int16_t *x16, const float *x, int64_t n_x,
                       const int8_t *q_codes, const int32_t *q_zero, const int16_t *q16,
                       const float *q, int64_t n_q, int64_t c, int64_t c4, int64_t c_pad,
                       const int32_t *row_slack, const int32_t *col_slack,
                       const int64_t *row_slack16, const int64_t *col_slack16,
                       int64_t max_pairs, int64_t *out, int generic) {
    const int64_t n_q_pad = round_up(n_q, MNN_GROUP), groups = n_q_pad / MNN_GROUP;
    const int64_t group_bytes = MNN_GROUP * c4;
    int32_t *blk = aligned_alloc(64, (size_t)4 * n_q_pad * sizeof(int32_t));
    int32_t *row_arg = malloc((size_t)(n_x + 1) * sizeof(int32_t));
    int32_t *col_arg = malloc((size_t)(n_q + 1) * sizeof(int32_t));
    i8_cols cs = {malloc((size_t)n_q_pad * sizeof(int32_t)), col_slack, {0}, {0}, {0}};
    i8_list rows = {0}, amb = {0};          /* ambiguous rows' candidates; their rows */
    int64_t *amb_start = malloc((size_t)(n_x + 1) * sizeof(int64_t));
    int32_t *gmax = malloc((size_t)4 * groups * 16 * sizeof(int32_t));
    uint16_t *hits = calloc((size_t)groups * 4, sizeof(uint16_t));   /* read masked */
    int64_t stats[2] = {0, 0};
    int too_many = 0;
    int failed = !blk || !row_arg || !col_arg || !cs.max || !amb_start || !gmax || !hits;
    for (int64_t i = 0; i < n_q_pad && !failed; ++i) cs.max[i] = INT32_MIN;
    /* blocks of 4 rows in bit-reversed order: the first blocks sample the whole map, so
     * the running column maxima are near their final values early and few entries are
     * appended on the way (on smooth maps, 3x fewer than in row order) */
    const int64_t blocks = (n_x + 3) / 4;
    int bits = 0;
    while (((int64_t)1 << bits) < blocks) ++bits;
    for (int64_t seq = 0; seq < ((int64_t)1 << bits) && !failed; ++seq) {
        int64_t blk_index = 0;
        for (int bit = 0; bit < bits; ++bit) blk_index |= ((seq >> bit) & 1) << (bits - 1 - bit);
        if (blk_index >= blocks) continue;
        const int64_t j0 = blk_index * 4;
        const int nr = (int)(n_x - j0 < 4 ? n_x - j0 : 4);
        for (int64_t gi = 0; gi < groups && !failed; ++gi) {
            const int64_t i0 = gi * MNN_GROUP;
            failed = i8_tile(x_codes + j0 * c4, c4, q_codes + gi * group_bytes,
                             q_zero + i0, blk + i0, n_q_pad, nr, j0, i0,
                             (int)(n_q - i0 < MNN_GROUP ? n_q - i0 : MNN_GROUP), gmax + gi * 16,
                             groups * 16, &cs, hits + gi * 4, generic);
        }
#if VPR_HAVE_VNNI
        if (!generic && !failed) failed = i8_col_appends(blk, n_q_pad, n_q, hits, nr, j0, &cs);
#endif
        for (int r = 0; r < nr && !failed; ++r) {
            const int64_t before = rows.n;
            const int64_t n = i8_row_candidates(blk + r * n_q_pad, n_q, gmax + r * groups * 16,
                                                groups, row_slack[j0 + r], &rows, generic);
            if (n < 0) {
                failed = 1;
            } else if (n == 1) {                    /* the one candidate: the argmax */
                row_arg[j0 + r] = rows.v[before];
                rows.n = before;
            } else if (i8_reserve(&amb, 1)) {
                failed = 1;
            } else {
                amb_start[amb.n] = before;
                amb.v[amb.n++] = (int32_t)(j0 + r);
            }
        }
        if (rows.n > max_pairs || cs.j.n > 4 * max_pairs) too_many = failed = 1;
    }
    int64_t count = 0, n_amb_cols = 0;
    int64_t *cstart = NULL;
    int32_t *cj = NULL, *arg = NULL;
    if (!failed) {          /* the ambiguous rows: candidate points against query points */
        amb_start[amb.n] = rows.n;
        arg = malloc((size_t)(amb.n > n_q ? amb.n : n_q) * sizeof(int32_t) + 4);
        /* in row order: neighbouring rows' candidates are near each other */
        int32_t *order = malloc((size_t)(amb.n + 1) * sizeof(int32_t));
        int32_t *set_of = malloc((size_t)(n_x + 1) * sizeof(int32_t));
        failed = !arg || !order || !set_of;
        if (!failed) {
            for (int64_t j = 0; j < n_x; ++j) set_of[j] = -1;
            for (int64_t s = 0; s < amb.n; ++s) set_of[amb.v[s]] = (int32_t)s;
            int64_t u = 0;
            for (int64_t j = 0; j < n_x; ++j)
                if (set_of[j] >= 0) order[u++] = set_of[j];
            failed = resolve_sets(x16, q16, c_pad, x, q, c, amb.v, amb_start, rows.v, amb.n,
                                  order, row_slack16, arg, stats, generic);
        }
        free(order);
        free(set_of);
        for (int64_t s = 0; s < amb.n && !failed; ++s) row_arg[amb.v[s]] = arg[s];
    }
    if (!failed) {
        /* columns: keep the final candidates, bucket them by query point (row order kept) */
        cstart = calloc((size_t)(n_q + 1), sizeof(int64_t));
        failed = !cstart;
        int64_t kept = 0;
        for (int64_t t = 0; t < cs.i.n && !failed; ++t) {
            const int32_t i = cs.i.v[t];
            if ((int64_t)cs.v.v[t] >= (int64_t)cs.max[i] - col_slack[i]) {
                cs.i.v[kept] = i;
                cs.j.v[kept++] = cs.j.v[t];
                ++cstart[i + 1];
            }
        }
        int64_t *fill = NULL;
        if (kept > max_pairs) too_many = failed = 1;
        if (!failed) {
            for (int64_t i = 0; i < n_q; ++i) cstart[i + 1] += cstart[i];
            cj = malloc((size_t)(kept + 1) * sizeof(int32_t));
            fill = malloc((size_t)(n_q + 1) * sizeof(int64_t));
            failed = !cj || !fill;
        }
        if (!failed) {
            memcpy(fill, cstart, (size_t)n_q * sizeof(int64_t));
            for (int64_t t = 0; t < kept; ++t) cj[fill[cs.i.v[t]]++] = cs.j.v[t];
            /* one candidate: the argmax; the others compacted into sets (owners in cs.i) */
            int64_t w = 0, n_sets = 0;
            for (int64_t i = 0; i < n_q; ++i) {
                const int64_t b = cstart[i], e = cstart[i + 1];
                if (e - b == 1) {
                    col_arg[i] = cj[b];
                    continue;
                }
                fill[n_sets] = w;
                cs.i.v[n_sets++] = (int32_t)i;
                for (int64_t t = b; t < e; ++t) cj[w++] = cj[t];
            }
            fill[n_sets] = w;
            n_amb_cols = n_sets;
            failed = resolve_sets(q16, x16, c_pad, q, x, c, cs.i.v, fill, cj, n_sets, NULL,
                                  col_slack16, arg, stats, generic);
            for (int64_t s = 0; s < n_sets && !failed; ++s) col_arg[cs.i.v[s]] = arg[s];
        }
        free(fill);
    }
    if (!failed)
        for (int64_t i = 0; i < n_q; ++i) count += row_arg[col_arg[i]] == (int32_t)i;
    out[0] = count;
    out[1] = amb.n;
    out[2] = n_amb_cols;
    out[3] = stats[0];
    out[4] = stats[1];
    out[5] = cs.j.n;
    free(arg);
    free(cstart);
    free(cj);
    free(blk);
    free(row_arg);
    free(col_arg);
    free(cs.max);
    free(cs.i.v);
    free(cs.j.v);
    free(cs.v.v);
    free(rows.v);
    free(amb.v);
    free(amb_start);
    free(gmax);
    free(hits);
    return too_many ? 1 : failed ? -1 : 0;
}

int vpr_have_vnni(void) { return VPR_HAVE_VNNI; }

/* Both code sets of x (n x c float32) for vpr_mnn_int8_count, with one scale each:
 * int8 codes rint(x / s8) (clamped to +-127) + offset8 (128: the u8 side of vpdpbusd,
 * 0: s8) in rows of c4 (padding code 0), int16 codes rint(x / s16) in rows of c_pad
 * (padding 0; the caller's s16 keeps every code vector's norm below 46340), and per point
 * in double: out[j][0..4] = |x - s8 code8|, |s8 code8|, |x - s16 code16|, |s16 code16|, |x|.
 * The products s code are exact in double (a float times an integer below 2^16) and each
 * difference is rounded once, so the caller's margin covers the double rounding. */
void vpr_codes_8_16(const float *x, int64_t n, int64_t c, int64_t c4, int64_t c_pad, float s8,
                    float s16, int offset8, uint8_t *codes8, int16_t *codes16, double *out,
                    int generic) {
    const float inv8 = 1.0f / s8, inv16 = 1.0f / s16;
    for (int64_t j = 0; j < n; ++j) {
        const float *p = x + j * c;
        uint8_t *o8 = codes8 + j * c4;
        int16_t *o16 = codes16 + j * c_pad;
        double e8 = 0.0, h8 = 0.0, e16 = 0.0, h16 = 0.0, nn = 0.0;
        int64_t k = 0;
#if VPR_HAVE_VNNI
        if (!generic) {
            __m512d ve8 = _mm512_setzero_pd(), vh8 = ve8, ve16 = ve8, vh16 = ve8, vn = ve8;
            const __m512d d8 = _mm512_set1_pd((double)s8), d16 = _mm512_set1_pd((double)s16);
            const __m512 lo8 = _mm512_set1_ps(-127.0f), hi8 = _mm512_set1_ps(127.0f);
            const __m512 lo16 = _mm512_set1_ps(-32767.0f), hi16 = _mm512_set1_ps(32767.0f);
            const __m512i off = _mm512_set1_epi32(offset8);
            for (; k + 16 <= c; k += 16) {
                const __m512 v = _mm512_loadu_ps(p + k);
                const __m512 c8 = _mm512_min_ps(hi8, _mm512_max_ps(lo8, _mm512_roundscale_ps(
                    _mm512_mul_ps(v, _mm512_set1_ps(inv8)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
                const __m512 c16 = _mm512_min_ps(hi16, _mm512_max_ps(lo16, _mm512_roundscale_ps(
                    _mm512_mul_ps(v, _mm512_set1_ps(inv16)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
                _mm_storeu_si128((__m128i *)(o8 + k),
                                 _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(c8), off)));
                _mm256_storeu_si256((__m256i *)(o16 + k), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(c16)));
                for (int h = 0; h < 2; ++h) {
                    const __m512d xv = _mm512_cvtps_pd(h ? _mm512_extractf32x8_ps(v, 1)
                                                         : _mm512_castps512_ps256(v));
                    const __m512d r8 = _mm512_mul_pd(d8, _mm512_cvtps_pd(
                        h ? _mm512_extractf32x8_ps(c8, 1) : _mm512_castps512_ps256(c8)));
                    const __m512d r16 = _mm512_mul_pd(d16, _mm512_cvtps_pd(
                        h ? _mm512_extractf32x8_ps(c16, 1) : _mm512_castps512_ps256(c16)));
                    const __m512d q8 = _mm512_sub_pd(xv, r8), q16 = _mm512_sub_pd(xv, r16);
                    ve8 = _mm512_fmadd_pd(q8, q8, ve8);
                    vh8 = _mm512_fmadd_pd(r8, r8, vh8);
                    ve16 = _mm512_fmadd_pd(q16, q16, ve16);
                    vh16 = _mm512_fmadd_pd(r16, r16, vh16);
                    vn = _mm512_fmadd_pd(xv, xv, vn);
                }
            }
            e8 = _mm512_reduce_add_pd(ve8);
            h8 = _mm512_reduce_add_pd(vh8);
            e16 = _mm512_reduce_add_pd(ve16);
            h16 = _mm512_reduce_add_pd(vh16);
            nn = _mm512_reduce_add_pd(vn);
        }
#endif
        for (; k < c; ++k) {
            const double v = p[k];
            float f8 = rintf(p[k] * inv8), f16 = rintf(p[k] * inv16);
            f8 = f8 > 127.0f ? 127.0f : f8 < -127.0f ? -127.0f : f8;
            f16 = f16 > 32767.0f ? 32767.0f : f16 < -32767.0f ? -32767.0f : f16;
            o8[k] = (uint8_t)((int)f8 + offset8);
            o16[k] = (int16_t)f16;
            const double r8 = (double)s8 * f8, r16 = (double)s16 * f16;
            e8 += (v - r8) * (v - r8);
            h8 += r8 * r8;
            e16 += (v - r16) * (v - r16);
            h16 += r16 * r16;
            nn += v * v;
        }
        for (int64_t t = c; t < c4; ++t) o8[t] = (uint8_t)offset8;
        for (int64_t t = c; t < c_pad; ++t) o16[t] = 0;
        double *r = out + j * 5;
        r[0] = sqrt(e8);
        r[1] = sqrt(h8);
        r[2] = sqrt(e16);
        r[3] = sqrt(h16);
        r[4] = sqrt(nn);
    }
}

/* The int8 path's bounds (rerank.py's _slacks, evaluated here in the same float64
 * operations and order, so the values are the same): from the per-point terms of
 * vpr_codes_8_16 of the candidate (xo, n_x x 5) and of the query (qo, n_q x 5), each
 * scaled by margin (and the errors raised by 1e-12 |x|), twice the largest distance
 * between a code similarity and the float32 value per row (candidate point) and per
 * column (query point), in code units, rounded up, plus one, at most INT32_MAX / 4 or
 * INT64_MAX / 4:
 *   rows  2 (e_x |q|max + |x^| max e_q + gamma |x| |q|max) / (s_x s_q)
 *   cols  2 (max e_x |q| + max |x^| e_q + gamma |x|max |q|) / (s_x s_q)
 * for the int8 codes (row8, col8) and the int16 codes (row16, col16). */
static inline double slack_of(double bound, double scale, double margin, double top) {
    const double v = ceil(2.0 * bound / scale * margin) + 1.0;
    return v < top ? v : top;
}

/* One point's terms of vpr_codes_8_16 (o[0..4]) scaled as rerank._Codes8 does:
 * v = norm, error 8, code norm 8, error 16, code norm 16 (the errors raised by
 * 1e-12 |x|: their float64 rounding is relative to |x|). */
static inline void scaled_terms(const double *o, double margin, double v[5]) {
    v[0] = o[4] * margin;
    v[1] = o[0] * margin + 1e-12 * v[0];
    v[2] = o[1] * margin;
    v[3] = o[2] * margin + 1e-12 * v[0];
    v[4] = o[3] * margin;
}

/* The largest of each scaled term over n points into m[0..4]. */
static void side_maxima(const double *terms, int64_t n, double margin, double m[5]) {
    for (int t = 0; t < 5; ++t) m[t] = 0.0;
    for (int64_t j = 0; j < n; ++j) {
        double v[5];
        scaled_terms(terms + 5 * j, margin, v);
        for (int t = 0; t < 5; ++t) m[t] = v[t] > m[t] ? v[t] : m[t];
    }
}

void vpr_int8_slacks(const double *xo, int64_t n_x, const double *qo, int64_t n_q,
                     double x_s8, double q_s8, double x_s16, double q_s16, double gamma,
                     double margin, int32_t *row8, int32_t *col8, int64_t *row16,
                     int64_t *col16) {
    /* per side, the largest of: norm, error 8, code norm 8, error 16, code norm 16 */
    double q_max[5], x_max[5];
    side_maxima(qo, n_q, margin, q_max);
    side_maxima(xo, n_x, margin, x_max);
    const double qn = q_max[0], qe8 = q_max[1], qe16 = q_max[3];
    const double xn = x_max[0], xe8 = x_max[1], xh8 = x_max[2], xe16 = x_max[3], xh16 = x_max[4];
    const double scale8 = x_s8 * q_s8, scale16 = x_s16 * q_s16;
    const double top32 = (double)(INT32_MAX / 4), top64 = (double)(INT64_MAX / 4);
    for (int64_t j = 0; j < n_x; ++j) {
        double v[5];                  /* norm, e8, hat8, e16, hat16 */
        scaled_terms(xo + 5 * j, margin, v);
        row8[j] = (int32_t)slack_of(v[1] * qn + v[2] * qe8 + gamma * v[0] * qn, scale8, margin,
                                    top32);
        row16[j] = (int64_t)slack_of(v[3] * qn + v[4] * qe16 + gamma * v[0] * qn, scale16,
                                     margin, top64);
    }
    for (int64_t i = 0; i < n_q; ++i) {
        double v[5];
        scaled_terms(qo + 5 * i, margin, v);
        col8[i] = (int32_t)slack_of(xe8 * v[0] + xh8 * v[1] + gamma * xn * v[0], scale8, margin,
                                    top32);
        col16[i] = (int64_t)slack_of(xe16 * v[0] + xh16 * v[3] + gamma * xn * v[0], scale16,
                                     margin, top64);
    }
}

/* float16 -> float32 (exact: every half is a float; signalling NaNs come out quiet, and
 * non-finite maps take the plain path anyway), n values: a stored candidate map
 * (local storage float16) before the re-ranking; 6-10x numpy's and torch's conversion
 * here, which took 0.6-0.9 ms of a 3721 x 128 map. */
void vpr_half_to_float(const uint16_t *h, int64_t n, float *out) {
#if VPR_HAVE_VNNI
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        _mm512_mask_storeu_ps(out + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, h + i)));
    }
#else
    (void)h; (void)n; (void)out;     /* the caller widens with numpy without the vector ISA */
#endif
}

/* The largest |x| of n floats (row_absmax: NaN or infinity anywhere give a non-finite
 * result): the finiteness check and the code scale of a map in one vectorised pass. */
float vpr_absmax(const float *x, int64_t n) { return row_absmax(x, n); }


/* ------------------------------------------------------------------------------------
 * The int8 matmul of the int8 models (issue 15): c[m][n] = sum_k a[m][k] w[n][k], exact
 * int32, the product torch._int_mm gives.  a: s8 rows of k (k % 4 == 0); w: the VNNI
 * layout of mnn_query_layout8, [n/16][k/4][16][4] s8 (n % 64 == 0), with
 * neg_zero[n] = -128 sum_k w[n][k].  vpdpbusd multiplies u8 by s8: the bytes of a are
 * flipped to the u8 a + 128 as they are broadcast (VNNI_TILE_4X4's FLIP), and the
 * accumulators start at neg_zero, so they end as the signed sums (|a w| <= 128 128:
 * the final sums fit int32 below k = 131 072, and vpdpbusd wraps, so only they matter).
 * Integer sums do not depend on the order, the thread count or the other rows:
 * batch-invariant like every kernel here.
 * The columns are split over the threads in groups of 64 (no two threads write the same
 * output, no reduction); the rows run in chunks of at most GEMM_CHUNK_BYTES of a, so a
 * chunk stays in L2 while the weight panels stream past it (balanced chunks: 257 rows of
 * 4096 are 3 chunks of 88 rows, not 128 + 128 + 1, which streamed the cold weights a
 * third time for one row).  Against torch._int_mm on the ViT-B and ViT-L shapes
 * (M = 257): 1.06-1.10x on one thread, 1.12-1.16x on two (docs/fast_paths.md,
 * section 2).  Returns 0, 1 without VNNI (the caller multiplies with
 * torch), -1 when memory ran out.
 * ------------------------------------------------------------------------------------ */
#ifndef GEMM_CHUNK_BYTES
#define GEMM_CHUNK_BYTES (512 * 1024)
#endif

#if VPR_HAVE_VNNI
/* 4 rows x 64 columns: rows (the real ones of the 4) stored into c (row stride ldc) */
static inline __attribute__((always_inline)) void gemm_tile(
        const int8_t *a, int64_t k, const int8_t *wg, const int32_t *neg_zero, int32_t *c,
        int64_t ldc, int rows) {
    const __m512i z0 = _mm512_loadu_si512((const void *)neg_zero);
    const __m512i z1 = _mm512_loadu_si512((const void *)(neg_zero + 16));
    const __m512i z2 = _mm512_loadu_si512((const void *)(neg_zero + 32));
    const __m512i z3 = _mm512_loadu_si512((const void *)(neg_zero + 48));
    __m512i a00 = z0, a01 = z1, a02 = z2, a03 = z3, a10 = z0, a11 = z1, a12 = z2, a13 = z3;
    __m512i a20 = z0, a21 = z1, a22 = z2, a23 = z3, a30 = z0, a31 = z1, a32 = z2, a33 = z3;
    VNNI_TILE_4X4("vpdpbusd", (const uint8_t *)a, k, 4, wg, k / 4, (int32_t)0x80808080);
    const __m512i acc[4][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13},
                               {a20, a21, a22, a23}, {a30, a31, a32, a33}};
    for (int r = 0; r < rows; ++r)
        for (int l = 0; l < 4; ++l)
            _mm512_storeu_si512((void *)(c + r * ldc + l * 16), acc[r][l]);
}
#endif

#if VPR_HAVE_VNNI
/* The row blocks (of 4) per chunk for `blocks` blocks of k bytes per row: chunks of at most
 * GEMM_CHUNK_BYTES of a, all of about the same size (each chunk streams every weight
 * panel once more: from DRAM for a model's cold weights). */
static int64_t gemm_chunk_blocks(int64_t blocks, int64_t k) {
    int64_t most = GEMM_CHUNK_BYTES / (4 * k);
    most = most < 1 ? 1 : most;
    const int64_t n_chunks = (blocks + most - 1) / most;
    return n_chunks ? (blocks + n_chunks - 1) / n_chunks : 1;
}
#endif

int vpr_int8_gemm(const int8_t *a, int64_t m, int64_t k, const int8_t *w,
                  const int32_t *neg_zero, int64_t n, int32_t *c, int num_threads) {
#if VPR_HAVE_VNNI
    const int64_t groups = n / 64, blocks = (m + 3) / 4, full = m / 4;
    const int64_t chunk = gemm_chunk_blocks(blocks, k);
    /* the last rows, if not 4: read from a copy padded with zero rows */
    int8_t *tail = NULL;
    if (full < blocks) {
        tail = calloc((size_t)(4 * k), 1);
        if (!tail) return -1;
        memcpy(tail, a + full * 4 * k, (size_t)((m - full * 4) * k));
    }
#pragma omp parallel num_threads(num_threads)
    for (int64_t b0 = 0; b0 < blocks; b0 += chunk) {
        const int64_t b1 = b0 + chunk < blocks ? b0 + chunk : blocks;
        /* the same static split for every chunk: a thread keeps its columns */
#pragma omp for schedule(static) nowait
        for (int64_t g = 0; g < groups; ++g)
            for (int64_t b = b0; b < b1; ++b)
                gemm_tile(b < full ? a + b * 4 * k : tail, k, w + g * 64 * k, neg_zero + g * 64,
                          c + b * 4 * n + g * 64, n, (int)(m - b * 4 < 4 ? m - b * 4 : 4));
    }
    free(tail);
    return 0;
#else
    (void)a; (void)m; (void)k; (void)w; (void)neg_zero; (void)n; (void)c; (void)num_threads;
    return 1;
#endif
}

/* ------------------------------------------------------------------------------------
 * Consecutive int8 ViT blocks in one parallel region (issue 15).  The step-by-step block
 * (int8_block.py) wakes the threads once per step, ~9 times per plain block and ~17 per
 * SelaVPR adapted block, and under OMP_WAIT_POLICY=PASSIVE (the node's setting, so that
 * waiting threads leave the cores to the rest of the robot) each wake-up of a sleeping
 * thread costs tens of microseconds on a VM.  Here the threads split the rows instead of
 * the matmuls' columns: every step after a matmul needs whole rows, and a thread that
 * computed all columns of its rows can go on with them at once, and on into the next
 * block (a block reads only its own rows of the previous block's output).  Only the
 * attention needs every token: one barrier before it (the qkv sums of all rows) and one
 * after its loop over the heads.  Those two spin, then sleep (team_barrier): an OpenMP
 * barrier under PASSIVE puts the first thread to sleep at once, and waking it costs as
 * much as a new region.  Each thread streams every weight panel (the other thread reads the same
 * panels from L3 at about the same time).  Every step is the same row function as the
 * step-by-step path, and the matmul sums are exact, so the output has the same bits.
 * ------------------------------------------------------------------------------------ */
typedef struct {             /* one int8 linear layer of a block */
    const int8_t *w;         /* the packed weight (pack_int8_weight): n % 64 == 0, k % 4 == 0 */
    const int32_t *neg_zero;
    const float *scale;      /* n: the weight's column scales */
    const float *bias;       /* n, or NULL */
    int64_t k, n;
} vpr_linear;

typedef struct {             /* a LayerNorm (biased variance, as torch) */
    const float *weight, *bias;
    float eps;
} vpr_norm;

typedef struct {             /* the block's work buffers (m rows) */
    int8_t *q_c;             /* m x c: int8 codes of the current c-wide input */
    float *s_a, *s_b;        /* m: row scales */
    int32_t *acc_qkv;        /* m x 3c */
    float *mixed;            /* m x c: the attention's output */
    int32_t *acc_c;          /* m x c */
    int8_t *q_h;             /* m x hidden */
    int32_t *acc_h;          /* m x hidden */
    int8_t *q_ad;            /* m x adapter hidden (adapted blocks) */
    float *s_ad;             /* m */
    int32_t *acc_ad;         /* m x adapter hidden */
    int32_t *acc_x1;         /* m x c */
} vpr_block_buffers;

/* One block of a chain: its layers (the C views of int8_block.py) and its output. */
typedef struct {
    const vpr_norm *norm1, *norm2;
    const vpr_linear *qkv, *proj, *fc1, *fc2;
    const vpr_linear *ad1_fc1, *ad1_fc2, *ad2_fc1, *ad2_fc2;   /* NULL: a plain block */
    const float *gamma1, *gamma2;   /* an adapted block's LayerScales, NULL: none */
    float adapter_scale, att_scale;
    int64_t heads, head_dim;
    float *out;                     /* (b n, c) float32 */
} vpr_block_call;

#if VPR_HAVE_VNNI
/* This thread's rows [r0, r1) of m: whole 4-row blocks, shared out evenly. */
static void team_rows(int64_t m, int64_t *r0, int64_t *r1) {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t blocks = (m + 3) / 4, b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
    *r0 = 4 * b0 < m ? 4 * b0 : m;
    *r1 = 4 * b1 < m ? 4 * b1 : m;
}

/* One row of gemm_tile (a last row of a thread's share: 257 rows are 64 tiles and one
 * row, and a zero-padded 4-row tile for it cost the thread holding it a whole tile more
 * than the other per layer). */
static inline __attribute__((always_inline)) void gemm_row1(
        const int8_t *a, int64_t k, const int8_t *wg, const int32_t *neg_zero, int32_t *c) {
    __m512i a0 = _mm512_loadu_si512((const void *)neg_zero);
    __m512i a1 = _mm512_loadu_si512((const void *)(neg_zero + 16));
    __m512i a2 = _mm512_loadu_si512((const void *)(neg_zero + 32));
    __m512i a3 = _mm512_loadu_si512((const void *)(neg_zero + 48));
    const int64_t steps = k / 4, block = steps * 64;
    for (int64_t g = 0; g < steps; ++g) {
        int32_t f;
        memcpy(&f, a + 4 * g, 4);
        const __m512i r = _mm512_set1_epi32(f ^ (int32_t)0x80808080);   /* s8 -> u8 */
        const int8_t *q = wg + g * 64;
        a0 = _mm512_dpbusd_epi32(a0, r, _mm512_load_si512((const void *)q));
        a1 = _mm512_dpbusd_epi32(a1, r, _mm512_load_si512((const void *)(q + block)));
        a2 = _mm512_dpbusd_epi32(a2, r, _mm512_load_si512((const void *)(q + 2 * block)));
        a3 = _mm512_dpbusd_epi32(a3, r, _mm512_load_si512((const void *)(q + 3 * block)));
    }
    _mm512_storeu_si512((void *)c, a0);
    _mm512_storeu_si512((void *)(c + 16), a1);
    _mm512_storeu_si512((void *)(c + 32), a2);
    _mm512_storeu_si512((void *)(c + 48), a3);
}

/* Rows [r0, r1) of the int8 product a x L (every column) into c (row stride L->n), on the
 * calling thread; tail: 4 * L->k bytes of scratch for the last rows if 2 or 3. */
static void gemm_rows(const int8_t *a, int64_t r0, int64_t r1, const vpr_linear *L,
                      int32_t *c, int8_t *tail) {
    const int64_t k = L->k, n = L->n, groups = n / 64;
    const int64_t blocks = (r1 - r0 + 3) / 4, full = r0 + (r1 - r0) / 4 * 4;
    const int64_t chunk = gemm_chunk_blocks(blocks, k);
    const int one = r1 - full == 1;
    if (full < r1 && !one) {
        memset(tail, 0, (size_t)(4 * k));
        memcpy(tail, a + full * k, (size_t)((r1 - full) * k));
    }
    for (int64_t b0 = 0; b0 < blocks; b0 += chunk) {
        const int64_t b1 = b0 + chunk < blocks ? b0 + chunk : blocks;
        for (int64_t g = 0; g < groups; ++g)
            for (int64_t bl = b0; bl < b1; ++bl) {
                const int64_t row = r0 + 4 * bl;
                if (row == full && one)
                    gemm_row1(a + row * k, k, L->w + g * 64 * k, L->neg_zero + g * 64,
                              c + row * n + g * 64);
                else
                    gemm_tile(row < full ? a + row * k : tail, k, L->w + g * 64 * k,
                              L->neg_zero + g * 64, c + row * n + g * 64, n,
                              (int)(r1 - row < 4 ? r1 - row : 4));
            }
    }
}

/* The scratch of one thread: LayerNorm rows (c floats) and the matmul's tail rows. */
static int block_scratch(int64_t c, int64_t widest_k, float **tmp, int8_t **tail) {
    *tmp = (float *)calloc((size_t)c, 4);   /* zeroed: c floats, once per call */
    *tail = (int8_t *)malloc((size_t)(4 * widest_k));
    return *tmp && *tail;
}

/* A barrier of the threads of one parallel region that spins, then sleeps: the waits
 * inside a block chain are mostly microseconds (the threads do the same work), and an
 * OpenMP barrier under OMP_WAIT_POLICY=PASSIVE puts the first thread to sleep at once,
 * which costs a wake-up (tens of microseconds on a VM) at every barrier.  A thread
 * spins for at most TEAM_SPIN_CYCLES of the time-stamp counter (about what a wake-up
 * costs), then sleeps on a futex: a partner held up by another process (its core taken)
 * then costs no spinning either.  Sense-reversing: `arrived` counts the threads of the
 * current round, `round` advances when the last one arrives. */
#ifndef TEAM_SPIN_CYCLES
#define TEAM_SPIN_CYCLES 131072ULL   /* ~35-65 us at a 2-4 GHz time-stamp counter */
#endif
typedef struct {
    int arrived;
    int round;
    int sleepers;
} team_barrier;

static void team_barrier_wait(team_barrier *bar) {
    const int nt = omp_get_num_threads();
    if (nt == 1) return;
    const int round = __atomic_load_n(&bar->round, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&bar->arrived, 1, __ATOMIC_ACQ_REL) == nt) {
        __atomic_store_n(&bar->arrived, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&bar->round, round + 1, __ATOMIC_SEQ_CST);   /* publishes all */
#ifdef __linux__
        if (__atomic_load_n(&bar->sleepers, __ATOMIC_SEQ_CST))
            syscall(SYS_futex, &bar->round, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#endif
        return;
    }
    const unsigned long long start = __rdtsc();
    while (__atomic_load_n(&bar->round, __ATOMIC_ACQUIRE) == round) {
        if (__rdtsc() - start < TEAM_SPIN_CYCLES) {
            _mm_pause();
            continue;
        }
#ifdef __linux__
        /* the last thread reads `sleepers` after advancing `round`, this one reads
         * `round` after counting itself in (both sequentially consistent): either the
         * wake sees this sleeper, or this thread sees the new round; FUTEX_WAIT itself
         * returns at once where `round` has already moved on */
        __atomic_add_fetch(&bar->sleepers, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&bar->round, __ATOMIC_SEQ_CST) == round)
            syscall(SYS_futex, &bar->round, FUTEX_WAIT_PRIVATE, round, NULL, NULL, 0);
        __atomic_sub_fetch(&bar->sleepers, 1, __ATOMIC_SEQ_CST);
#else
        sched_yield();
#endif
    }
}

/* Norm1 + quantise and the qkv sums of this thread's rows, the barrier, the heads, the
 * barrier, and the attention's output coded for proj (q_c, s_a) in this thread's rows.
 * Returns nonzero where the attention's scratch could not be allocated. */
static int block_attention(const float *x, int64_t b, int64_t n, int64_t c,
                           const vpr_block_call *k, vpr_block_buffers *ws, int64_t r0,
                           int64_t r1, int ok, float *tmp, int8_t *tail, team_barrier *bar) {
    const vpr_norm *norm1 = k->norm1;
    if (ok) {
        for (int64_t i = r0; i < r1; ++i)
            ws->s_a[i] = layer_norm_quantize_row(x + i * c, c, norm1->weight, norm1->bias,
                                                 norm1->eps, tmp, ws->q_c + i * c);
        gemm_rows(ws->q_c, r0, r1, k->qkv, ws->acc_qkv, tail);
    }
    team_barrier_wait(bar);
    const int failed = attention_heads_team(ws->acc_qkv, ws->s_a, k->qkv->scale, k->qkv->bias,
                                            b, n, k->heads, k->head_dim, k->att_scale,
                                            ws->mixed, 0);
    /* every row of mixed is complete, and s_a is read no more */
    team_barrier_wait(bar);
    if (ok)
        for (int64_t i = r0; i < r1; ++i)
            ws->s_a[i] = quantize_row(ws->mixed + i * c, c, ws->q_c + i * c);
    return failed;
}
/* fc1 + GELU + quantise, then fc2's sums into o, for this thread's rows (norm2's codes
 * of the rows in q_c / s_a; the GELU's codes and scales in q_h / s_b). */
static void block_mlp(const vpr_linear *fc1, const vpr_linear *fc2, vpr_block_buffers *ws,
                      int32_t *o, int64_t r0, int64_t r1, int8_t *tail) {
    const int64_t hidden = fc1->n;
    gemm_rows(ws->q_c, r0, r1, fc1, ws->acc_h, tail);
    for (int64_t i = r0; i < r1; ++i)
        ws->s_b[i] = gelu_quantize_row(ws->acc_h + i * hidden, hidden, ws->s_a[i], fc1->scale,
                                       fc1->bias, ws->q_h + i * hidden);
    gemm_rows(ws->q_h, r0, r1, fc2, o, tail);
}

/* After the attention, a plain block's rows: x1 = x + proj(attention) (float in acc_c),
 * h = norm2(x1), out = x1 + MLP(h). */
static void plain_rows(const float *x, int64_t c, const vpr_block_call *k,
                       vpr_block_buffers *ws, int64_t r0, int64_t r1, float *tmp,
                       int8_t *tail) {
    const vpr_linear *proj = k->proj, *fc2 = k->fc2;
    const vpr_norm *norm2 = k->norm2;
    int32_t *o = (int32_t *)k->out;
    gemm_rows(ws->q_c, r0, r1, proj, ws->acc_c, tail);
    for (int64_t i = r0; i < r1; ++i)
        ws->s_a[i] = residual_layer_norm_quantize_row(
            ws->acc_c + i * c, c, ws->s_a[i], proj->scale, proj->bias, NULL, NULL, x + i * c,
            norm2->weight, norm2->bias, norm2->eps, tmp, ws->q_c + i * c);
    block_mlp(k->fc1, fc2, ws, o, r0, r1, tail);
    for (int64_t i = r0; i < r1; ++i)
        dequantize_add_row(o + i * c, c, ws->s_b[i], fc2->scale, fc2->bias,
                           (const float *)ws->acc_c + i * c);
}

/* After the attention, an adapted block's rows: a = proj(attention) (float in acc_c),
 * x1 = x + ls1(a + adapter1(a)) (float in acc_x1), h = norm2(x1),
 * out = x1 + ls2(MLP(h) + s adapter2(h)). */
static void adapted_rows(const float *x, int64_t c, const vpr_block_call *k,
                         vpr_block_buffers *ws, int64_t r0, int64_t r1, float *tmp,
                         int8_t *tail) {
    const vpr_linear *proj = k->proj, *fc2 = k->fc2;
    const vpr_linear *a1f1 = k->ad1_fc1, *a1f2 = k->ad1_fc2, *a2f1 = k->ad2_fc1,
                     *a2f2 = k->ad2_fc2;
    const vpr_norm *norm2 = k->norm2;
    int32_t *o = (int32_t *)k->out;
    const int64_t ha = a1f1->n;
    gemm_rows(ws->q_c, r0, r1, proj, ws->acc_c, tail);
    for (int64_t i = r0; i < r1; ++i)
        ws->s_b[i] = dequantize_quantize_row(ws->acc_c + i * c, c, ws->s_a[i], proj->scale,
                                             proj->bias, 0, ws->q_c + i * c);
    gemm_rows(ws->q_c, r0, r1, a1f1, ws->acc_ad, tail);
    for (int64_t i = r0; i < r1; ++i)
        ws->s_ad[i] = dequantize_quantize_row(ws->acc_ad + i * ha, ha, ws->s_b[i], a1f1->scale,
                                              a1f1->bias, 1, ws->q_ad + i * ha);
    gemm_rows(ws->q_ad, r0, r1, a1f2, ws->acc_x1, tail);
    for (int64_t i = r0; i < r1; ++i)
        ws->s_a[i] = residual_layer_norm_quantize_row(
            ws->acc_x1 + i * c, c, ws->s_ad[i], a1f2->scale, a1f2->bias,
            (const float *)ws->acc_c + i * c, k->gamma1, x + i * c, norm2->weight,
            norm2->bias, norm2->eps, tmp, ws->q_c + i * c);
    block_mlp(k->fc1, fc2, ws, o, r0, r1, tail);         /* the MLP's sums into out */
    gemm_rows(ws->q_c, r0, r1, a2f1, ws->acc_ad, tail);
    for (int64_t i = r0; i < r1; ++i)
        ws->s_ad[i] = dequantize_quantize_row(ws->acc_ad + i * ha, ha, ws->s_a[i], a2f1->scale,
                                              a2f1->bias, 1, ws->q_ad + i * ha);
    gemm_rows(ws->q_ad, r0, r1, a2f2, ws->acc_c, tail);   /* adapter2's sums */
    for (int64_t i = r0; i < r1; ++i)
        pair_residual_row(o + i * c, ws->acc_c + i * c, c, ws->s_b[i], fc2->scale, fc2->bias,
                          ws->s_ad[i], a2f2->scale, a2f2->bias, k->adapter_scale, k->gamma2,
                          (const float *)ws->acc_x1 + i * c);
}
#endif

/* Blocks 0..count-1 of a chain in one parallel region: x (b, n, c) float32 rows through
 * each block in turn, block i's output into calls[i].out ((b n, c) float32, the bits of
 * the step-by-step path; the next block's input).  A block is a timm Block
 * (Int8TransformerBlock: ad1_fc1 == NULL) or a SelaVPR adapted block (Int8AdaptedBlock):
 * x1 = x + ls1(a + adapter1(a)) with a = attn(norm1(x)), then
 * out = x1 + ls2(mlp(h) + s adapter2(h)) with h = norm2(x1).  The layers' shapes must
 * chain (qkv c -> 3c, proj c -> c, fc1 c -> hidden, fc2 hidden -> c, adapters c -> ha ->
 * c), and the work buffers hold the widest block: the caller checks both
 * (int8_block.py).  Returns 0; 1 without VNNI; -1 when memory ran out (outputs
 * incomplete); -2 for n >= 32768 tokens; -3 for an adapted block whose adapters have two
 * widths (they share q_ad and acc_ad). */
int vpr_block_chain(const float *x, int64_t b, int64_t n, int64_t c,
                    const vpr_block_call *calls, int64_t count, vpr_block_buffers *ws,
                    int num_threads) {
#if VPR_HAVE_VNNI
    if (n >= 32768) return -2;
    const int64_t m = b * n;
    int64_t widest = c;
    for (int64_t i = 0; i < count; ++i) {
        const vpr_block_call *k = calls + i;
        widest = k->fc1->n > widest ? k->fc1->n : widest;
        if (k->ad1_fc1) {
            const int64_t ha = k->ad1_fc1->n;
            if (k->ad2_fc1->n != ha || k->ad1_fc2->k != ha || k->ad2_fc2->k != ha) return -3;
            widest = ha > widest ? ha : widest;
        }
    }
    int failed = 0;
    team_barrier bar = {0, 0, 0};
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        int64_t r0, r1;
        team_rows(m, &r0, &r1);
        float *tmp;
        int8_t *tail;
        const int ok = block_scratch(c, widest, &tmp, &tail);
        failed = !ok;       /* every thread still meets every barrier */
        const float *in = x;
        for (int64_t i = 0; i < count; ++i) {
            const vpr_block_call *k = calls + i;
            failed |= block_attention(in, b, n, c, k, ws, r0, r1, ok, tmp, tail, &bar);
            if (ok && k->ad1_fc1)
                adapted_rows(in, c, k, ws, r0, r1, tmp, tail);
            else if (ok)
                plain_rows(in, c, k, ws, r0, r1, tmp, tail);
            in = k->out;    /* the next block reads only this thread's rows of it */
        }
        free(tmp);
        free(tail);
    }
    return failed ? -1 : 0;
#else
    (void)x; (void)b; (void)n; (void)c; (void)calls; (void)count; (void)ws;
    (void)num_threads;
    return 1;
#endif
}

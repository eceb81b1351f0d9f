/* Matrix products for decode and small batches: out[t][i] = dot(w[i], x[t]) for a few rows x[t].
 *
 * Compiled on first use by babyllama/kernels_native.py with the system C compiler
 * (cc -O3 -march=native -fopenmp) and called through ctypes. Two products:
 *
 *  - fp32: memory-bound for one row (every weight is read once per token), so the point is to stream
 *    the weights at full bandwidth on all threads; for several rows x[t] each weight is loaded once and
 *    used for all of them (batched decode is then compute-bound, not memory-bound).
 *  - Q8_0 (runq.c's scheme): the activations are quantized per group of gs values like the weights
 *    (scale = max|x|/127, q = round(x/scale)) and
 *        out[t][i] = sum_g  w_s[i][g] * x_s[t][g] * sum_{k in g} w_q[i][k] * x_q[t][k].
 *    The inner integer sum is exact. With AVX2 and gs % 32 == 0 it is computed 32 products at a time:
 *    maddubs multiplies unsigned by signed bytes, so |w| (unsigned, computed once per weight vector for all
 *    the tokens of a batch) meets x * sign(w) (signed), which is the same product; pairs are summed into
 *    int16 (at most 2 * 128 * 127, no overflow) and madd with ones sums them on into int32.
 *
 * Several matrices that read the same input (wq/wk/wv, w1/w3) go in one call and one parallel region, in
 * which each thread takes its share of every matrix, so a decode step starts few parallel regions.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    const void *w;      /* fp32 (rows, n) or int8 (rows, n) weights */
    const float *s;     /* Q8_0: scales (rows, n / gs); fp32: unused */
    int64_t rows;
    int64_t row0;       /* rows of the matrices before it: its (n_tok, rows) result starts at out + n_tok * row0 */
} Mat;

/* Q8_0 products prefetch this many bytes ahead in a thread's stream of weight rows: the hardware
 * prefetchers alone left them well below the memory bandwidth (110M-shape decode products: 8.3 -> 6.3 ms
 * per token). fp32 rows are 4x longer in bytes and the same prefetch made them slower, so they have none. */
#define PREFETCH_BYTES 6144

/* Fused forms (the calls a decode step makes, see engine.py): a product may read rmsnorm(x) * norm_w or
 * silu(x) * gate instead of x, and add its result into `out` instead of storing it (the residual). */
typedef struct {
    const float *norm_w; /* non-NULL: the input is rmsnorm(x) * norm_w, with eps */
    float eps;
    const float *gate;   /* non-NULL: the input is silu(x) * gate */
    int accumulate;      /* out += x @ w.T instead of out = x @ w.T */
} Fusion;

void rmsnorm(const float *x, const float *weight, int64_t n_tok, int64_t dim, float eps, float *out);
void swiglu(const float *a, const float *b, int64_t n, float *out);

/* the input a product reads: x, or its fused pre-operation written into a fresh buffer (*owned) */
static const float *prepare_input(const float *x, int64_t n_tok, int64_t n, const Fusion *f, float **owned) {
    *owned = NULL;
    if (f == NULL || (f->norm_w == NULL && f->gate == NULL)) return x;
    *owned = malloc(n_tok * n * sizeof(float));
    if (f->norm_w) rmsnorm(x, f->norm_w, n_tok, n, f->eps, *owned);
    else swiglu(x, f->gate, n_tok * n, *owned);
    return *owned;
}

static inline void store(float *o, float value, int accumulate) { *o = accumulate ? *o + value : value; }
#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* fully unrolled small loops keep the accumulator arrays in registers */
#define UNROLL _Pragma("GCC unroll 8")

/* ------------------------------------------------------------------------------------------- fp32 */

#ifdef __AVX2__
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Batched fp32 products prefetch this far ahead in a weight row: with eight tokens' arithmetic per weight the
 * hardware prefetchers alone fell behind (32000x768 weights, 8 tokens, one thread: 20 -> 12 ms). */
#define F32_BATCH_PREFETCH_BYTES 8192

/* scalar sum of w[k] x[k] for k in [from, n): the tail of a row whose length is not a multiple of 8 */
static inline float tail_dot(const float *w, const float *x, int64_t from, int64_t n) {
    float acc = 0.0f;
    for (int64_t k = from; k < n; k++) acc += w[k] * x[k];
    return acc;
}

/* res[t] = dot(w, x[t]) for one weight row and nt <= 8 rows of x (rows of n floats). One weight stream, each
 * weight vector loaded once for all tokens (the rows of x stay in L1); the n % 8 last columns in scalar */
ALWAYS_INLINE void dots_f32_avx2(const float *w, const float *x, int64_t n, int nt, float *res) {
    __m256 acc[8];
    int64_t n8 = n & ~(int64_t)7;
    UNROLL
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t k = 0; k < n8; k += 8) {
        __m256 wv = _mm256_loadu_ps(w + k);
        if ((k & 15) == 0) _mm_prefetch((const char *)(w + k) + F32_BATCH_PREFETCH_BYTES, _MM_HINT_T0);
        UNROLL
        for (int t = 0; t < nt; t++) acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * n + k), acc[t]);
    }
    UNROLL
    for (int t = 0; t < nt; t++) res[t] = hsum8(acc[t]) + tail_dot(w, x + t * n, n8, n);
}
#endif

#ifdef __AVX2__
/* one row, one token: four accumulators, so that four loads are in flight rather than one FMA chain */
static inline float dot1_f32_avx2(const float *w, const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= n; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
    return hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + tail_dot(w, x, k, n);
}
#endif

/* res[t] = dot(w, x[t]) for one weight row and nt <= 8 rows of x */
static void dots_f32(const float *w, const float *x, int64_t n, int nt, float *res) {
#ifdef __AVX2__
    switch (nt) { /* a constant token count lets the compiler keep every accumulator in a register */
#define DOTS_F32(c) case c: dots_f32_avx2(w, x, n, c, res); return;
        DOTS_F32(1) DOTS_F32(2) DOTS_F32(3) DOTS_F32(4) DOTS_F32(5) DOTS_F32(6) DOTS_F32(7) DOTS_F32(8)
#undef DOTS_F32
    }
#endif
    for (int t = 0; t < nt; t++) {
        float acc = 0.0f;
        for (int64_t k = 0; k < n; k++) acc += w[k] * x[t * n + k];
        res[t] = acc;
    }
}

/* rows [lo, hi) of m for every token: one thread's share (a plain function, outside the OpenMP region:
 * compiled inside it, the same loop ran 4x slower). A row at a time, for up to 8 tokens at once: one
 * sequential stream for the prefetchers (interleaving two rows made these memory-bound products slower). */
static __attribute__((noinline)) void rows_f32(const Mat *m, int64_t lo, int64_t hi, const float *x, int64_t n_tok,
                                               int64_t n, float *out, int accumulate) {
#ifdef __AVX2__
    if (n_tok == 1) { /* decode: the plain loop, nothing between one row's dot and the next */
        const float *w = (const float *)m->w;
        float *o = out + m->row0;
        for (int64_t i = lo; i < hi; i++) store(&o[i], dot1_f32_avx2(w + i * n, x, n), accumulate);
        return;
    }
#endif
    for (int64_t i = lo; i < hi; i++)
        for (int64_t t0 = 0; t0 < n_tok; t0 += 8) {
            int nt = n_tok - t0 < 8 ? (int)(n_tok - t0) : 8;
            float res[8];
            dots_f32((const float *)m->w + i * n, x + t0 * n, n, nt, res);
            for (int t = 0; t < nt; t++) store(&out[n_tok * m->row0 + (t0 + t) * m->rows + i], res[t], accumulate);
        }
}

/* Each thread takes one contiguous share of every matrix: one long stream per thread is what the
 * prefetchers follow best (chunks handed out dynamically measured up to 20% slower on small matrices). */
static void my_share(int64_t rows, int64_t *lo, int64_t *hi) {
#ifdef _OPENMP
    int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
    int64_t tid = 0, nth = 1;
#endif
    int64_t per = ((rows + nth - 1) / nth + 3) / 4 * 4;
    *lo = tid * per < rows ? tid * per : rows;
    *hi = *lo + per < rows ? *lo + per : rows;
}

void matmul_f32(const float *x, int64_t n_tok, int64_t n, const Mat *mats, int n_mats, float *out, const Fusion *f) {
    float *owned;
    x = prepare_input(x, n_tok, n, f, &owned);
    int accumulate = f != NULL && f->accumulate;
#pragma omp parallel
    for (int j = 0; j < n_mats; j++) {
        int64_t lo, hi;
        my_share(mats[j].rows, &lo, &hi);
        rows_f32(&mats[j], lo, hi, x, n_tok, n, out, accumulate);
    }
    free(owned);
}

/* ------------------------------------------------------------------------------------------- Q8_0 */

/* quantize rows x (n_tok, n) per group of gs: int8 values xq and scales xs (n_tok, n / gs) */
void quantize_q8(const float *x, int64_t n_tok, int64_t n, int64_t gs, int8_t *xq, float *xs) {
    for (int64_t g = 0; g < n_tok * (n / gs); g++) {
        const float *v = x + g * gs;
        float amax = 0.0f;
        for (int64_t k = 0; k < gs; k++) amax = fmaxf(amax, fabsf(v[k]));
        float scale = amax / 127.0f;
        float safe = scale != 0.0f ? scale : 1.0f;
        xs[g] = scale;
        /* rintf: ties to even, like NumPy's reference (runq.c's roundf rounds ties away from zero) */
        for (int64_t k = 0; k < gs; k++) xq[g * gs + k] = (int8_t)rintf(v[k] / safe);
    }
}

#ifdef __AVX2__
/* res[t] = Q8_0 dot of one weight row with x rows t < nt <= 8, gs % 32 == 0: each weight vector is loaded
 * once for all tokens (see dots_f32_avx2) */
ALWAYS_INLINE void dots_q8_avx2(const int8_t *w, const float *ws, const int8_t *x, const float *xs, int64_t n,
                                int64_t gs, int nt, float *res) {
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t n_groups = n / gs;
    __m256 acc[8];
    UNROLL
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < n_groups; g++) {
        __m256i isum[8];
        UNROLL
        for (int t = 0; t < nt; t++) isum[t] = _mm256_setzero_si256();
        for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + k));
            __m256i wabs = _mm256_sign_epi8(wv, wv); /* once for all tokens (see the file's header) */
            _mm_prefetch((const char *)(w + k) + PREFETCH_BYTES, _MM_HINT_T0);
            UNROLL
            for (int t = 0; t < nt; t++) {
                __m256i xv = _mm256_loadu_si256((const __m256i *)(x + t * n + k));
                __m256i p16 = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wv));
                isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(p16, ones));
            }
        }
        UNROLL
        for (int t = 0; t < nt; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(ws[g] * xs[t * n_groups + g]), acc[t]);
    }
    UNROLL
    for (int t = 0; t < nt; t++) res[t] = hsum8(acc[t]);
}
#endif

/* res[t] = Q8_0 dot of one weight row (scales ws) with x rows t < nt <= 8 (scales xs) */
static void dots_q8(const int8_t *w, const float *ws, const int8_t *x, const float *xs, int64_t n, int64_t gs, int nt,
                    float *res) {
#ifdef __AVX2__
    if (gs % 32 == 0) {
        switch (nt) { /* constant token counts keep the accumulators in registers (see dots_f32) */
#define DOTS_Q8(c) case c: dots_q8_avx2(w, ws, x, xs, n, gs, c, res); return;
            DOTS_Q8(1) DOTS_Q8(2) DOTS_Q8(3) DOTS_Q8(4) DOTS_Q8(5) DOTS_Q8(6) DOTS_Q8(7) DOTS_Q8(8)
#undef DOTS_Q8
        }
    }
#endif
    int64_t n_groups = n / gs;
    for (int t = 0; t < nt; t++) {
        float acc = 0.0f;
        for (int64_t g = 0; g < n_groups; g++) {
            int32_t dot = 0;
            for (int64_t k = g * gs; k < (g + 1) * gs; k++) dot += (int32_t)w[k] * (int32_t)x[t * n + k];
            acc += (float)dot * ws[g] * xs[t * n_groups + g];
        }
        res[t] = acc;
    }
}

/* rows [lo, hi) of m for every token, a row at a time for up to 8 tokens at once (see rows_f32) */
static __attribute__((noinline)) void rows_q8(const Mat *m, int64_t lo, int64_t hi, const int8_t *xq,
                                              const float *xs, int64_t n_tok, int64_t n, int64_t gs, float *out,
                                              int accumulate) {
    int64_t n_groups = n / gs;
    for (int64_t i = lo; i < hi; i++)
        for (int64_t t0 = 0; t0 < n_tok; t0 += 8) {
            int nt = n_tok - t0 < 8 ? (int)(n_tok - t0) : 8;
            float res[8];
            dots_q8((const int8_t *)m->w + i * n, m->s + i * n_groups, xq + t0 * n, xs + t0 * n_groups, n, gs, nt,
                    res);
            for (int t = 0; t < nt; t++) store(&out[n_tok * m->row0 + (t0 + t) * m->rows + i], res[t], accumulate);
        }
}

void matmul_q8(const float *x, int64_t n_tok, int64_t n, int64_t gs, const Mat *mats, int n_mats, float *out,
               const Fusion *f) {
    int64_t n_groups = n / gs;
    float *owned;
    x = prepare_input(x, n_tok, n, f, &owned);
    int accumulate = f != NULL && f->accumulate;
    int8_t *xq = malloc(n_tok * n);
    float *xs = malloc(n_tok * n_groups * sizeof(float));
    quantize_q8(x, n_tok, n, gs, xq, xs);
#pragma omp parallel
    for (int j = 0; j < n_mats; j++) {
        int64_t lo, hi;
        my_share(mats[j].rows, &lo, &hi);
        rows_q8(&mats[j], lo, hi, xq, xs, n_tok, n, gs, out, accumulate);
    }
    free(owned);
    free(xq);
    free(xs);
}

/* out (rows, n) = the Q8_0 weights w (rows, n) times their group scales s (rows, n / gs): a prompt's
 * products run in fp32 BLAS, and NumPy's version of this took a third of a 110M prefill */
void dequantize_q8(const int8_t *w, const float *s, int64_t rows, int64_t n, int64_t gs, float *out) {
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < rows * (n / gs); g++) {
        const int8_t *q = w + g * gs;
        float *o = out + g * gs, scale = s[g];
        int64_t k = 0;
#ifdef __AVX2__
        __m256 vs = _mm256_set1_ps(scale);
        for (; k + 8 <= gs; k += 8) {
            __m256i q32 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + k)));
            _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_cvtepi32_ps(q32), vs));
        }
#endif
        for (; k < gs; k++) o[k] = (float)q[k] * scale;
    }
}

/* ------------------------------------------------------------------- the rest of a decode step */
/* A decode step's other operations are tiny (one vector per token), so in NumPy each costs its call
 * overhead more than its arithmetic; these do them in one call each, with the same formulas as engine.py. */

/* out = x / sqrt(mean(x^2) + eps) * weight, for each of n_tok rows of dim values */
void rmsnorm(const float *x, const float *weight, int64_t n_tok, int64_t dim, float eps, float *out) {
    for (int64_t t = 0; t < n_tok; t++) {
        const float *v = x + t * dim;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < dim; i++) ss += v[i] * v[i];
        float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) out[t * dim + i] = v[i] * inv * weight[i];
    }
}

/* RoPE in place: rotate pairs (2i, 2i+1) of every head of v (n_tok, n_heads, hs) by token t's angles,
 * cos/sin (n_tok, hs/2) */
void rope(float *v, int64_t n_tok, int64_t n_heads, int64_t hs, const float *cos, const float *sin) {
    for (int64_t t = 0; t < n_tok; t++)
        for (int64_t h = 0; h < n_heads; h++) {
            float *p = v + (t * n_heads + h) * hs;
            const float *c = cos + t * (hs / 2), *s = sin + t * (hs / 2);
            for (int64_t i = 0; i < hs / 2; i++) {
                float a = p[2 * i], b = p[2 * i + 1];
                p[2 * i] = a * c[i] - b * s[i];
                p[2 * i + 1] = a * s[i] + b * c[i];
            }
        }
}

#ifdef __AVX2__
/* exp(x) for 8 floats, Cephes' expf: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two for precision),
 * exp(r) by a degree-6 polynomial, 2^n put into the exponent bits. Within ~2 ulp of expf; x is clamped to
 * [-87.3, 88.4], where exp(x) stays a normal float. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.37f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}
#endif

/* out = silu(a) * b elementwise, silu(x) = x / (1 + exp(-x)) */
void swiglu(const float *a, const float *b, int64_t n, float *out) {
    int64_t i = 0;
#ifdef __AVX2__
#pragma omp parallel for if (n >= 65536)
    for (int64_t c = 0; c < n / 8; c++) {
        __m256 av = _mm256_loadu_ps(a + 8 * c), one = _mm256_set1_ps(1.0f);
        __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), av));
        _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(_mm256_div_ps(av, _mm256_add_ps(one, e)), _mm256_loadu_ps(b + 8 * c)));
    }
    i = n / 8 * 8;
#endif
    for (; i < n; i++) out[i] = a[i] / (1.0f + expf(-a[i])) * b[i];
}

/* scores[p] = dot(q, keys[p]) * scale for p < n_pos (keys (n_pos, hs) contiguous); returns the maximum */
static float attention_scores(const float *q, const float *keys, int64_t n_pos, int64_t hs, float scale, float *scores) {
    float max = -INFINITY;
    int64_t p = 0;
#ifdef __AVX2__
    if (hs % 8 == 0) {
        /* eight keys at a time: eight dot products accumulated side by side, then reduced into one
         * vector of eight sums with a tree of horizontal adds */
        __m256 vmax = _mm256_set1_ps(-INFINITY), vscale = _mm256_set1_ps(scale);
        for (; p + 8 <= n_pos; p += 8) {
            const float *k = keys + p * hs;
            __m256 acc[8];
            UNROLL
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
            for (int64_t i = 0; i < hs; i += 8) {
                __m256 qv = _mm256_loadu_ps(q + i);
                UNROLL
                for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(k + j * hs + i), qv, acc[j]);
            }
            __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
            __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
            __m256 dots = _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                        _mm256_permute2f128_ps(s0123, s4567, 0x31));
            dots = _mm256_mul_ps(dots, vscale);
            _mm256_storeu_ps(scores + p, dots);
            vmax = _mm256_max_ps(vmax, dots);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, vmax);
        for (int j = 0; j < 8; j++) max = fmaxf(max, lanes[j]);
    }
#endif
    for (; p < n_pos; p++) {
        float dot = 0.0f;
        for (int64_t i = 0; i < hs; i++) dot += q[i] * keys[p * hs + i];
        scores[p] = dot * scale;
        max = fmaxf(max, scores[p]);
    }
    return max;
}

/* scores[p] = exp(scores[p] - max) in place; returns their sum */
static float softmax_weights(float *scores, int64_t n_pos, float max) {
    float sum = 0.0f;
    int64_t p = 0;
#ifdef __AVX2__
    __m256 vsum = _mm256_setzero_ps(), vmax = _mm256_set1_ps(max);
    for (; p + 8 <= n_pos; p += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + p), vmax));
        _mm256_storeu_ps(scores + p, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    sum = hsum8(vsum);
#endif
    for (; p < n_pos; p++) {
        scores[p] = expf(scores[p] - max);
        sum += scores[p];
    }
    return sum;
}

#ifdef __AVX2__
/* out[0 : 8 nv] = inv_sum * sum_p weights[p] * values[p][0 : 8 nv] (values rows hs apart), the sums kept in
 * nv registers; called with a constant nv so that they stay there */
ALWAYS_INLINE void weighted_values(const float *weights, const float *values, int64_t n_pos, int64_t hs, int nv,
                                   float inv_sum, float *out) {
    __m256 acc[8];
    UNROLL
    for (int c = 0; c < nv; c++) acc[c] = _mm256_setzero_ps();
    for (int64_t p = 0; p < n_pos; p++) {
        __m256 wp = _mm256_broadcast_ss(weights + p);
        UNROLL
        for (int c = 0; c < nv; c++) acc[c] = _mm256_fmadd_ps(wp, _mm256_loadu_ps(values + p * hs + 8 * c), acc[c]);
    }
    UNROLL
    for (int c = 0; c < nv; c++) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv_sum)));
}
#endif

/* out = sum_p weights[p] / sum * values[p] over n_pos rows of hs values */
static void attention_output(const float *weights, const float *values, int64_t n_pos, int64_t hs, float sum,
                             float *out) {
    float inv_sum = 1.0f / sum;
#ifdef __AVX2__
    if (hs % 8 == 0) {
        for (int64_t c0 = 0; c0 < hs; c0 += 64) {
            int nv = hs - c0 >= 64 ? 8 : (int)(hs - c0) / 8;
            const float *v = values + c0;
            switch (nv) {
#define WEIGHTED_VALUES(k) case k: weighted_values(weights, v, n_pos, hs, k, inv_sum, out + c0); break;
                WEIGHTED_VALUES(1) WEIGHTED_VALUES(2) WEIGHTED_VALUES(3) WEIGHTED_VALUES(4)
                WEIGHTED_VALUES(5) WEIGHTED_VALUES(6) WEIGHTED_VALUES(7) WEIGHTED_VALUES(8)
#undef WEIGHTED_VALUES
            }
        }
        return;
    }
#endif
    for (int64_t i = 0; i < hs; i++) out[i] = 0.0f;
    for (int64_t p = 0; p < n_pos; p++) {
        float wgt = weights[p] * inv_sum;
        for (int64_t i = 0; i < hs; i++) out[i] += wgt * values[p * hs + i];
    }
}

/* One attention step for n_tok tokens, each with its own sequence slot and position (a decode step, a
 * batched one, a prompt): RoPE on q (n_tok, n_heads, hs) and k (n_tok, kv_heads, hs) in place with each
 * token's cos/sin (n_tok, hs/2); k and v stored in the layer's cache kc, vc (slots, kv_heads, seq_len, hs)
 * at (slot, position); then each token's causal attention over its slot's positions 0..position (all keys
 * are stored first, so tokens of one sequence see each other's). Query head h reads kv head
 * h / (n_heads / kv_heads). out (n_tok, n_heads * hs). One (head, token) pair per task, head-major so that
 * a prompt's consecutive tasks reuse one head's keys and values from cache, dealt round-robin so that its
 * long late rows and short early ones spread evenly over the threads. */
void attention_step(float *q, float *k, const float *v, const float *cos, const float *sin, float *kc, float *vc,
                    const int64_t *slots, const int64_t *positions, int64_t n_tok, int64_t n_heads,
                    int64_t kv_heads, int64_t seq_len, int64_t hs, float *out) {
    rope(q, n_tok, n_heads, hs, cos, sin);
    rope(k, n_tok, kv_heads, hs, cos, sin);
    int64_t max_pos = 0;
    for (int64_t t = 0; t < n_tok; t++) {
        max_pos = positions[t] > max_pos ? positions[t] : max_pos;
        for (int64_t h = 0; h < kv_heads; h++) {
            int64_t at = ((slots[t] * kv_heads + h) * seq_len + positions[t]) * hs;
            memcpy(kc + at, k + (t * kv_heads + h) * hs, hs * sizeof(float));
            memcpy(vc + at, v + (t * kv_heads + h) * hs, hs * sizeof(float));
        }
    }
    int64_t group = n_heads / kv_heads;
    float scale = 1.0f / sqrtf((float)hs);
#pragma omp parallel if (n_tok * n_heads > 1)
    {
        float *scores = malloc((max_pos + 1) * sizeof(float));
#pragma omp for schedule(static, 1)
        for (int64_t task = 0; task < n_tok * n_heads; task++) {
            int64_t h = task / n_tok, t = task % n_tok, n_pos = positions[t] + 1;
            int64_t head = (slots[t] * kv_heads + h / group) * seq_len * hs;
            float max = attention_scores(q + (t * n_heads + h) * hs, kc + head, n_pos, hs, scale, scores);
            float sum = softmax_weights(scores, n_pos, max);
            attention_output(scores, vc + head, n_pos, hs, sum, out + (t * n_heads + h) * hs);
        }
        free(scores);
    }
}

/* ------------------------------------------------------------------- a whole decode step's layers */

/* One layer's weights: its matrices as the products take them (wq/wk/wv and w1/w3 stacked into one
 * call's output) and its two RMSNorm weights. */
typedef struct {
    Mat qkv[3], wo, w13[2], w2;
    const float *rms_att, *rms_ffn;
} Layer;

typedef struct {
    int64_t n_layers, dim, hidden_dim, n_heads, kv_heads, head_size;
    int64_t gs; /* Q8_0 group size of every layer matrix, 0 for fp32 */
    float eps;
    const Layer *layers;
    /* what surrounds the layers in a decode step (forward_step) */
    const float *embeddings; /* (vocab, dim) fp32 */
    const float *cos, *sin;  /* RoPE tables (n_positions, head_size / 2) */
    int64_t n_positions;
    Mat cls;                 /* the classifier, (vocab, dim) */
    int64_t cls_gs;          /* its Q8_0 group size, 0 for fp32 */
    const float *rms_final;
} Model;

static void product(const Model *m, const float *x, int64_t n_tok, int64_t n, const Mat *mats, int n_mats, float *out,
                    const Fusion *f) {
    if (m->gs) matmul_q8(x, n_tok, n, m->gs, mats, n_mats, out, f);
    else matmul_f32(x, n_tok, n, mats, n_mats, out, f);
}

/* Every transformer block for n_tok decode-sized tokens (engine.py's math, in the order of its plain
 * _block), x (n_tok, dim) updated in place; the caller embeds before and applies the classifier after.
 * Per layer: qkv = W·rms(x); attention_step (RoPE, cache writes at each token's slot and position,
 * attention); x += Wo·att; h = W1·rms(x), W3·rms(x); x += W2·(silu(h1) * h3). The cache arrays are
 * (n_layers, n_slots, kv_heads, seq_len, head_size). One call per step instead of five per layer: at
 * the sizes where decode is fast, Python's per-call cost was most of a step. */
static void forward_layers(const Model *m, float *x, int64_t n_tok, const float *cos, const float *sin, float *kc,
                           float *vc, int64_t n_slots, int64_t seq_len, const int64_t *slots, const int64_t *positions) {
    int64_t dim = m->dim, kv_dim = m->kv_heads * m->head_size, layer_cache = n_slots * kv_dim * seq_len;
    float *qkv = malloc(n_tok * (dim + 2 * kv_dim) * sizeof(float));
    float *att = malloc(n_tok * dim * sizeof(float));
    float *h13 = malloc(2 * n_tok * m->hidden_dim * sizeof(float));
    for (int64_t l = 0; l < m->n_layers; l++) {
        const Layer *ly = &m->layers[l];
        Fusion norm_att = {ly->rms_att, m->eps, NULL, 0}, norm_ffn = {ly->rms_ffn, m->eps, NULL, 0};
        Fusion residual = {NULL, 0.0f, NULL, 1}, gated = {NULL, 0.0f, h13 + n_tok * m->hidden_dim, 1};
        product(m, x, n_tok, dim, ly->qkv, 3, qkv, &norm_att);
        attention_step(qkv, qkv + n_tok * dim, qkv + n_tok * (dim + kv_dim), cos, sin, kc + l * layer_cache,
                       vc + l * layer_cache, slots, positions, n_tok, m->n_heads, m->kv_heads, seq_len, m->head_size,
                       att);
        product(m, att, n_tok, dim, &ly->wo, 1, x, &residual);
        product(m, x, n_tok, dim, ly->w13, 2, h13, &norm_ffn);
        product(m, h13, n_tok, m->hidden_dim, &ly->w2, 1, x, &gated);
    }
    free(qkv);
    free(att);
    free(h13);
}

static int out_of_range(const int64_t *a, int64_t n, int64_t end) {
    for (int64_t i = 0; i < n; i++)
        if (a[i] < 0 || a[i] >= end) return 1;
    return 0;
}

/* A whole decode-sized step: embed tokens (n_tok,), look up each position's RoPE row, run every layer
 * (forward_layers), then the final RMSNorm and the classifier for the rows out_rows (n_out,) of the step:
 * logits (n_out, vocab). Returns 0, or before touching anything 1-4 when a token id, a position, a slot
 * or an output row lies outside its table (see kernels_native.STEP_ERRORS). */
int forward_step(const Model *m, const int64_t *tokens, int64_t n_tok, const int64_t *slots,
                  const int64_t *positions, float *kc, float *vc, int64_t n_slots, int64_t seq_len,
                  const int64_t *out_rows, int64_t n_out, float *logits) {
    int64_t dim = m->dim, half = m->head_size / 2;
    if (out_of_range(tokens, n_tok, m->cls.rows)) return 1;
    if (out_of_range(positions, n_tok, seq_len < m->n_positions ? seq_len : m->n_positions)) return 2;
    if (out_of_range(slots, n_tok, n_slots)) return 3;
    if (out_of_range(out_rows, n_out, n_tok)) return 4;
    float *x = malloc(n_tok * dim * sizeof(float));
    float *cos = malloc(n_tok * half * sizeof(float)), *sin = malloc(n_tok * half * sizeof(float));
    for (int64_t t = 0; t < n_tok; t++) {
        memcpy(x + t * dim, m->embeddings + tokens[t] * dim, dim * sizeof(float));
        memcpy(cos + t * half, m->cos + positions[t] * half, half * sizeof(float));
        memcpy(sin + t * half, m->sin + positions[t] * half, half * sizeof(float));
    }
    forward_layers(m, x, n_tok, cos, sin, kc, vc, n_slots, seq_len, slots, positions);
    float *rows = malloc(n_out * dim * sizeof(float));
    for (int64_t i = 0; i < n_out; i++) memcpy(rows + i * dim, x + out_rows[i] * dim, dim * sizeof(float));
    Fusion final_norm = {m->rms_final, m->eps, NULL, 0};
    if (m->cls_gs) matmul_q8(rows, n_out, dim, m->cls_gs, &m->cls, 1, logits, &final_norm);
    else matmul_f32(rows, n_out, dim, &m->cls, 1, logits, &final_norm);
    free(x);
    free(cos);
    free(sin);
    free(rows);
    return 0;
}

/* threads the kernels will use (OMP_NUM_THREADS, --threads): for tests and the bench's machine line */
int kernel_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

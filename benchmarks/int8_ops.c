/* What the AVX2 int8 product's instructions cost on this CPU, without babyllama: the throughput of each of the
 * five instructions a 32-byte step of a Q8_0 row takes on AVX2 without VNNI (|w| and x * sign(w) for maddubs,
 * the int16 pairs widened by madd, the int32 sum), alone and together, then the step itself on weights in L1,
 * L2 and DRAM, beside the same bytes only read, and with two of its five instructions left out (the step that
 * weights stored as w + 128 and 7-bit activations would take: maddubs cannot saturate on those). Cycles are wall
 * time times the clock the first loop measures (a chain of dependent adds, one a cycle), so they hold on a VM
 * without performance counters. -DPREFETCH_BYTES=N: the step asks for each line N bytes ahead, as the AVX2
 * kernels do (babyllama's default on AVX2-only CPUs: 6144).
 *
 *   cc -O2 -mavx2 [-DPREFETCH_BYTES=6144] benchmarks/int8_ops.c -o /tmp/int8_ops && /tmp/int8_ops
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 0
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define REP8(s) s s s s s s s s
#define CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm8", "xmm9"
#define RATE(name, body)                                                                               \
    do {                                                                                               \
        double t = now();                                                                              \
        for (long i = 0; i < n; i++) __asm__ volatile(REP8(body) ::: CLOBBERS);                        \
        printf("  %-40s %.2f cycles\n", name, (now() - t) * ghz * 1e9 / n / 8);                        \
    } while (0)

/* 32 bytes of weights v against activations x in int32 pairs: as the AVX2 kernels compute them (|w| and
 * x * sign(w) for maddubs), or with `signed_pairs` 0 maddubs on the bytes as they are (two instructions fewer) */
static inline __attribute__((always_inline)) __m256i step32(__m256i acc, __m256i v, __m256i x, int signed_pairs) {
    __m256i p = signed_pairs ? _mm256_maddubs_epi16(_mm256_abs_epi8(v), _mm256_sign_epi8(x, v))
                             : _mm256_maddubs_epi16(v, x);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

/* one token's sums over nbytes of weights w against the activations x (a 4 KiB ring), 64 bytes a step */
static inline __attribute__((always_inline)) __m256i sums(const int8_t *w, const int8_t *x, long nbytes,
                                                         int signed_pairs) {
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
    for (long i = 0; i < nbytes; i += 64) {
        if (PREFETCH_BYTES) _mm_prefetch((const char *)(w + i + PREFETCH_BYTES), _MM_HINT_T0);
        acc0 = step32(acc0, _mm256_load_si256((const __m256i *)(w + i)),
                      _mm256_load_si256((const __m256i *)(x + (i & 4095))), signed_pairs);
        acc1 = step32(acc1, _mm256_load_si256((const __m256i *)(w + i + 32)),
                      _mm256_load_si256((const __m256i *)(x + ((i + 32) & 4095))), signed_pairs);
    }
    return _mm256_add_epi32(acc0, acc1);
}

__attribute__((noinline)) static __m256i step_sums(const int8_t *w, const int8_t *x, long nbytes) {
    return sums(w, x, nbytes, 1);
}

__attribute__((noinline)) static __m256i three_ops(const int8_t *w, const int8_t *x, long nbytes) {
    return sums(w, x, nbytes, 0);
}

/* the same bytes read and added, nothing else: what one core streams where the step's arithmetic is absent */
__attribute__((noinline)) static __m256i read_only(const int8_t *w, const int8_t *x, long nbytes) {
    __m256i acc0 = _mm256_load_si256((const __m256i *)x), acc1 = acc0;
    for (long i = 0; i < nbytes; i += 64) {
        acc0 = _mm256_add_epi32(acc0, _mm256_load_si256((const __m256i *)(w + i)));
        acc1 = _mm256_add_epi32(acc1, _mm256_load_si256((const __m256i *)(w + i + 32)));
    }
    return _mm256_add_epi32(acc0, acc1);
}

typedef __m256i (*pass_fn)(const int8_t *, const int8_t *, long);

int main(void) {
    long n = 200000000;
    unsigned long chain = 0;
    double t = now();
    for (long i = 0; i < n; i++) __asm__ volatile(REP8("add $1, %0\n\t") : "+r"(chain));
    double ghz = 8.0 * n / (now() - t) / 1e9;
    printf("clock %.2f GHz; per instruction, 8 independent ones a loop (registers only):\n", ghz);
    RATE("vpmaddubsw", "vpmaddubsw %%ymm8, %%ymm9, %%ymm0\n\t");
    RATE("vpmaddwd", "vpmaddwd %%ymm8, %%ymm9, %%ymm0\n\t");
    RATE("vpsignb", "vpsignb %%ymm8, %%ymm9, %%ymm0\n\t");
    RATE("vpabsb", "vpabsb %%ymm8, %%ymm0\n\t");
    RATE("vpaddd", "vpaddd %%ymm8, %%ymm9, %%ymm0\n\t");
    printf("per group (cycles a group):\n");
    RATE("vpmaddubsw + vpmaddwd", "vpmaddubsw %%ymm8, %%ymm9, %%ymm0\n\tvpmaddwd %%ymm8, %%ymm9, %%ymm1\n\t");
    RATE("a step's five: abs, sign, maddubs, madd, add",
         "vpmaddubsw %%ymm8, %%ymm9, %%ymm0\n\tvpmaddwd %%ymm8, %%ymm9, %%ymm4\n\tvpsignb %%ymm8, %%ymm9, %%ymm1\n\t"
         "vpabsb %%ymm8, %%ymm2\n\tvpaddd %%ymm8, %%ymm9, %%ymm3\n\t");
    printf("the step with its loads, one token (prefetch %d bytes ahead), beside three ops and the bytes only read "
           "(best of several alternating passes):\n", PREFETCH_BYTES);
    int8_t *x = aligned_alloc(64, 4096);
    for (int i = 0; i < 4096; i++) x[i] = (int8_t)rand();
    long sizes_kb[] = {16, 256, 65536};
    int sink = 0;
    for (int k = 0; k < 3; k++) {
        long bytes = sizes_kb[k] * 1024;
        int8_t *w = aligned_alloc(64, bytes);
        for (long i = 0; i < bytes; i++) w[i] = (int8_t)rand();
        double best[3] = {1e9, 1e9, 1e9};
        pass_fn passes_of[3] = {step_sums, three_ops, read_only};
        for (long r = 0, passes = 4 + (1L << 22) / bytes * 8; r < passes; r++) {
            for (int f = 0; f < 3; f++) { /* alternating, so that both meet the same moments of the machine */
                double s = now();
                sink += _mm256_extract_epi32(passes_of[f](w, x, bytes), 0);
                s = now() - s;
                best[f] = s < best[f] ? s : best[f];
            }
        }
        printf("  weights of %6ld KB: step %.2f cycles per 32 bytes, %.1f GB/s; three ops %.2f, %.1f GB/s; "
               "read only %.1f GB/s\n", sizes_kb[k], best[0] / (bytes / 32) * ghz * 1e9, bytes / best[0] / 1e9,
               best[1] / (bytes / 32) * ghz * 1e9, bytes / best[1] / 1e9, bytes / best[2] / 1e9);
        free(w);
    }
    return sink == 42 && chain == 0;
}

/* The native products' arithmetic rates, without Python: a weight matrix small enough for the L2 cache, the
 * best of 200 calls of babyllama's `matmul` (csrc/kernels.c) per weight type and token count, on one thread
 * by default. A rate far above what memory delivers per core means the product is memory-bound in a decode
 * step; one below it means the arithmetic is the limit.
 *
 *   cc -O3 -march=native -fopenmp-simd -pthread benchmarks/kernel_rates.c babyllama/csrc/kernels.c -o /tmp/rates -lm
 *   /tmp/rates [ROWS=1024] [N=768] [THREADS=1] [TYPES=012345: fp32, runq.c Q8_0, Q8_0 blocks, Q4_0, Q4_0
 *   and Q8_0 regrouped as decode steps read them] [CALLS=200]
 *   N: a multiple of 32 (the blocks' size); runq.c's Q8_0 groups are 64 where 64 divides N, else 32, as runq.c
 *   halves its group size until it divides the model's widths
 *   (-march=x86-64-v3 instead: the AVX2 paths)
 *   WEIGHTS_OFFSET=16: the matrix starts 16 bytes past a cache line (NumPy's own start) instead of on one (0, where
 *   babyllama puts the regrouped copies)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels_c_api.h"

int main(int argc, char **argv) {
    int64_t rows = argc > 1 ? atol(argv[1]) : 1024, n = argc > 2 ? atol(argv[2]) : 768;
    int threads = argc > 3 ? atoi(argv[3]) : 1, calls = argc > 5 ? atoi(argv[5]) : 200;
    const char *types = argc > 4 ? argv[4] : "012345";
    int offset = getenv("WEIGHTS_OFFSET") ? atoi(getenv("WEIGHTS_OFFSET")) : 0; /* bytes past a cache line */
    if (offset < 0 || offset > 63) {
        fprintf(stderr, "kernel_rates: WEIGHTS_OFFSET must be in [0, 63], got %d\n", offset);
        return 2;
    }
    if (!*types || strspn(types, "012345") != strlen(types)) { /* a digit outside 0-5 would time nothing */
        fprintf(stderr, "kernel_rates: TYPES must be digits 0-5, got %s\n", types);
        return 2;
    }
    if (rows < 1 || n < 32 || n % 32 != 0) { /* the kernels would compute a product of part of each row */
        fprintf(stderr, "kernel_rates: ROWS must be >= 1 and N a positive multiple of 32, got %ld x %ld\n",
                (long)rows, (long)n);
        return 2;
    }
    int gs = n % 64 == 0 ? 64 : 32;
    char runq_name[32];
    snprintf(runq_name, sizeof runq_name, "Q8_0 (runq.c, gs %d)", gs);
    const char *names[6] = {"fp32",  runq_name,        "Q8_0 (llama.cpp blocks)",
                            "Q4_0", "Q4_0 regrouped", "Q8_0 regrouped"};
    pool_configure(threads, 1, -1);
    printf("%s, %ld x %ld weights, %d thread(s): best of %d calls\n", kernel_isa(), (long)rows, (long)n, threads,
           calls);
    for (int type = 0; type < 6; type++) {
        if (!strchr(types, '0' + type)) continue;
        int64_t bb = type == 3 || type == 4 ? 18 : 34, rb = type == 0 ? 4 * n : type == 1 ? n + 4 * (n / gs) : n / 32 * bb;
        uint8_t *line = aligned_alloc(64, (rows * rb + 64 + 63) / 64 * 64), *w = line + offset;
        for (int64_t i = 0; i < rows * rb; i++) w[i] = (uint8_t)rand();
        if (type == 0)
            for (int64_t i = 0; i < rows * n; i++) ((float *)w)[i] = 0.01f * (float)(i % 7);
        if (type >= 2)
            for (int64_t b = 0; b < rows * n / 32; b++) memcpy(w + b * bb, &(uint16_t){0x2000}, 2); /* fp16 scales */
        float *s = malloc(rows * (n / gs) * sizeof(float));
        for (int64_t i = 0; i < rows * (n / gs); i++) s[i] = 0.01f;
        if (type >= 4 && regroup_in_place(w, rows, n, type == 4 ? 3 : 2)) continue; /* no such kernels here */
        Mat m = {w, type == 1 ? s : NULL, rows, 0, type, type == 0 ? 0 : type == 1 ? gs : 32};
        for (int nt = 1; nt <= 8; nt *= 8) {
            float *x = malloc(nt * n * sizeof(float)), *out = malloc(nt * rows * sizeof(float));
            for (int64_t i = 0; i < nt * n; i++) x[i] = (float)(rand() % 1000) / 500.0f - 1.0f;
            double best = 1e9;
            for (int it = 0; it < calls; it++) {
                double t = now();
                matmul(x, nt, n, &m, 1, out, NULL);
                t = now() - t;
                best = t < best ? t : best;
            }
            printf("  %-24s %d token(s): %8.1f us  %6.1f GB/s of weights  %6.3f ns per 32 weights\n", names[type], nt,
                   best * 1e6, rows * rb / best / 1e9, best * 1e9 / (rows * n / 32));
            free(x);
            free(out);
        }
        free(line);
        free(s);
    }
    return 0;
}

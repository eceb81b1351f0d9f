/* One decode token's worth of babyllama's quantized products (csrc/kernels.c `matmul`), without Python: the
 * matrices of a model shape grouped as a decode step calls them (wq/wk/wv, wo, w1/w3, w2 per layer, then the
 * classifier), random weights in process memory (2 MB pages where the kernel allows); the weight types take
 * turns a token at a time, median of 41 tokens each; Q8_0 and Q4_0 blocks as they are stored and regrouped as
 * the native kernels read them (quant.BlockTensor.regrouped), runq.c's Q8 as stored and packed likewise
 * (formats.QTensor.packed). With the 110M shape the weights
 * (62-116 MB) stream from DRAM as in a real decode step where the last-level cache is a few tens of MB; with 15M
 * (9-16 MB) they stay in the L3 cache; 42M lies between. The 1B shape (TinyLlama-1.1B's, grouped-query attention:
 * 0.58-1.1 GB a type) streams from DRAM where a cache holds 110M's weights (a server CPU's L3 of 100 MB and more);
 * all six types of it take ~5 GB of memory: TYPES picks fewer. Each matrix begins OFFSET bytes into a cache line:
 * 16 by default, where NumPy's large buffers (a model's arrays) begin. Prints ms per token, weight GB/s and the
 * implied tok/s bound per weight type, token count and thread count.
 *
 *   cc -O3 -march=native -fopenmp-simd -pthread benchmarks/decode_rates.c babyllama/csrc/kernels.c -o /tmp/decode -lm
 *   /tmp/decode [SHAPE=110M|42M|15M|1B] [THREADS=1,2] [TOKENS=1,8] [OFFSET=16] [TYPES=123456: runq.c's Q8, Q8_0
 *   blocks, Q4_0, Q4_0 and Q8_0 regrouped, runq.c's Q8 packed]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "kernels_c_api.h"

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int64_t offset = 16; /* bytes into a cache line at which each matrix begins */

/* memory for weights in 2 MB pages where the kernel gives them, as NumPy's buffers get them in a decode step,
 * starting `offset` bytes in */
static uint8_t *weight_memory(int64_t bytes) {
    int64_t huge = 1 << 21, size = (bytes + offset + huge - 1) / huge * huge;
    uint8_t *p = aligned_alloc(huge, size);
    madvise(p, size, MADV_HUGEPAGE);
    return p + offset;
}

/* a random matrix of `rows` rows of n weights of `type` (1: runq.c Q8 with group gs, 2: Q8_0 blocks, 3: Q4_0,
 * 4 and 5: Q4_0 and Q8_0 regrouped as decode steps read them, 6: runq.c's Q8 packed, kernels.c's W_Q8R) */
static int has_scales(int type) { return type == 1 || type == 6; }

static int64_t block_bytes(int type) { return type == 2 || type == 5 ? 34 : 18; }

static Mat matrix(int type, int64_t rows, int64_t n, int gs, int64_t row0) {
    int64_t bytes = has_scales(type) ? rows * n : rows * (n / 32) * block_bytes(type);
    uint8_t *w = weight_memory(bytes);
    for (int64_t i = 0; i < bytes; i++) w[i] = (uint8_t)(rand() >> 7);
    float *s = NULL;
    if (has_scales(type)) {
        s = malloc(rows * (n / gs) * sizeof(float));
        for (int64_t i = 0; i < rows * (n / gs); i++) s[i] = 0.001f;
    } else {
        int64_t bb = block_bytes(type);
        for (int64_t b = 0; b < rows * (n / 32); b++) memcpy(w + b * bb, &(uint16_t){0x1400}, 2);
    }
    if (type == 6) { /* runq.c's values and scales packed into one buffer */
        uint8_t *packed = weight_memory(rows * n + rows * (n / gs) * 4);
        if (regroup_q8((const int8_t *)w, s, packed, rows, n, gs)) { /* no such kernels here */
            free(packed - offset);
            return (Mat){w, s, rows, row0, 1, gs};
        }
        free(w - offset);
        free(s);
        return (Mat){packed, NULL, rows, row0, 8, gs};
    }
    if (type >= 4 && regroup_in_place(w, rows, n, type == 4 ? 3 : 2)) type = type == 4 ? 3 : 2; /* none here */
    return (Mat){w, s, rows, row0, type, type == 1 ? gs : 32};
}

/* one decode token's products over the model's matrices m (L layers of 7, then the classifier) */
static void token(const Mat *m, int64_t L, int64_t d, int64_t h, int nt, const float *x, float *out) {
    for (int64_t l = 0; l < L; l++) {
        const Mat *q = m + 7 * l;
        matmul(x, nt, d, q, 3, out, NULL);
        matmul(x, nt, d, q + 3, 1, out, NULL);
        matmul(x, nt, d, q + 4, 2, out, NULL);
        matmul(x, nt, h, q + 6, 1, out, NULL);
    }
    matmul(x, nt, d, m + 7 * L, 1, out, NULL);
}

/* babyllama.bench.SHAPES: the tinyllamas' and TinyLlama-1.1B's: dim, the keys' and values' width (n_kv_heads *
 * head size), hidden_dim, n_layers */
static const struct {
    const char *name;
    int64_t d, kv, h, L;
} SHAPES[] = {{"15M", 288, 288, 768, 6}, {"42M", 512, 512, 1376, 8}, {"110M", 768, 768, 2048, 12},
              {"1B", 2048, 256, 5632, 22}};

int main(int argc, char **argv) {
    const char *shape = argc > 1 ? argv[1] : "110M";
    const char *thread_list = argc > 2 ? argv[2] : "1,2", *token_list = argc > 3 ? argv[3] : "1,8";
    if (argc > 4) offset = atoi(argv[4]) & 63;
    const char *types = argc > 5 ? argv[5] : "123456";
    int k = 0, n_shapes = (int)(sizeof SHAPES / sizeof SHAPES[0]);
    while (k < n_shapes && strcmp(shape, SHAPES[k].name) != 0) k++;
    if (k == n_shapes) {
        fprintf(stderr, "decode_rates: unknown shape %s (15M, 42M, 110M or 1B)\n", shape);
        return 2;
    }
    int on[7] = {0}, n_on = 0;
    for (int type = 1; type <= 6; type++) n_on += on[type] = strchr(types, '0' + type) != NULL;
    if (!n_on || strspn(types, "123456") != strlen(types)) {
        fprintf(stderr, "decode_rates: TYPES must be digits 1-6, got %s\n", types);
        return 2;
    }
    int64_t d = SHAPES[k].d, kv = SHAPES[k].kv, h = SHAPES[k].h, L = SHAPES[k].L, V = 32000;
    int gs = 64; /* runq.c's group size for the shape: halved until it divides dim and hidden */
    while (d % gs || h % gs) gs /= 2;
    const char *names[7] = {"", "Q8 (runq.c)", "Q8_0 blocks", "Q4_0", "Q4_0 regrouped", "Q8_0 regrouped",
                            "Q8 packed"};
    Mat *models[7];
    int64_t bytes[7] = {0};
    for (int type = 1; type <= 6; type++) {
        if (!on[type]) continue;
        /* per layer: qkv (3 matrices), wo, w13 (2), w2; then the classifier */
        Mat *m = models[type] = malloc((L * 7 + 1) * sizeof(Mat));
        for (int l = 0; l < L; l++) {
            Mat *q = m + 7 * l;
            q[0] = matrix(type, d, d, gs, 0);
            q[1] = matrix(type, kv, d, gs, d);
            q[2] = matrix(type, kv, d, gs, d + kv);
            q[3] = matrix(type, d, d, gs, 0);
            q[4] = matrix(type, h, d, gs, 0);
            q[5] = matrix(type, h, d, gs, h);
            q[6] = matrix(type, d, h, gs, 0);
        }
        m[7 * L] = matrix(type, V, d, gs, 0);
        for (int j = 0; j < 7 * L + 1; j++) {
            int64_t n = j < 7 * L && j % 7 == 6 ? h : d, blocks = m[j].rows * (n / 32);
            bytes[type] += has_scales(type) ? m[j].rows * n + m[j].rows * (n / gs) * 4 : blocks * block_bytes(type);
        }
    }
    /* a decode step prefetches a model's weights as for the cache where they fit in it (forward_step), a product
     * called alone as for memory: here the types' weights together decide, as they take turns in the cache */
    int64_t all_bytes = 0;
    for (int type = 1; type <= 6; type++) all_bytes += bytes[type];
    int cached = all_bytes <= kernel_llc_bytes();
    if (cached) kernel_prefetch_bytes(0, kernel_prefetch_bytes(1, -1));
    printf("%s (int8 rows prefetch %ld bytes ahead: weights %s), %s shape, matrices %ld bytes into a cache line\n",
           kernel_isa(), (long)kernel_prefetch_bytes(0, -1), cached ? "in the last-level cache" : "from memory", shape,
           (long)offset);
    for (const char *tp = thread_list; *tp;) {
        int threads = atoi(tp);
        pool_configure(threads, 1, -1);
        for (const char *kp = token_list; *kp;) {
            int nt = atoi(kp);
            float *x = malloc(nt * h * sizeof(float)), *out = malloc(nt * V * sizeof(float));
            for (int64_t i = 0; i < nt * h; i++) x[i] = (float)(rand() % 1000) / 500.0f - 1.0f;
            /* the types take turns, a token each: a VM's memory bandwidth drifts within seconds, and figures
             * measured one after another compared moments as much as kernels */
            enum { RUNS = 41 };
            double ts[7][RUNS];
            for (int r = -3; r < RUNS; r++)
                for (int type = 1; type <= 6; type++) {
                    if (!on[type]) continue;
                    double t = now();
                    token(models[type], L, d, h, nt, x, out);
                    if (r >= 0) ts[type][r] = now() - t;
                }
            for (int type = 1; type <= 6; type++) {
                if (!on[type]) continue;
                qsort(ts[type], RUNS, sizeof(double), cmp);
                double med = ts[type][RUNS / 2];
                printf("  %-14s %d thread(s) %d token(s): %7.3f ms  %6.1f GB/s  %7.1f steps/s (best %.3f ms)\n",
                       names[type], threads, nt, med * 1e3, bytes[type] / med / 1e9, 1 / med, ts[type][0] * 1e3);
            }
            fflush(stdout);
            free(x);
            free(out);
            while (*kp && *kp != ',') kp++;
            if (*kp) kp++;
        }
        while (*tp && *tp != ',') tp++;
        if (*tp) tp++;
    }
    for (int type = 1; type <= 6; type++) {
        if (!on[type]) continue;
        for (int j = 0; j < 7 * L + 1; j++) {
            free((uint8_t *)models[type][j].w - offset);
            free((void *)models[type][j].s);
        }
        free(models[type]);
    }
    return 0;
}

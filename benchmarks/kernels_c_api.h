/* What the C benchmarks (kernel_rates.c, decode_rates.c, read_streams.c) call in babyllama/csrc/kernels.c,
 * declared as that file defines it (the Mat layout must stay in step with kernels.c's), and their clock. */
#ifndef BABYLLAMA_KERNELS_C_API_H
#define BABYLLAMA_KERNELS_C_API_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    const void *w;
    const float *s;
    int64_t rows, row0;
    int32_t type, gs;
} Mat;
int matmul(const float *x, int64_t n_tok, int64_t n, const Mat *mats, int n_mats, float *out, const void *f);
void pool_configure(int threads, int explicit_threads, int spin_us);
const char *kernel_isa(void);
int64_t kernel_prefetch_bytes(int cached, int64_t set);
int64_t kernel_llc_bytes(void);
uint64_t read_memory(const void *p, int64_t n_pages, int streams);
int regroup_blocks(const uint8_t *src, uint8_t *dst, int64_t rows, int64_t n, int type);
int regroup_q8(const int8_t *q, const float *s, uint8_t *dst, int64_t rows, int64_t n, int64_t gs);

/* the Q4_0 or Q8_0 (type 3 or 2) matrix w (rows, n) regrouped in place (through a copy) as decode steps read it;
 * returns 1 and leaves w as it was where the build has no regrouped kernels */
static inline int regroup_in_place(uint8_t *w, int64_t rows, int64_t n, int type) {
    int64_t bytes = rows * (n / 32) * (type == 3 ? 18 : 34);
    uint8_t *blocks = malloc(bytes);
    memcpy(blocks, w, bytes);
    int kept = regroup_blocks(blocks, w, rows, n, type);
    free(blocks);
    return kept;
}

static inline double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

#endif

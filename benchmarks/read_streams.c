/* How fast this machine's cores read memory as one stream or as several interleaved ones, on 4 KiB pages and on
 * 2 MiB pages, without babyllama: bench's bandwidth probe reads each 64 KiB chunk as one stream (as a product
 * reads its rows) and as four interleaved (a step reads the next 128 bytes of each quarter in turn) and keeps the
 * faster. Hardware prefetchers follow a stream only within a 4 KiB page on many CPUs, so one stream a core may
 * read 4 KiB pages markedly slower than several; decode's weights sit on 2 MiB pages where the kernel gives them
 * (NumPy asks for them). Each line: GB/s per stream count, the medians of 21 passes over 512 MiB, the counts
 * taking turns pass by pass, and each median's ratio to one stream's.
 *
 *   cc -O3 -march=native -fopenmp benchmarks/read_streams.c -o /tmp/read_streams && /tmp/read_streams [THREADS=2]
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* n bytes at p as k streams (parts of n / k), 128 bytes of each in turn */
static uint64_t read_streams(const uint8_t *p, long n, int k) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    long part = n / k;
    for (long i = 0; i < part; i += 128)
        for (int s = 0; s < k; s++) {
            const uint8_t *q = p + s * part + i;
            a0 = _mm256_add_epi64(a0, _mm256_loadu_si256((const __m256i *)q));
            a1 = _mm256_add_epi64(a1, _mm256_loadu_si256((const __m256i *)(q + 32)));
            a2 = _mm256_add_epi64(a2, _mm256_loadu_si256((const __m256i *)(q + 64)));
            a3 = _mm256_add_epi64(a3, _mm256_loadu_si256((const __m256i *)(q + 96)));
        }
    return _mm256_extract_epi64(_mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)), 0);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    long bytes = 512L << 20, chunk = 64 << 10;
    enum { PASSES = 21, COUNTS = 4 };
    const int streams[COUNTS] = {1, 2, 4, 8};
    uint64_t sink = 0;
    omp_set_num_threads(threads);
    for (int huge = 0; huge < 2; huge++) {
        uint8_t *w = aligned_alloc(1 << 21, bytes);
        madvise(w, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
        memset(w, 1, bytes);
        static double t[COUNTS][PASSES];
        for (int r = -1; r < PASSES; r++)
            for (int k = 0; k < COUNTS; k++) {
                double s = now();
#pragma omp parallel for schedule(static) reduction(+ : sink)
                for (long c = 0; c < bytes / chunk; c++) sink += read_streams(w + c * chunk, chunk, streams[k]);
                if (r >= 0) t[k][r] = now() - s;
            }
        printf("%d threads, %s pages, 64 KiB chunks:", threads, huge ? "2 MiB" : "4 KiB");
        double one = 0;
        for (int k = 0; k < COUNTS; k++) {
            qsort(t[k], PASSES, sizeof(double), cmp);
            double gbps = bytes / t[k][PASSES / 2] / 1e9;
            one = k == 0 ? gbps : one;
            printf("  %d stream%s %.1f GB/s (%.2fx)", streams[k], k ? "s" : "", gbps, gbps / one);
        }
        printf("\n");
        free(w);
    }
    return sink == 42;
}

/* How fast this machine's cores read memory as one stream or as several interleaved ones, on 4 KiB pages and on
 * 2 MiB pages: bench's bandwidth probe itself (csrc/kernels.c `read_memory`: every pool thread reads its 64 KiB
 * chunks, each as 1, 2, 4 or 8 streams, a step reading the next bytes of each part in turn; bench keeps the faster
 * of 1 and 4). Hardware prefetchers follow a stream only within a 4 KiB page on many CPUs, so one stream a core
 * may read 4 KiB pages markedly slower than several; decode's weights sit on 2 MiB pages where the kernel gives
 * them (NumPy asks for them). Each line: GB/s per stream count, the medians of 21 passes over 512 MiB, the counts
 * taking turns pass by pass, and each median's ratio to one stream's.
 *
 *   cc -O3 -march=native -fopenmp-simd -pthread benchmarks/read_streams.c babyllama/csrc/kernels.c \
 *       -o /tmp/read_streams -lm && /tmp/read_streams [THREADS=2]
 */
#include <stdio.h>
#include <sys/mman.h>

#include "kernels_c_api.h"

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    int64_t bytes = 512L << 20;
    enum { PASSES = 21, COUNTS = 4 };
    const int streams[COUNTS] = {1, 2, 4, 8};
    uint64_t sink = 0;
    pool_configure(threads, 1, -1);
    for (int huge = 0; huge < 2; huge++) {
        uint8_t *w = aligned_alloc(1 << 21, bytes);
        madvise(w, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
        memset(w, 1, bytes);
        static double t[COUNTS][PASSES];
        for (int r = -1; r < PASSES; r++)
            for (int k = 0; k < COUNTS; k++) {
                double s = now();
                sink += read_memory(w, bytes / 4096, streams[k]);
                if (r >= 0) t[k][r] = now() - s;
            }
        printf("%d thread%s, %s pages, 64 KiB chunks:", threads, threads == 1 ? "" : "s", huge ? "2 MiB" : "4 KiB");
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

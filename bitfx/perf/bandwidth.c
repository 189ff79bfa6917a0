/* Read bandwidth of one core, measured in the same run as the benchmark that quotes it.
 *
 *   bandwidth BYTES REPS   ->   "<best GB/s> <bytes>"
 *
 * Sums a buffer of BYTES bytes (64-byte vectors of uint64, four independent accumulators, so the loop is bound by the
 * loads, not by the adds) REPS times and prints the best pass. BYTES much larger than the last-level cache
 * gives the DRAM streaming rate; a buffer the size of one packed weight gives the rate at which a
 * cache-resident weight can be read (a decode step that reuses the weight every token). The buffer is
 * written once before timing so every page is mapped.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef uint64_t v8 __attribute__((vector_size(64))); /* one zmm, or 2 ymm / 4 xmm */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s BYTES REPS\n", argv[0]);
        return 2;
    }
    size_t bytes = strtoull(argv[1], NULL, 10), reps = strtoull(argv[2], NULL, 10);
    size_t n = bytes / 8 / 32 * 32;
    if (n == 0 || reps == 0) {
        fprintf(stderr, "BYTES must be >= 256 and REPS >= 1\n");
        return 2;
    }
    uint64_t *buf = aligned_alloc(64, n * 8);
    if (!buf) {
        fprintf(stderr, "cannot allocate %zu bytes\n", n * 8);
        return 1;
    }
    for (size_t i = 0; i < n; i++) buf[i] = i * 0x9E3779B97F4A7C15ull;
    double best = 1e30;
    uint64_t sink = 0;
    for (size_t r = 0; r < reps; r++) {
        v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        const v8 *v = (const v8 *)buf;
        double t0 = now();
        for (size_t i = 0; i < n / 8; i += 4) {
            a0 += v[i];
            a1 += v[i + 1];
            a2 += v[i + 2];
            a3 += v[i + 3];
        }
        double dt = now() - t0;
        v8 a = a0 ^ a1 ^ a2 ^ a3;
        for (int j = 0; j < 8; j++) sink += a[j];
        if (dt < best) best = dt;
    }
    printf("%.2f %zu\n", n * 8 / best / 1e9, n * 8);
    fprintf(stderr, "checksum %llu\n", (unsigned long long)sink);
    free(buf);
    return 0;
}

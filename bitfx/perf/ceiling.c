// The binary-GEMM ceiling of this CPU, one thread (DESIGN §5): the best hand-written kernel of the
// bitfx GEMM's loop nest, so benchmarks report bitfx as a fraction of what this very machine can do.
//
//   D[m, n] = K - 2 * popcount(A[m, :] ^ B[:, n])     K bits packed in uint64 words
//
// B is K-major ([W, N] words), so consecutive output columns fill a vector register; each activation
// word is broadcast. AVX-512 + VPOPCNTDQ: a 4 x 32 register tile (16 zmm accumulators), xor ->
// vpopcntq -> add. Elsewhere: a 4 x 8 tile of scalar popcounts (what the compiler makes of it).
// Usage: ceiling M N K [reps] -> "<best us> us <G bit-MACs/s> Gbitmac/s <isa>".  Exit 1 if the
// self-check against a scalar popcount fails, 2 on bad arguments.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#include <immintrin.h>
#define ISA "avx512-vpopcntdq"
#define TM 4
#define TN 32
static void bgemm(const uint64_t *A, const uint64_t *B, float *D, int M, int N, int W, int K) {
  for (int m = 0; m < M; m += TM)
    for (int n = 0; n < N; n += TN) {
      __m512i acc[TM][TN / 8];
      for (int i = 0; i < TM; i++)
        for (int j = 0; j < TN / 8; j++) acc[i][j] = _mm512_setzero_si512();
      for (int w = 0; w < W; w++) {
        __m512i b[TN / 8];
        for (int j = 0; j < TN / 8; j++) b[j] = _mm512_loadu_si512(B + (size_t)w * N + n + 8 * j);
        for (int i = 0; i < TM; i++) {
          __m512i a = _mm512_set1_epi64((long long)A[(size_t)(m + i) * W + w]);
          for (int j = 0; j < TN / 8; j++)
            acc[i][j] = _mm512_add_epi64(acc[i][j], _mm512_popcnt_epi64(_mm512_xor_si512(a, b[j])));
        }
      }
      for (int i = 0; i < TM; i++)
        for (int j = 0; j < TN / 8; j++) {
          __m256i c = _mm512_cvtepi64_epi32(acc[i][j]);
          __m256 f = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_set1_epi32(K), _mm256_slli_epi32(c, 1)));
          _mm256_storeu_ps(D + (size_t)(m + i) * N + n + 8 * j, f);
        }
    }
}
#else
#define ISA "scalar-popcount"
#define TM 4
#define TN 8
static void bgemm(const uint64_t *A, const uint64_t *B, float *D, int M, int N, int W, int K) {
  for (int m = 0; m < M; m += TM)
    for (int n = 0; n < N; n += TN) {
      int64_t acc[TM][TN] = {{0}};
      for (int w = 0; w < W; w++)
        for (int i = 0; i < TM; i++) {
          uint64_t a = A[(size_t)(m + i) * W + w];
          for (int j = 0; j < TN; j++) acc[i][j] += __builtin_popcountll(a ^ B[(size_t)w * N + n + j]);
        }
      for (int i = 0; i < TM; i++)
        for (int j = 0; j < TN; j++) D[(size_t)(m + i) * N + n + j] = (float)(K - 2 * acc[i][j]);
    }
}
#endif

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static uint64_t next(uint64_t *s) {  // splitmix64
  uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: ceiling M N K [reps]\n");
    return 2;
  }
  int M = atoi(argv[1]), N = atoi(argv[2]), K = atoi(argv[3]), reps = argc > 4 ? atoi(argv[4]) : 100;
  if (M <= 0 || N <= 0 || K <= 0 || M % TM || N % TN || K % 64 || reps <= 0) {
    fprintf(stderr, "ceiling: M must be a positive multiple of %d, N of %d, K of 64; got M=%d N=%d K=%d\n",
            TM, TN, M, N, K);
    return 2;
  }
  int W = K / 64;
  uint64_t *A = malloc((size_t)M * W * 8), *B = malloc((size_t)W * N * 8), s = 1;
  float *D = malloc((size_t)M * N * 4);
  for (size_t i = 0; i < (size_t)M * W; i++) A[i] = next(&s);
  for (size_t i = 0; i < (size_t)W * N; i++) B[i] = next(&s);
  bgemm(A, B, D, M, N, W, K);
  for (int m = 0; m < M; m += M / 4 + 1)  // self-check a few outputs against a scalar popcount
    for (int n = 0; n < N; n += N / 4 + 1) {
      int64_t c = 0;
      for (int w = 0; w < W; w++) c += __builtin_popcountll(A[(size_t)m * W + w] ^ B[(size_t)w * N + n]);
      if (D[(size_t)m * N + n] != (float)(K - 2 * c)) {
        fprintf(stderr, "ceiling: self-check failed at m=%d n=%d\n", m, n);
        return 1;
      }
    }
  double best = 1e30;
  for (int r = 0; r < reps; r++) {
    double t = now();
    bgemm(A, B, D, M, N, W, K);
    t = now() - t;
    if (t < best) best = t;
  }
  printf("%.2f us %.1f Gbitmac/s %s\n", best * 1e6, (double)M * N * K / best / 1e9, ISA);
  return 0;
}

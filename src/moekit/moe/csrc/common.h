/* What the native kernels share: AVX2 e^x, and row-major GEMMs through the BLAS's sgemm (the one
   torch links; its address comes from Python, see moekit/moe/native.py). */
#ifndef MOEKIT_COMMON_H
#define MOEKIT_COMMON_H

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* e^x for 8 floats: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so r is exact), e^r by a
   degree-7 polynomial (Cephes' expf coefficients: within 2 ulp), times 2^n built in the exponent
   bits. Inputs are clamped to [-87, 88] (e^-87 is still a normal float). */
static inline __m256 exp8(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

/* 1 / (1 + e^-z) for 8 floats */
static inline __m256 sigmoid8(__m256 z)
{
    const __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), z))));
}

/* The BLAS's Fortran sgemm (column-major). Its integer arguments are read from int64 variables: on
   a little-endian machine an LP64 BLAS (32-bit integers) reads their low halves and an ILP64 one the
   whole, both the right value. */
typedef void (*sgemm_fn)(const char *, const char *, const void *, const void *, const void *, const float *,
                         const float *, const void *, const float *, const void *, const float *, float *,
                         const void *);

/* gemm.c: the same product by moekit's own blocked GEMM, for the calling thread alone; 0, or -2
   when its packing buffers could not be allocated. */
int moekit_gemm(int ta, int tb, int64_t m, int64_t n, int64_t k, const float *A, int64_t lda, const float *B,
                int64_t ldb, float beta, float *C, int64_t ldc);
extern int moekit_gemm_blas; /* 1: every product by the BLAS (moekit_set_gemm) */
/* The calling thread's next product will read op(B) [k, n] at B (row stride ldb; B stored [n, k]
   when tb): the current product's last blocks read its first block ahead, as they do their own next
   ones. For a kernel whose products follow each other (an expert's W_in, its W_out, the next
   expert's W_in): their weights' first blocks otherwise come from memory while the core waits. */
void moekit_gemm_next(int tb, int64_t k, int64_t n, const float *B, int64_t ldb);

/* C [m, n] = op(A) [m, k] op(B) [k, n] + beta C, all row-major with leading dimensions lda, ldb,
   ldc; op(A) = A^T when ta (A stored [k, m]), likewise op(B) when tb (B stored [n, k]). By moekit's
   GEMM (gemm.c) from a few rows on: with AVX-512 from 6 rows, 32 columns and a depth of 16, with
   AVX2 only from 12 rows, 64 columns and a depth of 64; smaller products (a decode step's) by the
   BLAS's, whose small-matrix paths are faster there (benchmarks/bench_native.py --part gemm). A
   row-major matrix is its transpose in column-major terms, so the BLAS computes
   C^T = op(B)^T op(A)^T. */
#ifdef __AVX512F__
#define GEMM_MIN_M 6
#define GEMM_MIN_N 32
#define GEMM_MIN_K 16
#else
#define GEMM_MIN_M 12
#define GEMM_MIN_N 64
#define GEMM_MIN_K 64
#endif
static inline void gemm_rm(sgemm_fn sgemm, int ta, int tb, int64_t m, int64_t n, int64_t k, const float *A, int64_t lda,
                    const float *B, int64_t ldb, float beta, float *C, int64_t ldc)
{
    if (!moekit_gemm_blas && m >= GEMM_MIN_M && n >= GEMM_MIN_N && k >= GEMM_MIN_K &&
        moekit_gemm(ta, tb, m, n, k, A, lda, B, ldb, beta, C, ldc) == 0)
        return;
    const float one = 1.0f;
    sgemm(tb ? "T" : "N", ta ? "T" : "N", &n, &m, &k, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

/* The experts of a token-choice routing (experts.c), what router.c calls after routing. */
int moekit_routed(const float *x, const int64_t *expert_idx, const float *weight, int64_t top_k, int64_t E,
                  const float *w_in, const float *w_out, const float *b_in, const float *b_out, int64_t D,
                  int64_t F, int glu, int act, int64_t A, float *out, float *work, int nthreads, void *sgemm,
                  int64_t block_rows);

#endif

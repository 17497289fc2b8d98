/* Scaled dot-product attention, causal or not, with grouped-query heads, forward and backward, CPU
   float32 (moekit.model.layers.attention). Each thread takes whole (batch, head) units, and within
   one the rows in blocks of BR: a block's scores S = scale Q K^T [BR, T] (causal: only the columns
   up to its last row) come from one sgemm and stay in the thread's buffer, the row softmax runs in
   place (AVX2 e^x), and O = P V is a second sgemm. The backward recomputes P from Q, K and the
   forward's log-sum-exp and runs dV += P^T dO, dP = dO V^T, dS = scale P (dP - rowsum(dO O)),
   dQ = dS K and dK += dS^T Q; a thread takes all the query heads of one key/value head, so dK and dV
   are written by one thread only. No [S, T] tensor exists outside a thread's block.

   PyTorch's flash kernel for the CPU runs its small products (head dim 32) in its own loops; the
   BLAS runs them faster even at K = 32, and a causal block skips the columns past its last row.

   Shape legend: B batch, H query heads, G key/value heads (H = G R), S query rows, T key rows,
   K head dim. Tensors are given by their data pointer and the strides (in floats) of their batch,
   head and row dims; the head dim is contiguous. */

#include "common.h"

#define BR 64 /* query rows per block */

/* Floats of `work` a call needs: per thread two [BR, T] blocks (P, dP) and BR row sums. */
int64_t moekit_attention_work_floats(int64_t T, int nthreads) { return (int64_t)nthreads * (2 * BR * T + BR); }

/* Row r of a block (query row i): p[j] = e^(scale s[j] - m) for j < valid, 0 for valid <= j < n;
   the sum's log plus m is the row's log-sum-exp. With lse given (backward) p[j] = e^(scale s[j] -
   lse) instead. Returns the log-sum-exp. */
static float softmax_row(float *p, int64_t valid, int64_t n, float scale, const float *lse)
{
    float m;
    if (lse) {
        m = *lse;
    } else {
        m = -INFINITY;
        for (int64_t j = 0; j < valid; j++) m = p[j] > m ? p[j] : m;
        m *= scale;
    }
    const __m256 sc = _mm256_set1_ps(scale), mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= valid; j += 8) {
        const __m256 e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(p + j), sc, mv));
        _mm256_storeu_ps(p + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    float lane[8], sum = 0.0f;
    _mm256_storeu_ps(lane, acc);
    for (int l = 0; l < 8; l++) sum += lane[l];
    for (; j < valid; j++) sum += p[j] = expf(p[j] * scale - m);
    for (j = valid; j < n; j++) p[j] = 0.0f;
    if (lse) return m;
    const float inv = 1.0f / sum;
    for (j = 0; j < valid; j++) p[j] *= inv;
    return m + logf(sum);
}

/* out (b, h, s) rows with strides ob, oh, os; lse [B, H, S]. */
void moekit_attention(const float *q, int64_t qb, int64_t qh, int64_t qs, const float *k, int64_t kb, int64_t kh,
                      int64_t ks, const float *v, int64_t vb, int64_t vh, int64_t vs, int64_t B, int64_t H, int64_t G,
                      int64_t S, int64_t T, int64_t K, float scale, int causal, float *out, int64_t ob, int64_t oh,
                      int64_t os, float *lse, float *work, int nthreads, void *sgemm_ptr)
{
    const sgemm_fn sgemm = (sgemm_fn)sgemm_ptr;
    const int64_t R = H / G;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t u = 0; u < B * H; u++) {
        const int64_t b = u / H, h = u % H, g = h / R;
        float *P = work + (int64_t)omp_get_thread_num() * (2 * BR * T + BR);
        const float *Q = q + b * qb + h * qh, *Km = k + b * kb + g * kh, *V = v + b * vb + g * vh;
        for (int64_t i0 = 0; i0 < S; i0 += BR) {
            const int64_t m = S - i0 < BR ? S - i0 : BR, n = causal ? i0 + m : T;
            gemm_rm(sgemm, 0, 1, m, n, K, Q + i0 * qs, qs, Km, ks, 0.0f, P, T); /* Q K^T */
            for (int64_t r = 0; r < m; r++)
                lse[(b * H + h) * S + i0 + r] = softmax_row(P + r * T, causal ? i0 + r + 1 : n, n, scale, NULL);
            gemm_rm(sgemm, 0, 0, m, K, n, P, T, V, vs, 0.0f, out + b * ob + h * oh + i0 * os, os); /* P V */
        }
    }
}

/* dq [B, H, S, K], dk and dv [B, G, T, K], contiguous and written; d_out and out (b, h, s) rows with
   strides db/dh/ds and ob/oh/os. */
void moekit_attention_backward(const float *q, int64_t qb, int64_t qh, int64_t qs, const float *k, int64_t kb,
                               int64_t kh, int64_t ks, const float *v, int64_t vb, int64_t vh, int64_t vs,
                               const float *out, int64_t ob, int64_t oh, int64_t os, const float *d_out, int64_t db,
                               int64_t dh, int64_t ds, const float *lse, int64_t B, int64_t H, int64_t G, int64_t S,
                               int64_t T, int64_t K, float scale, int causal, float *dq, float *dk, float *dv,
                               float *work, int nthreads, void *sgemm_ptr)
{
    const sgemm_fn sgemm = (sgemm_fn)sgemm_ptr;
    const int64_t R = H / G;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t u = 0; u < B * G; u++) {
        const int64_t b = u / G, g = u % G;
        float *P = work + (int64_t)omp_get_thread_num() * (2 * BR * T + BR), *dP = P + BR * T, *Di = dP + BR * T;
        const float *Km = k + b * kb + g * kh, *V = v + b * vb + g * vh;
        float *dK = dk + (b * G + g) * T * K, *dV = dv + (b * G + g) * T * K;
        memset(dK, 0, T * K * sizeof(float));
        memset(dV, 0, T * K * sizeof(float));
        for (int64_t h = g * R; h < (g + 1) * R; h++) {
            const float *Q = q + b * qb + h * qh, *O = out + b * ob + h * oh, *dO = d_out + b * db + h * dh;
            float *dQ = dq + (b * H + h) * S * K;
            for (int64_t i0 = 0; i0 < S; i0 += BR) {
                const int64_t m = S - i0 < BR ? S - i0 : BR, n = causal ? i0 + m : T;
                const float *Qb = Q + i0 * qs, *dOb = dO + i0 * ds;
                gemm_rm(sgemm, 0, 1, m, n, K, Qb, qs, Km, ks, 0.0f, P, T); /* Q K^T, then P */
                for (int64_t r = 0; r < m; r++) {
                    softmax_row(P + r * T, causal ? i0 + r + 1 : n, n, scale, lse + (b * H + h) * S + i0 + r);
                    float d = 0.0f; /* rowsum(dO O) */
                    for (int64_t c = 0; c < K; c++) d += dOb[r * ds + c] * O[(i0 + r) * os + c];
                    Di[r] = d;
                }
                gemm_rm(sgemm, 1, 0, n, K, m, P, T, dOb, ds, 1.0f, dV, K);  /* dV += P^T dO */
                gemm_rm(sgemm, 0, 1, m, n, K, dOb, ds, V, vs, 0.0f, dP, T); /* dP = dO V^T */
                for (int64_t r = 0; r < m; r++) {
                    float *pr = P + r * T, *dpr = dP + r * T;
                    const __m256 d = _mm256_set1_ps(Di[r]), sc = _mm256_set1_ps(scale);
                    int64_t j = 0;
                    for (; j + 8 <= n; j += 8) {
                        const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(dpr + j), d);
                        _mm256_storeu_ps(dpr + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(pr + j), x), sc));
                    }
                    for (; j < n; j++) dpr[j] = pr[j] * (dpr[j] - Di[r]) * scale;
                }
                gemm_rm(sgemm, 0, 0, m, K, n, dP, T, Km, ks, 0.0f, dQ + i0 * K, K); /* dQ = dS K */
                gemm_rm(sgemm, 1, 0, n, K, m, dP, T, Qb, qs, 1.0f, dK, K);         /* dK += dS^T Q */
            }
        }
    }
}

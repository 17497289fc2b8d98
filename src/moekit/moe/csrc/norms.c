/* RMSNorm on CPU float32 rows (moekit.model.layers.RMSNorm), forward and backward in one pass over
   the rows each, threads on contiguous row ranges.

     forward:  r = 1 / sqrt(mean(x^2) + eps), y = x r w   (r kept for the backward)
     backward: with xh = x r and g' = g w: dL/dx = r (g' - xh mean(g' xh)), dL/dw = sum over rows g xh

   torch runs these as 5-8 separate passes over [rows, D] tensors with a temporary each; here a row
   stays in L1 from its first read to its last write. dL/dw is summed per thread into its own [D]
   and the threads' sums are added in thread order (deterministic for a given thread count).

   Shape legend: N rows, D features. */

#include "common.h"

/* sum of squares of a row, eight lanes then the lanes in order */
static float sum_squares(const float *x, int64_t D)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t c = 0;
    for (; c + 16 <= D; c += 16) {
        const __m256 a = _mm256_loadu_ps(x + c), b = _mm256_loadu_ps(x + c + 8);
        s0 = _mm256_fmadd_ps(a, a, s0);
        s1 = _mm256_fmadd_ps(b, b, s1);
    }
    for (; c + 8 <= D; c += 8) {
        const __m256 a = _mm256_loadu_ps(x + c);
        s0 = _mm256_fmadd_ps(a, a, s0);
    }
    float lane[8], s = 0.0f;
    _mm256_storeu_ps(lane, _mm256_add_ps(s0, s1));
    for (int j = 0; j < 8; j++) s += lane[j];
    for (; c < D; c++) s += x[c] * x[c];
    return s;
}

/* y [N, D] = x r w; r [N] (or NULL) gets 1 / rms of each row. */
void moekit_rms_norm(const float *x, const float *w, float eps, int64_t N, int64_t D, float *y, float *r,
                     int nthreads)
{
#pragma omp parallel for num_threads(nthreads) schedule(static) if (N * D >= 16384)
    for (int64_t n = 0; n < N; n++) {
        const float *xn = x + n * D;
        float *yn = y + n * D;
        const float rn = 1.0f / sqrtf(sum_squares(xn, D) / (float)D + eps);
        if (r) r[n] = rn;
        const __m256 rv = _mm256_set1_ps(rn);
        int64_t c = 0;
        for (; c + 8 <= D; c += 8)
            _mm256_storeu_ps(yn + c, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xn + c), rv), _mm256_loadu_ps(w + c)));
        for (; c < D; c++) yn[c] = xn[c] * rn * w[c];
    }
}

/* Floats of `work` the backward needs: a [D] sum of dL/dw per thread. */
int64_t moekit_rms_norm_backward_work_floats(int64_t D, int nthreads) { return (int64_t)nthreads * D; }

/* dx [N, D] (or NULL) and dw [D] (or NULL, written) from x, w, r (forward's) and g = dL/dy. */
void moekit_rms_norm_backward(const float *x, const float *w, const float *r, const float *g, int64_t N, int64_t D,
                              float *dx, float *dw, float *work, int nthreads)
{
    const int parallel = N * D >= 16384;
#pragma omp parallel num_threads(nthreads) if (parallel)
    {
        const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
        float *dw_mine = work + (int64_t)tid * D;
        if (dw) memset(dw_mine, 0, D * sizeof(float));
        const int64_t lo = N * tid / nt, hi = N * (tid + 1) / nt;
        for (int64_t n = lo; n < hi; n++) {
            const float *xn = x + n * D, *gn = g + n * D;
            const float rn = r[n];
            if (dw)
                for (int64_t c = 0; c < D; c++) dw_mine[c] += gn[c] * (xn[c] * rn);
            if (!dx) continue;
            float dot = 0.0f; /* sum of g' xh */
            for (int64_t c = 0; c < D; c++) dot += gn[c] * w[c] * (xn[c] * rn);
            const float mean = dot / (float)D;
            float *dxn = dx + n * D;
            for (int64_t c = 0; c < D; c++) dxn[c] = rn * (gn[c] * w[c] - (xn[c] * rn) * mean);
        }
        if (dw) {
#pragma omp barrier
            const int64_t c0 = D * tid / nt, c1 = D * (tid + 1) / nt;
            for (int64_t c = c0; c < c1; c++) {
                float s = 0.0f;
                for (int p = 0; p < nt; p++) s += work[(int64_t)p * D + c];
                dw[c] = s;
            }
        }
    }
}

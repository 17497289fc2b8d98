/* The LM head and its cross-entropy in one pass (moekit.model.cross_entropy), CPU float32, with each
   thread on its own rows.

   loss = sum over rows n with a target of (logsumexp(z_n) - z_n[target_n]), z_n = h_n W^T (+ b),
   and with `grads` the gradients of scale * loss: dL/dz_n = scale * (softmax(z_n) - onehot) on
   rows with a target (0 on ignored ones), dL/dh = dL/dz W, dL/dW = dL/dz^T h, dL/db = sum dL/dz.

   The rows are cut into nt contiguous ranges of equal size; thread p takes its range in chunks of
   `chunk_rows`: z = h W^T by sgemm into its [rows, V] buffer, then row by row the max, e^(z - max)
   in place (AVX2), its sum, the loss term and the gradient in place, then dL/dh of the chunk and
   dL/dW (+)= dL/dz^T h by sgemm into its own [V, D] accumulator (thread 0's is grad_w). No [N, V]
   tensor exists. After a barrier each thread adds its slice of the other threads' accumulators.
   As the expert kernels, the BLAS runs each product on its calling thread.

   Shape legend: N rows, D model dim, V vocabulary, C rows of a chunk. */

#include "common.h"

/* Floats of `work` a call needs: per thread a [C, V] chunk of logits; for every thread but the
   first a [V, D] accumulator of dL/dW and a [V] one of dL/db. */
int64_t moekit_cross_entropy_work_floats(int64_t D, int64_t V, int nthreads, int64_t chunk_rows)
{
    return (int64_t)nthreads * chunk_rows * V + (int64_t)(nthreads - 1) * (V * D + V);
}

/* z [V] -> e^(z - max) in place; returns the sum of those, *mx_out the max (logsumexp(z) is
   log(sum) + max, softmax(z) is z / sum after). */
static double exp_shifted_row(float *z, int64_t V, float *mx_out)
{
    __m256 mv = _mm256_set1_ps(-INFINITY);
    int64_t v = 0;
    for (; v + 8 <= V; v += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(z + v));
    float lane[8], mx = -INFINITY;
    _mm256_storeu_ps(lane, mv);
    for (int j = 0; j < 8; j++) mx = lane[j] > mx ? lane[j] : mx;
    for (; v < V; v++) mx = z[v] > mx ? z[v] : mx;
    /* four vector sums: 32 lanes of partial sums */
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    const __m256 m = _mm256_set1_ps(mx);
    v = 0;
    for (; v + 32 <= V; v += 32) {
        const __m256 e0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(z + v), m));
        const __m256 e1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(z + v + 8), m));
        const __m256 e2 = exp8(_mm256_sub_ps(_mm256_loadu_ps(z + v + 16), m));
        const __m256 e3 = exp8(_mm256_sub_ps(_mm256_loadu_ps(z + v + 24), m));
        _mm256_storeu_ps(z + v, e0);
        _mm256_storeu_ps(z + v + 8, e1);
        _mm256_storeu_ps(z + v + 16, e2);
        _mm256_storeu_ps(z + v + 24, e3);
        s0 = _mm256_add_ps(s0, e0);
        s1 = _mm256_add_ps(s1, e1);
        s2 = _mm256_add_ps(s2, e2);
        s3 = _mm256_add_ps(s3, e3);
    }
    for (; v + 8 <= V; v += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(z + v), m));
        _mm256_storeu_ps(z + v, e);
        s0 = _mm256_add_ps(s0, e);
    }
    _mm256_storeu_ps(lane, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    double sum = 0.0;
    for (int j = 0; j < 8; j++) sum += lane[j];
    for (; v < V; v++) {
        z[v] = expf(z[v] - mx);
        sum += z[v];
    }
    *mx_out = mx;
    return sum;
}

/* loss_out[0] = the summed loss terms (double); with `grads`, grad_h [N, D] and grad_w [V, D] are
   written and grad_b [V] (or NULL) is added to (the caller zeroes it). h [N, D], W [V, D], bias [V]
   or NULL, targets [N] (ignore_index: no target; the caller checked the others are in [0, V)).
   Returns 0, or -2 if memory ran out (nothing written then). */
int moekit_linear_cross_entropy(const float *h, const float *W, const float *bias, const int64_t *targets,
                                int64_t ignore_index, int64_t N, int64_t D, int64_t V, float scale, int grads,
                                double *loss_out, float *grad_h, float *grad_w, float *grad_b, float *work,
                                int nthreads, void *sgemm_ptr, int64_t chunk_rows)
{
    const sgemm_fn sgemm = (sgemm_fn)sgemm_ptr;
    const int64_t C = chunk_rows;
    double *loss = calloc(nthreads > 0 ? nthreads : 1, sizeof(double));
    int *had_rows = calloc(nthreads > 0 ? nthreads : 1, sizeof(int));
    if (!loss || !had_rows) {
        free(loss);
        free(had_rows);
        return -2;
    }
    float *const accs = work + (int64_t)nthreads * C * V; /* [nthreads - 1][V * D + V] */
#pragma omp parallel num_threads(nthreads)
    {
        const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
        float *z = work + (int64_t)tid * C * V;
        float *gw = tid == 0 ? grad_w : accs + (int64_t)(tid - 1) * (V * D + V);
        float *gb = tid == 0 ? grad_b : accs + (int64_t)(tid - 1) * (V * D + V) + V * D;
        const int64_t lo = N * tid / nt, hi = N * (tid + 1) / nt;
        had_rows[tid] = lo < hi;
        if (grads && tid > 0 && grad_b) memset(gb, 0, V * sizeof(float));
        double my_loss = 0.0;
        for (int64_t r0 = lo; r0 < hi; r0 += C) {
            const int64_t c = hi - r0 < C ? hi - r0 : C;
            const float *h_c = h + r0 * D;
            gemm_rm(sgemm, 0, 1, c, V, D, h_c, D, W, D, 0.0f, z, V); /* z = h W^T */
            for (int64_t i = 0; i < c; i++) {
                float *zi = z + i * V;
                if (bias)
                    for (int64_t v = 0; v < V; v++) zi[v] += bias[v];
                const int64_t t = targets[r0 + i];
                const int valid = t != ignore_index;
                const float target_logit = valid ? zi[t] : 0.0f;
                float mx;
                const double sum = exp_shifted_row(zi, V, &mx);
                if (valid) my_loss += log(sum) + (double)mx - (double)target_logit;
                if (!grads) continue;
                /* dL/dz = scale * (e^(z - max) / sum - onehot) on rows with a target, 0 otherwise */
                const float coef = valid ? (float)(scale / sum) : 0.0f;
                for (int64_t v = 0; v < V; v++) zi[v] *= coef;
                if (valid) zi[t] -= scale;
            }
            if (!grads) continue;
            gemm_rm(sgemm, 0, 0, c, D, V, z, V, W, D, 0.0f, grad_h + r0 * D, D);          /* dL/dh = p W */
            gemm_rm(sgemm, 1, 0, V, D, c, z, V, h_c, D, r0 == lo ? 0.0f : 1.0f, gw, D); /* p^T h */
            if (grad_b)
                for (int64_t i = 0; i < c; i++)
                    for (int64_t v = 0; v < V; v++) gb[v] += z[i * V + v];
        }
        loss[tid] = my_loss;
        if (grads) {
            if (lo >= hi && tid == 0) memset(grad_w, 0, V * D * sizeof(float)); /* no rows: zeros */
#pragma omp barrier
            /* grad_w (+ grad_b) += the other threads' accumulators, each thread its slice */
            const int64_t n0 = V * D * tid / nt, n1 = V * D * (tid + 1) / nt;
            const int64_t b0 = V * tid / nt, b1 = V * (tid + 1) / nt;
            for (int p = 1; p < nt; p++) {
                if (!had_rows[p]) continue;
                const float *a = accs + (int64_t)(p - 1) * (V * D + V);
                for (int64_t i = n0; i < n1; i++) grad_w[i] += a[i];
                if (grad_b)
                    for (int64_t i = b0; i < b1; i++) grad_b[i] += a[V * D + i];
            }
        }
    }
    double total = 0.0;
    for (int p = 0; p < nthreads; p++) total += loss[p];
    loss_out[0] = total;
    free(loss);
    free(had_rows);
    return 0;
}

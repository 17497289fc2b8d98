/* A top-k softmax router (Mixtral, Qwen-MoE, OLMoE) and, after it, the experts: a whole MoE layer's
   inference in one call (moekit_topk_layer), for decode-size batches.

   At a few tokens the layer's time is reading the chosen experts' weights, plus everything around
   it: the router's logits, softmax and top-k, the weights' renormalization and the kernel's
   arguments are a few dozen torch operations, each a trip through the dispatcher. Between two
   layers of a decoding model the caches are flushed by the other layer's weights, and each of
   those trips then misses in the caches on torch's code and data: tens of microseconds apiece,
   together as long as reading a small expert. Here they are a few loops over [T, E] values.

   Shape legend: T tokens, D model dim, E experts, K experts per token. */

#include "common.h"

/* dot(a, b) over n floats, 4 lanes x 8 wide, then summed */
static inline float dot(const float *a, const float *b, int64_t n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    const __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float total = _mm_cvtss_f32(h);
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

/* One token's routing (moekit_topk_route): logits, probs, top-k into lt, pt, it, wt. Returns the
   number of non-finite logits (then it and wt are not written). */
static int64_t route_token(const float *xt, int64_t D, const float *W, const float *b, int64_t E, int64_t K,
                           int renormalize, float *lt, float *pt, int64_t *it, float *wt)
{
    float top = -INFINITY;
    int64_t nonfinite = 0;
    for (int64_t e = 0; e < E; e++) {
        lt[e] = dot(xt, W + e * D, D) + (b ? b[e] : 0.0f);
        if (!isfinite(lt[e])) nonfinite++;
        top = lt[e] > top ? lt[e] : top;
    }
    if (nonfinite) return nonfinite;
    float sum = 0.0f;
    for (int64_t e = 0; e < E; e++) sum += pt[e] = expf(lt[e] - top);
    for (int64_t e = 0; e < E; e++) pt[e] /= sum;
    /* top-k by insertion into the K-long sorted prefix of (idx, weight) */
    float chosen = 0.0f;
    int64_t n = 0;
    for (int64_t e = 0; e < E; e++) {
        const float p = pt[e];
        if (n == K && !(p > wt[K - 1])) continue;
        int64_t j = n < K ? n++ : K - 1;
        for (; j > 0 && p > wt[j - 1]; j--) {
            wt[j] = wt[j - 1];
            it[j] = it[j - 1];
        }
        wt[j] = p;
        it[j] = e;
    }
    for (int64_t k = 0; k < K; k++) chosen += wt[k];
    if (renormalize)
        for (int64_t k = 0; k < K; k++) wt[k] /= chosen;
    return 0;
}

/* Routing work (multiply-adds) below which the tokens are routed on the calling thread alone:
   starting a parallel region, even of one thread, took 20 us of a one-token layer call on the caches
   a decode step's other layers flush, more than routing a few tokens. */
#define ROUTE_SERIAL_MACS (1 << 19)

/* For every token t: logits[t] = W x[t] (+ b) (W [E, D], nn.Linear's layout), probs[t] =
   softmax(logits[t]), and its K largest probabilities, largest first (ties: the lower expert
   first), into idx[t] and weight[t], divided by their sum when `renormalize`. Returns the number of
   non-finite logits (then idx and weight are not written for those tokens). */
int64_t moekit_topk_route(const float *x, int64_t T, int64_t D, const float *W, const float *b, int64_t E,
                          int64_t K, int renormalize, float *logits, float *probs, int64_t *idx, float *weight,
                          int nthreads)
{
    int64_t bad = 0;
    if (T * E * D <= ROUTE_SERIAL_MACS || nthreads == 1) {
        for (int64_t t = 0; t < T; t++)
            bad += route_token(x + t * D, D, W, b, E, K, renormalize, logits + t * E, probs + t * E, idx + t * K,
                               weight + t * K);
        return bad;
    }
#pragma omp parallel for num_threads(nthreads) reduction(+ : bad) schedule(static)
    for (int64_t t = 0; t < T; t++)
        bad += route_token(x + t * D, D, W, b, E, K, renormalize, logits + t * E, probs + t * E, idx + t * K,
                           weight + t * K);
    return bad;
}

/* Calls of moekit_topk_layer so far (the tests count the layer's native calls by it, whichever path
   made them: ctypes or the C++ decode call). */
int64_t moekit_topk_layer_calls = 0;

/* The layer at decode sizes: route (moekit_topk_route), then the experts (moekit_routed, few-row
   regime) into out [T, D], which is cleared first. Returns moekit_routed's status, or 1 when a logit
   was not finite (out untouched). */
int moekit_topk_layer(const float *x, int64_t T, const float *W, const float *b, int64_t K, int renormalize,
                      float *logits, float *probs, int64_t *idx, float *weight, int64_t E, const float *w_in,
                      const float *w_out, const float *b_in, const float *b_out, int64_t D, int64_t F, int glu,
                      int act, float *out, float *work, int nthreads)
{
    moekit_topk_layer_calls++;
    if (moekit_topk_route(x, T, D, W, b, E, K, renormalize, logits, probs, idx, weight, nthreads) > 0) return 1;
    memset(out, 0, (size_t)(T * D) * sizeof(float));
    return moekit_routed(x, idx, weight, K, E, w_in, w_out, b_in, b_out, D, F, glu, act, T * K, out, work, nthreads,
                         NULL, 0);
}

/* moekit_topk_layer with the arguments that do not change between a prepared layer's calls read
   from `args` (int64 each, pointers as integers), in moekit_topk_layer's order without x and out:
   T, W, b, K, renormalize, logits, probs, idx, weight, E, w_in, w_out, b_in, b_out, D, F, glu, act,
   work, nthreads. A decode step calls this after the other layers flushed the caches: through
   ctypes, 3 arguments instead of 22 take about 10 us less. */
int moekit_topk_layer_packed(const float *x, float *out, const int64_t *args)
{
#define PTR(i, type) ((type)(intptr_t)args[i])
    return moekit_topk_layer(x, args[0], PTR(1, const float *), PTR(2, const float *), args[3], (int)args[4],
                             PTR(5, float *), PTR(6, float *), PTR(7, int64_t *), PTR(8, float *), args[9],
                             PTR(10, const float *), PTR(11, const float *), PTR(12, const float *),
                             PTR(13, const float *), args[14], args[15], (int)args[16], (int)args[17], out,
                             PTR(18, float *), (int)args[19]);
#undef PTR
}

/* The experts of an MoE layer for a few tokens (decode and small batches), CPU float32, no autograd.

   With a handful of rows per expert the work is reading the chosen experts' weights once: a 1-8
   row GEMM in MKL streams a cold weight matrix at about half the machine's read bandwidth, and
   every (expert, projection) is a separate call. Here one call runs every expert of the layer,
   each of a thread's weight reads a contiguous stream:

     1. whole experts: with nt threads, the first G - G % nt expert groups go round-robin to the
        threads; thread p runs h = x_rows W_in[e] (+ b_in), a = act(h) (GLU: act(gate) * up) and
        y = a W_out[e] for its groups on its own, reading each expert's weights front to back;
     2. the remaining G % nt groups (all of them when G < nt, e.g. one token's experts on more
        threads than experts) are split: thread p reads input rows [k0, k1) of W_in[e] (a
        contiguous slice), the partial sums of h meet at a barrier, then thread p computes hidden
        columns [f0, f1) of a and reads hidden rows [f0, f1) of W_out[e] (contiguous again);
     3. combine: out[token[n]] += weight[n] * (y[n] + b_out[e]), y summed over threads in (2).

   Every weight byte is read once per pass of up to MR rows. The products are register-blocked:
   up to 4 rows share every weight vector loaded (accumulators in registers), over blocks of DB
   weight rows x CB columns that stay in L1.
   `nthreads` sizes the work buffer; OpenMP may give fewer (nested in a parallel region: one).

   Threads are OpenMP's: compiled with -fopenmp, this library uses the libgomp that torch has
   already loaded (same soname), so it runs on torch's own thread pool.

   Shape legend: T tokens, N sorted rows (assignments), D model dim, F expert hidden dim,
   H = 2F for GLU (gate | up) else F, E experts, G non-empty expert groups. */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MR 32 /* rows of one expert computed per pass over its weights */
#define DB 8   /* weight rows per block */
#define CB 256 /* columns per block: DB x CB floats (8 KiB) stay in L1 while every row uses them */

enum { ACT_SWIGLU = 0, ACT_GEGLU = 1, ACT_GPT_OSS = 2, ACT_RELU = 3, ACT_GELU = 4, ACT_SILU = 5 };

/* h_i[c] += sum_{k < nd} xs_i[k] * W[k * ldw + c] for c < nc, for M rows at once: each weight
   vector is loaded once and used by all M rows, whose accumulators stay in registers. Two column
   vectors per step give 2M independent FMA chains (enough to keep both FMA pipes busy at M = 4). */
/* Without this, gcc folds the weight loads into every FMA that uses them (one load per FMA): the
   load ports, not the FMA units, then bound the loop. An empty asm with the vector as an in/out
   register operand makes the compiler keep the loaded value in a register. */
#define KEEP_IN_REGISTER(v) __asm__("" : "+x"(v))

#define DEFINE_BLOCK(M)                                                                                 \
    static void block_##M(float *const *h, const float *const *xs, const float *W, int64_t ldw, int nd, \
                          int64_t nc)                                                                   \
    {                                                                                                   \
        int64_t c = 0;                                                                                  \
        for (; c + 16 <= nc; c += 16) {                                                                 \
            __m256 lo[M], hi[M];                                                                        \
            for (int i = 0; i < M; i++) {                                                               \
                lo[i] = _mm256_loadu_ps(h[i] + c);                                                      \
                hi[i] = _mm256_loadu_ps(h[i] + c + 8);                                                  \
            }                                                                                           \
            for (int k = 0; k < nd; k++) {                                                              \
                __m256 w_lo = _mm256_loadu_ps(W + k * ldw + c);                                         \
                __m256 w_hi = _mm256_loadu_ps(W + k * ldw + c + 8);                                     \
                KEEP_IN_REGISTER(w_lo);                                                                 \
                KEEP_IN_REGISTER(w_hi);                                                                 \
                for (int i = 0; i < M; i++) {                                                           \
                    const __m256 xv = _mm256_broadcast_ss(xs[i] + k);                                   \
                    lo[i] = _mm256_fmadd_ps(xv, w_lo, lo[i]);                                           \
                    hi[i] = _mm256_fmadd_ps(xv, w_hi, hi[i]);                                           \
                }                                                                                       \
            }                                                                                           \
            for (int i = 0; i < M; i++) {                                                               \
                _mm256_storeu_ps(h[i] + c, lo[i]);                                                      \
                _mm256_storeu_ps(h[i] + c + 8, hi[i]);                                                  \
            }                                                                                           \
        }                                                                                               \
        for (; c + 8 <= nc; c += 8) {                                                                   \
            __m256 acc[M];                                                                              \
            for (int i = 0; i < M; i++) acc[i] = _mm256_loadu_ps(h[i] + c);                             \
            for (int k = 0; k < nd; k++) {                                                              \
                const __m256 w = _mm256_loadu_ps(W + k * ldw + c);                                      \
                for (int i = 0; i < M; i++)                                                             \
                    acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(xs[i] + k), w, acc[i]);                \
            }                                                                                           \
            for (int i = 0; i < M; i++) _mm256_storeu_ps(h[i] + c, acc[i]);                             \
        }                                                                                               \
        for (; c < nc; c++)                                                                             \
            for (int i = 0; i < M; i++) {                                                               \
                float a = h[i][c];                                                                      \
                for (int k = 0; k < nd; k++) a += xs[i][k] * W[k * ldw + c];                            \
                h[i][c] = a;                                                                            \
            }                                                                                           \
    }
DEFINE_BLOCK(1)
DEFINE_BLOCK(2)
DEFINE_BLOCK(3)
DEFINE_BLOCK(4)

/* h_i[c] += sum_{d < K} x_i[d] * W[d * ldw + c] for c < ncols and m rows i (pointers). */
static void rows_times_weight(float *const *h, const float *const *x, int m, const float *W, int64_t ldw,
                              int64_t K, int64_t ncols)
{
    for (int64_t d0 = 0; d0 < K; d0 += DB) {
        const int nd = K - d0 < DB ? (int)(K - d0) : DB;
        for (int64_t c0 = 0; c0 < ncols; c0 += CB) {
            const int64_t nc = ncols - c0 < CB ? ncols - c0 : CB;
            const float *Wb = W + d0 * ldw + c0;
            for (int i = 0; i < m; i += 4) {
                float *hb[4];
                const float *xb[4];
                const int r = m - i < 4 ? m - i : 4;
                for (int j = 0; j < r; j++) {
                    hb[j] = h[i + j] + c0;
                    xb[j] = x[i + j] + d0;
                }
                switch (r) {
                case 1: block_1(hb, xb, Wb, ldw, nd, nc); break;
                case 2: block_2(hb, xb, Wb, ldw, nd, nc); break;
                case 3: block_3(hb, xb, Wb, ldw, nd, nc); break;
                default: block_4(hb, xb, Wb, ldw, nd, nc); break;
                }
            }
        }
    }
}

static inline float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

/* The hidden activation of one unit (the same functions as moekit.moe.activations). */
static inline float activate(int act, float g, float u)
{
    switch (act) {
    case ACT_SWIGLU: return g * sigmoid(g) * u;
    case ACT_GEGLU: {
        const float k = 0.7978845608028654f; /* sqrt(2 / pi): GELU, tanh approximation */
        return 0.5f * g * (1.0f + tanhf(k * (g + 0.044715f * g * g * g))) * u;
    }
    case ACT_GPT_OSS: { /* (up + 1) * g * sigmoid(1.702 g), gate clamped above, up both ways at 7 */
        g = g > 7.0f ? 7.0f : g;
        u = u > 7.0f ? 7.0f : (u < -7.0f ? -7.0f : u);
        return (u + 1.0f) * g * sigmoid(1.702f * g);
    }
    case ACT_RELU: return g > 0.0f ? g : 0.0f;
    case ACT_GELU: return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
    default: return g * sigmoid(g); /* ACT_SILU */
    }
}

/* Floats of `work` a call needs: per thread its [N, D] outputs, two [MR, H] partial sums and
   [MR, F] activations. */
int64_t moekit_few_rows_work_floats(int64_t N, int64_t D, int64_t F, int glu, int nthreads)
{
    const int64_t H = glu ? 2 * F : F;
    return (int64_t)nthreads * (N * D + 2 * MR * H + MR * F);
}

/* out [T, D] += the experts' weighted outputs (out is not cleared here).
   x [T, D]; token [N], weight [N]: token and combine weight of the sorted rows; bounds [G, 3]:
   (expert, start, end) of the non-empty groups; w_in [E, D, H], w_out [E, F, D], b_in [E, H] or
   NULL, b_out [E, D] or NULL; work: moekit_few_rows_work_floats(...) floats. All contiguous. */
void moekit_few_rows(const float *x, const int64_t *token, const float *weight, const int64_t *bounds,
                     int64_t G, const float *w_in, const float *w_out, const float *b_in, const float *b_out,
                     int64_t D, int64_t F, int glu, int act, int64_t N, float *out, float *work, int nthreads)
{
    const int64_t H = glu ? 2 * F : F;
#pragma omp parallel num_threads(nthreads)
    {
        const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
        const int64_t kper = ((D + nt - 1) / nt + DB - 1) / DB * DB;
        const int64_t k0 = tid * kper < D ? tid * kper : D, k1 = k0 + kper < D ? k0 + kper : D;
        const int64_t fper = ((F + nt - 1) / nt + 7) / 8 * 8;
        const int64_t f0 = tid * fper < F ? tid * fper : F, f1 = f0 + fper < F ? f0 + fper : F;
        const int64_t fw = f1 - f0;
        float *y_part = work + (int64_t)tid * N * D;                        /* [N, D] this thread's */
        float *h_part = work + (int64_t)nthreads * N * D;                   /* [2][nt][MR][H] */
        float *a_mine = h_part + 2 * (int64_t)nthreads * MR * H + (int64_t)tid * MR * F; /* [MR][F] */
        /* 1. whole experts: thread p takes groups p, p + nt, ... of the first G - G % nt, each
              expert's weights one contiguous stream, no barrier */
        const int64_t G_whole = G - G % nt;
        for (int64_t g = tid; g < G_whole; g += nt) {
            const int64_t e = bounds[3 * g], s = bounds[3 * g + 1], t = bounds[3 * g + 2];
            for (int64_t r0 = s; r0 < t; r0 += MR) {
                const int m = t - r0 < MR ? (int)(t - r0) : MR;
                const float *xr[MR];
                float *hr[MR], *ar[MR], *yr[MR];
                for (int i = 0; i < m; i++) {
                    xr[i] = x + token[r0 + i] * D;
                    hr[i] = h_part + (int64_t)tid * MR * H + i * H;
                    ar[i] = a_mine + i * F;
                    yr[i] = y_part + (r0 + i) * D;
                    if (b_in)
                        memcpy(hr[i], b_in + e * H, H * sizeof(float));
                    else
                        memset(hr[i], 0, H * sizeof(float));
                    memset(yr[i], 0, D * sizeof(float));
                }
                rows_times_weight(hr, xr, m, w_in + e * D * H, H, D, H);
                for (int i = 0; i < m; i++)
                    for (int64_t f = 0; f < F; f++) ar[i][f] = activate(act, hr[i][f], glu ? hr[i][F + f] : 0.0f);
                rows_times_weight(yr, (const float *const *)ar, m, w_out + e * F * D, D, F, D);
            }
        }
        /* 2. the other G % nt groups together: thread p reads input rows [k0, k1) of W_in and
              hidden rows [f0, f1) of W_out, partial sums meet at a barrier */
        int64_t pass = 0;
        for (int64_t g = G_whole; g < G; g++) {
            const int64_t e = bounds[3 * g], s = bounds[3 * g + 1], t = bounds[3 * g + 2];
            const float *wi = w_in + e * D * H;
            const float *wo = w_out + (e * F + f0) * D;
            for (int64_t r0 = s; r0 < t; r0 += MR, pass++) {
                /* partial sums alternate between two buffers: a thread writes pass p + 2's only after
                   the barrier of pass p + 1, which every thread passes after reading pass p's */
                float *h_mine = h_part + ((pass & 1) * nt + tid) * (int64_t)MR * H;
                const int m = t - r0 < MR ? (int)(t - r0) : MR;
                const float *xr[MR];
                float *hr[MR], *ar[MR], *yr[MR];
                for (int i = 0; i < m; i++) {
                    xr[i] = x + token[r0 + i] * D + k0;
                    hr[i] = h_mine + i * H;
                    ar[i] = a_mine + i * F;
                    yr[i] = y_part + (r0 + i) * D;
                    memset(hr[i], 0, H * sizeof(float));
                    memset(yr[i], 0, D * sizeof(float));
                }
                rows_times_weight(hr, xr, m, wi + k0 * H, H, k1 - k0, H);
#pragma omp barrier
                for (int i = 0; i < m; i++)
                    for (int64_t f = f0; f < f1; f++) {
                        float gate = b_in ? b_in[e * H + f] : 0.0f;
                        float up = glu && b_in ? b_in[e * H + F + f] : 0.0f;
                        for (int p = 0; p < nt; p++) {
                            const float *hp = h_part + ((pass & 1) * nt + p) * (int64_t)MR * H + i * H;
                            gate += hp[f];
                            if (glu) up += hp[F + f];
                        }
                        ar[i][f - f0] = activate(act, gate, up);
                    }
                rows_times_weight(yr, (const float *const *)ar, m, wo, D, fw, D);
            }
        }
#pragma omp barrier
        /* combine: thread p adds model columns [c0, c1) of every row (repeated tokens never race) */
        const int64_t cper = (D + nt - 1) / nt;
        const int64_t c0 = tid * cper < D ? tid * cper : D, c1 = c0 + cper < D ? c0 + cper : D;
        for (int64_t g = 0; g < G; g++) {
            const int64_t e = bounds[3 * g], s = bounds[3 * g + 1], t = bounds[3 * g + 2];
            for (int64_t n = s; n < t; n++) {
                float *o = out + token[n] * D;
                const float w = weight[n];
                if (g < G_whole) { /* one thread's output */
                    const float *yo = work + (int64_t)(g % nt) * N * D + n * D;
                    for (int64_t c = c0; c < c1; c++) o[c] += w * (yo[c] + (b_out ? b_out[e * D + c] : 0.0f));
                    continue;
                }
                for (int64_t c = c0; c < c1; c++) {
                    float y = b_out ? b_out[e * D + c] : 0.0f;
                    for (int p = 0; p < nt; p++) y += work[(int64_t)p * N * D + n * D + c];
                    o[c] += w * y;
                }
            }
        }
    }
}

/* Straight from a token-choice routing: assignment a (of A = T * top_k, token-major) sends token
   a / top_k to expert expert_idx[a] with combine weight weight[a]; out [T, D] += the weighted outputs.
   The sort of the assignments by expert (stable, counting) that a dispatcher would do in torch is
   done here. Returns 0, -1 if an expert index is outside [0, E), -2 if memory ran out (then out is
   untouched). */
int moekit_routed(const float *x, const int64_t *expert_idx, const float *weight, int64_t top_k, int64_t E,
                  const float *w_in, const float *w_out, const float *b_in, const float *b_out, int64_t D,
                  int64_t F, int glu, int act, int64_t A, float *out, float *work, int nthreads)
{
    for (int64_t a = 0; a < A; a++)
        if (expert_idx[a] < 0 || expert_idx[a] >= E) return -1;
    int64_t *start = calloc(E + 1, sizeof(int64_t));
    int64_t *token = malloc((A > 0 ? A : 1) * sizeof(int64_t));
    int64_t *bounds = malloc(3 * (E > 0 ? E : 1) * sizeof(int64_t));
    float *w_sorted = malloc((A > 0 ? A : 1) * sizeof(float));
    int status = -2;
    if (start && token && bounds && w_sorted) {
        for (int64_t a = 0; a < A; a++) start[expert_idx[a] + 1]++;
        int64_t G = 0;
        for (int64_t e = 0; e < E; e++) {
            if (start[e + 1] > 0) {
                bounds[3 * G] = e;
                bounds[3 * G + 1] = start[e];
                bounds[3 * G + 2] = start[e] + start[e + 1];
                G++;
            }
            start[e + 1] += start[e]; /* start[e]: first slot of expert e */
        }
        for (int64_t a = 0; a < A; a++) { /* in order of a: stable within an expert */
            const int64_t slot = start[expert_idx[a]]++;
            token[slot] = a / top_k;
            w_sorted[slot] = weight[a];
        }
        moekit_few_rows(x, token, w_sorted, bounds, G, w_in, w_out, b_in, b_out, D, F, glu, act, A, out, work,
                        nthreads);
        status = 0;
    }
    free(start);
    free(token);
    free(bounds);
    free(w_sorted);
    return status;
}

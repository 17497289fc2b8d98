/* The experts of an MoE layer, CPU float32, in one call per layer: sort by expert (moekit_routed),
   the experts' products, activation and the weighted combine. Two regimes:

   A. A few rows per expert (decode and small batches: moekit_few_rows). The work is reading the
      chosen experts' weights once: a 1-8 row GEMM in MKL streams a cold weight matrix at about half
      the machine's read bandwidth, and every (expert, projection) is a separate call. Here each of a
      thread's weight reads is a contiguous stream:

        1. whole experts: with nt threads, the first G - G % nt expert groups go round-robin to the
           threads; thread p runs h = x_rows W_in[e] (+ b_in), a = act(h) (GLU: act(gate) * up) and
           y = a W_out[e] for its groups on its own, reading each expert's weights front to back;
        2. the remaining G % nt groups (all of them when G < nt, e.g. one token's experts on more
           threads than experts) are split: thread p reads input rows [k0, k1) of W_in[e] (a
           contiguous slice), the partial sums of h meet at a barrier, then thread p computes hidden
           columns [f0, f1) of a and reads hidden rows [f0, f1) of W_out[e] (contiguous again);
        3. combine: out[token[n]] += weight[n] * (y[n] + b_out[e]), y summed over threads in (2).

      Every weight byte is read once per pass of up to MR rows. The products are register-blocked:
      up to 4 rows share every weight vector loaded (accumulators in registers). With AVX-512, 1-2
      rows read WR whole weight rows at a time (rows_times_weight_wide); more rows, and AVX2 builds,
      go by blocks of DB weight rows x CB columns that stay in L1 (one row alone on AVX2: one weight
      row at a time, row_times_weight).

   B. Many rows per expert (prefill, batches and training: moekit_many_rows). The work is arithmetic, and the
      BLAS's GEMM (the sgemm torch links, passed in as a function pointer) runs it near its best when
      each call has a whole thread to itself: a multi-threaded GEMM per expert and projection pays a
      fork/join and splits small products thinly, and the gathers, activation and combine around it
      are separate passes over memory in torch. Here the sorted rows are cut into nt contiguous
      ranges of equal size (equal FLOPs), and thread p, on its own, for blocks of up to `block_rows`
      rows of one expert in its range: gathers the rows' inputs, h = x W_in[e] (+ b_in) by sgemm,
      a = act(h) in place while h is in cache, y = a W_out[e] by sgemm, and adds weight * (y + b_out)
      into its own [T, D] accumulator (thread 0's is `out`); the accumulators are summed at the end.
      Called inside the parallel region, the BLAS runs each product on the calling thread.
      Training uses this regime at every size: the forward also saves the pre-activation hidden
      (h_save), and moekit_many_rows_backward runs the gradients over the same row ranges.

   `nthreads` sizes the work buffer; OpenMP may give fewer (nested in a parallel region: one).
   Threads are OpenMP's: compiled with -fopenmp, this library uses the libgomp that torch has
   already loaded (same soname), so it runs on torch's own thread pool.

   Shape legend: T tokens, N sorted rows (assignments), D model dim, F expert hidden dim,
   H = 2F for GLU (gate | up) else F, E experts, G non-empty expert groups. */

#include "common.h"

/* ------------------------------------------------- A. few rows: register-blocked streaming */

#define MR 32 /* rows of one expert computed per pass over its weights */
#define DB 8   /* weight rows per block */
#define CB 256 /* columns per block: DB x CB floats (8 KiB) stay in L1 while every row uses them */
/* Weight rows of at most this many floats (4 KiB, within a page) are read DB at a time only a few
   KiB each: streams too short for the hardware prefetcher, which tracks each page on its own. The
   loop prefetches the line the next block will read. Measured with cold weights, one call per layer
   of 12, in turns with the loop without it: the fine-grained layer (W_in rows 512, W_out 512) at 1
   and 8 tokens 12 -> 15 GB/s, the Mixtral-like one (W_out rows 512) +4-18%. Longer rows (the
   Mixtral-like W_in, 2816 floats) get the line 512 bytes ahead in the same row instead: its layer at
   8-64 tokens 1.02-1.11x (caches flushed, in turns, `bench_native.py --baseline`). */
#define PREFETCH_MAX_LDW 1024

enum { ACT_SWIGLU = 0, ACT_GEGLU = 1, ACT_GPT_OSS = 2, ACT_RELU = 3, ACT_GELU = 4, ACT_SILU = 5 };

/* h_i[c] += sum_{k < nd} xs_i[k] * W[k * ldw + c] for c < nc, for M rows at once: each weight
   vector is loaded once and used by all M rows, whose accumulators stay in registers. Two column
   vectors per step give 2M independent FMA chains (enough to keep both FMA pipes busy at M = 4). */
/* Without this, gcc folds the weight loads into every FMA that uses them (one load per FMA): the
   load ports, not the FMA units, then bound the loop. An empty asm with the vector as an in/out
   register operand makes the compiler keep the loaded value in a register. */
#define KEEP_IN_REGISTER(v) __asm__("" : "+x"(v))

#define DEFINE_BLOCK(M)                                                                                 \
    static inline __attribute__((always_inline)) void block_##M(float *const *h, const float *const *xs, \
                                                                const float *W, int64_t ldw, int nd,     \
                                                                int64_t nc)                              \
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
                if (ldw <= PREFETCH_MAX_LDW) /* this line of the next block's row: see PREFETCH_MAX_LDW */ \
                    _mm_prefetch((const char *)(W + (k + DB) * ldw + c), _MM_HINT_T0);                  \
                else /* 512 bytes ahead in this row */                                                  \
                    _mm_prefetch((const char *)(W + k * ldw + c + 128), _MM_HINT_T0);                   \
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

/* One block of m <= 4 rows. A full block (nd == DB, all but a weight's last rows) runs with the row
   count a constant, so the loop over the DB rows unrolls: its 2 x DB weight loads are all in flight
   at once. With the count a variable the streams read at 23-29 GB/s against a sum's 47-51 in
   isolation (cold weights, 2 threads; one token through the Mixtral-like expert, 1 to 4 rows, and
   the fine-grained one); unrolled, 35-45 GB/s. */
static void block_rows(int m, float *const *h, const float *const *xs, const float *W, int64_t ldw, int nd,
                       int64_t nc)
{
#define BLOCK_CASE(M)                                         \
    case M:                                                   \
        if (nd == DB)                                         \
            block_##M(h, xs, W, ldw, DB, nc);                 \
        else                                                  \
            block_##M(h, xs, W, ldw, nd, nc);                 \
        break;
    switch (m) {
    BLOCK_CASE(1)
    BLOCK_CASE(2)
    BLOCK_CASE(3)
    default: BLOCK_CASE(4)
    }
#undef BLOCK_CASE
}

#ifdef __AVX512F__
/* h_i[c] += sum_{d < K} x_i[d] * W[d * ldw + c] for c < ncols and m <= 2 rows, with AVX-512: the
   weight is read WR whole rows at a time (one contiguous stretch of memory where ldw == ncols), each
   16-column vector of them loaded once and used by every row, whose h is loaded and stored once per
   WR weight rows. No software prefetch: whole rows are streams the hardware prefetcher follows.
   Against one weight row at a time (AVX2, a prefetch 2 KiB ahead: the loop before), one token
   through the Mixtral-like and the fine-grained experts, 2 threads, caches flushed, in a C harness
   against a plain sum of the same bytes: when the host's read bandwidth is high (85-91 GB/s) 1.04-1.06x
   the sum's time against 1.20-1.25x (4 rows at a time 1.12-1.17x, 16 rows 1.05-1.08x); at 52-55 GB/s
   1.02-1.05x against 1.06-1.09x. h's load and store for every weight row were what held it back (the
   same loop with h in registers instead: 0.99-1.05x). Against the blocks (below), in turns, six
   Mixtral-like or eight fine-grained experts on two threads: 1 row 1.01-1.14x of the sum against
   1.27-1.46x, 2 rows 1.22-1.58x against 1.33-1.40x (better in three of four runs), but 3 rows
   1.34-1.58x against 1.22-1.43x and 4 rows 1.47-1.94x against 1.22-1.49x: from 3 rows on the blocks
   stay (neither 2-4 partial sums per row, i.e. shorter FMA chains, nor 16 weight rows per pass, nor
   the weight vectors pinned in registers changed that). In the layer (`bench_native.py --baseline`,
   caches flushed, in turns with the loop before), with 1-4 rows here: one token 0.99-1.11x, 8 tokens
   1.06-1.09x, both shapes; 16 and 64 tokens unchanged (0.98-1.05x); then 1-2 rows here against 1-4:
   1.00-1.02x at 8 and 16 tokens (four runs). */
#define WR 8
#define DEFINE_WIDE(M)                                                                                  \
    static inline __attribute__((always_inline)) void wide_##M(float *const *hp, const float *const *x, \
                                                               const float *W, int64_t ldw, int64_t d,  \
                                                               int nd, int64_t ncols)                   \
    {                                                                                                   \
        /* local copies of x's values and of the row pointers: h's stores can alias neither, so neither \
           is read again after every store (1.16-1.21x of a plain read against 1.26-1.27x at 2 rows) */  \
        float xs[M][WR], *restrict h[M];                                                                \
        for (int i = 0; i < M; i++) {                                                                   \
            h[i] = hp[i];                                                                               \
            for (int r = 0; r < nd; r++) xs[i][r] = x[i][d + r];                                        \
        }                                                                                               \
        const float *Wd = W + d * ldw;                                                                  \
        int64_t c = 0;                                                                                  \
        for (; c + 16 <= ncols; c += 16) {                                                              \
            __m512 w[WR];                                                                               \
            for (int r = 0; r < nd; r++) w[r] = _mm512_loadu_ps(Wd + r * ldw + c);                      \
            for (int i = 0; i < M; i++) {                                                               \
                __m512 acc = _mm512_loadu_ps(h[i] + c);                                                 \
                for (int r = 0; r < nd; r++) acc = _mm512_fmadd_ps(_mm512_set1_ps(xs[i][r]), w[r], acc); \
                _mm512_storeu_ps(h[i] + c, acc);                                                        \
            }                                                                                           \
        }                                                                                               \
        if (c < ncols) { /* the last columns, masked */                                                 \
            const __mmask16 k = (__mmask16)((1u << (ncols - c)) - 1);                                   \
            for (int i = 0; i < M; i++) {                                                               \
                __m512 acc = _mm512_maskz_loadu_ps(k, h[i] + c);                                        \
                for (int r = 0; r < nd; r++)                                                            \
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(xs[i][r]), _mm512_maskz_loadu_ps(k, Wd + r * ldw + c), acc); \
                _mm512_mask_storeu_ps(h[i] + c, k, acc);                                                \
            }                                                                                           \
        }                                                                                               \
    }
DEFINE_WIDE(1)
DEFINE_WIDE(2)

static void rows_times_weight_wide(float *const *h, const float *const *x, int m, const float *W, int64_t ldw,
                                   int64_t K, int64_t ncols)
{
#define WIDE_CASE(M)                                                                 \
    case M:                                                                          \
        for (d = 0; d + WR <= K; d += WR) wide_##M(h, x, W, ldw, d, WR, ncols);     \
        if (d < K) wide_##M(h, x, W, ldw, d, (int)(K - d), ncols);                   \
        break;
    int64_t d;
    switch (m) {
    WIDE_CASE(1)
    default: WIDE_CASE(2)
    }
#undef WIDE_CASE
}
#else
/* h[c] += sum_{d < K} x[d] * W[d * ldw + c] for c < ncols: one row of x, the weight read row after
   row, one stream front to back, with a prefetch ROW_PREFETCH_BYTES ahead (into the next row at a
   row's end). With one row the blocks' register reuse buys nothing, and their DB short streams at
   once read slower than one: the layer's forward, caches flushed, in turns with the blocks for
   single rows (`python benchmarks/bench_native.py --baseline REF`): one token 1.11-1.15x
   (Mixtral-like) and 1.11-1.18x (fine-grained), 8 tokens 1.01-1.14x; in a C harness the stream reads
   as fast as a plain sum (34 vs 28 GB/s Mixtral-like, 38 vs 31 fine-grained). At two rows and more
   the blocks are as fast or faster. */
#define ROW_PREFETCH_BYTES 2048
static void row_times_weight(float *h, const float *x, const float *W, int64_t ldw, int64_t K, int64_t ncols)
{
    for (int64_t d = 0; d < K; d++) {
        const __m256 xv = _mm256_broadcast_ss(x + d);
        const float *w = W + d * ldw;
        int64_t c = 0;
        for (; c + 16 <= ncols; c += 16) {
            _mm_prefetch((const char *)(w + c) + ROW_PREFETCH_BYTES, _MM_HINT_T0);
            _mm256_storeu_ps(h + c, _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + c), _mm256_loadu_ps(h + c)));
            _mm256_storeu_ps(h + c + 8, _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + c + 8), _mm256_loadu_ps(h + c + 8)));
        }
        for (; c < ncols; c++) h[c] += x[d] * w[c];
    }
}
#endif

/* h_i[c] += sum_{d < K} x_i[d] * W[d * ldw + c] for c < ncols and m rows i (pointers). */
static void rows_times_weight(float *const *h, const float *const *x, int m, const float *W, int64_t ldw,
                              int64_t K, int64_t ncols)
{
#ifdef __AVX512F__
    if (m <= 2) {
        rows_times_weight_wide(h, x, m, W, ldw, K, ncols);
        return;
    }
#else
    if (m == 1) {
        row_times_weight(h[0], x[0], W, ldw, K, ncols);
        return;
    }
#endif
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
                block_rows(r, hb, xb, Wb, ldw, nd, nc);
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

/* out[i] = act(gate[i], up[i]) for i < n (up unused without GLU); out may be gate (in place). The
   activations other than GELU with erf run 8 at a time; a tail and GELU take `activate`. */
static void activate_row(int act, const float *gate, const float *up, float *out, int64_t n)
{
    int64_t i = 0;
    if (act != ACT_GELU)
        for (; i + 8 <= n; i += 8) {
            __m256 g = _mm256_loadu_ps(gate + i), y;
            switch (act) {
            case ACT_SWIGLU: y = _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(g)), _mm256_loadu_ps(up + i)); break;
            case ACT_GEGLU: { /* 0.5 g (1 + tanh(z)) = g sigmoid(2z), z = sqrt(2 / pi) (g + 0.044715 g^3) */
                const __m256 g3 = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
                const __m256 z = _mm256_mul_ps(_mm256_set1_ps(2.0f * 0.7978845608028654f),
                                               _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), g3, g));
                y = _mm256_mul_ps(_mm256_mul_ps(g, sigmoid8(z)), _mm256_loadu_ps(up + i));
                break;
            }
            case ACT_GPT_OSS: {
                const __m256 seven = _mm256_set1_ps(7.0f);
                g = _mm256_min_ps(g, seven);
                const __m256 u = _mm256_max_ps(_mm256_min_ps(_mm256_loadu_ps(up + i), seven), _mm256_set1_ps(-7.0f));
                const __m256 gs = _mm256_mul_ps(g, sigmoid8(_mm256_mul_ps(_mm256_set1_ps(1.702f), g)));
                y = _mm256_mul_ps(_mm256_add_ps(u, _mm256_set1_ps(1.0f)), gs);
                break;
            }
            case ACT_RELU: y = _mm256_max_ps(g, _mm256_setzero_ps()); break;
            default: y = _mm256_mul_ps(g, sigmoid8(g)); break; /* ACT_SILU */
            }
            _mm256_storeu_ps(out + i, y);
        }
    for (; i < n; i++) out[i] = activate(act, gate[i], up ? up[i] : 0.0f);
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
                for (int i = 0; i < m; i++) activate_row(act, hr[i], glu ? hr[i] + F : NULL, ar[i], F);
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

/* ---------------------------------------------------------------- B. many rows: per-thread GEMMs */

/* C [m, n] = A [m, k] B [k, n] + beta C, row-major */
static void gemm_rows(sgemm_fn sgemm, int64_t m, int64_t n, int64_t k, const float *A, int64_t lda, const float *B,
                      int64_t ldb, float beta, float *C, int64_t ldc)
{
    gemm_rm(sgemm, 0, 0, m, n, k, A, lda, B, ldb, beta, C, ldc);
}

/* Floats of `work` a call needs: per thread a block's [rows, D] inputs, [rows, H] hidden, [rows, F]
   activations and [rows, D] outputs, and a [T, D] accumulator for every thread but the first. */
int64_t moekit_many_rows_work_floats(int64_t T, int64_t D, int64_t F, int glu, int nthreads, int64_t block_rows)
{
    const int64_t H = glu ? 2 * F : F;
    return (int64_t)nthreads * block_rows * (2 * D + H + F) + (int64_t)(nthreads - 1) * T * D;
}

/* out [T, D] += the experts' weighted outputs (out is not cleared here), the arguments as
   moekit_few_rows's plus T (rows of x and out), the BLAS's sgemm and the rows per block. With
   h_save [N, H] (else NULL), the pre-activation hidden of the sorted rows is written there too (what
   the backward needs). */
void moekit_many_rows(const float *x, const int64_t *token, const float *weight, const int64_t *bounds, int64_t G,
                      const float *w_in, const float *w_out, const float *b_in, const float *b_out, int64_t D,
                      int64_t F, int glu, int act, int64_t N, int64_t T, float *out, float *work, int nthreads,
                      void *sgemm_ptr, int64_t block_rows, float *h_save)
{
    const sgemm_fn sgemm = (sgemm_fn)sgemm_ptr;
    const int64_t H = glu ? 2 * F : F, BM = block_rows;
    float *const accs = work + (int64_t)nthreads * BM * (2 * D + H + F); /* [nthreads - 1][T, D] */
#pragma omp parallel num_threads(nthreads)
    {
        const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
        float *x_b = work + (int64_t)tid * BM * (2 * D + H + F); /* [BM, D] gathered inputs */
        float *h_buf = x_b + BM * D;                             /* [BM, H] hidden (without h_save) */
        float *a_buf = h_buf + BM * H;                           /* [BM, F] activations (with h_save) */
        float *y_b = a_buf + BM * F;                             /* [BM, D] expert outputs */
        float *acc = tid == 0 ? out : accs + (int64_t)(tid - 1) * T * D;
        if (tid > 0) memset(acc, 0, T * D * sizeof(float));
        const int64_t lo = N * tid / nt, hi = N * (tid + 1) / nt; /* this thread's sorted rows */
        for (int64_t g = 0; g < G; g++) {
            const int64_t e = bounds[3 * g];
            const int64_t s = bounds[3 * g + 1] > lo ? bounds[3 * g + 1] : lo;
            const int64_t t = bounds[3 * g + 2] < hi ? bounds[3 * g + 2] : hi;
            for (int64_t r0 = s; r0 < t; r0 += BM) {
                const int64_t m = t - r0 < BM ? t - r0 : BM;
                float *h_b = h_save ? h_save + r0 * H : h_buf;
                /* activations: in place over h's first F columns, or beside a saved h */
                float *a_b = h_save ? a_buf : h_b;
                const int64_t lda = h_save ? F : H;
                for (int64_t i = 0; i < m; i++) {
                    memcpy(x_b + i * D, x + token[r0 + i] * D, D * sizeof(float));
                    if (b_in) memcpy(h_b + i * H, b_in + e * H, H * sizeof(float));
                }
                moekit_gemm_next(0, F, D, w_out + e * F * D, D); /* read ahead: this expert's W_out */
                gemm_rows(sgemm, m, H, D, x_b, D, w_in + e * D * H, H, b_in ? 1.0f : 0.0f, h_b, H);
                for (int64_t i = 0; i < m; i++)
                    activate_row(act, h_b + i * H, glu ? h_b + i * H + F : NULL, a_b + i * lda, F);
                if (r0 + BM >= t && g + 1 < G && bounds[3 * (g + 1) + 1] < hi) /* then the next expert's W_in */
                    moekit_gemm_next(0, D, H, w_in + bounds[3 * (g + 1)] * D * H, H);
                gemm_rows(sgemm, m, D, F, a_b, lda, w_out + e * F * D, D, 0.0f, y_b, D);
                for (int64_t i = 0; i < m; i++) {
                    float *o = acc + token[r0 + i] * D;
                    const float *y = y_b + i * D, w = weight[r0 + i];
                    if (b_out)
                        for (int64_t c = 0; c < D; c++) o[c] += w * (y[c] + b_out[e * D + c]);
                    else
                        for (int64_t c = 0; c < D; c++) o[c] += w * y[c];
                }
            }
        }
        if (nt > 1) {
#pragma omp barrier
            /* out += the other threads' accumulators, thread p summing token rows [t0, t1) */
            const int64_t t0 = T * tid / nt, t1 = T * (tid + 1) / nt;
            for (int p = 1; p < nt; p++) {
                const float *a = accs + (int64_t)(p - 1) * T * D;
                for (int64_t i = t0 * D; i < t1 * D; i++) out[i] += a[i];
            }
        }
    }
}

/* f(g) and f'(g) for the activations the backward supports (all but GPT-OSS's clamped one, which
   takes torch's path: native.TRAINING_ACTIVATIONS). */
static inline void act_grad(int act, float g, float *value, float *slope)
{
    switch (act) {
    case ACT_SWIGLU:
    case ACT_SILU: {
        const float s = sigmoid(g);
        *value = g * s;
        *slope = s * (1.0f + g * (1.0f - s));
        return;
    }
    case ACT_GEGLU: {
        const float k = 0.7978845608028654f, c = 0.044715f, th = tanhf(k * (g + c * g * g * g));
        *value = 0.5f * g * (1.0f + th);
        *slope = 0.5f * (1.0f + th) + 0.5f * g * (1.0f - th * th) * k * (1.0f + 3.0f * c * g * g);
        return;
    }
    case ACT_GELU:
        *value = 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
        *slope = 0.5f * (1.0f + erff(g * 0.7071067811865476f)) + g * 0.3989422804014327f * expf(-0.5f * g * g);
        return;
    default: /* ACT_RELU */
        *value = g > 0.0f ? g : 0.0f;
        *slope = g > 0.0f ? 1.0f : 0.0f;
    }
}

/* Given dL/da = u for n units, writes a = act(h) and dL/dh. GLU: a = f(gate) * up,
   dgate = u * up * f'(gate), dup = u * f(gate); else a = f(g), dg = u f'(g). SiLU-based ones run 8
   at a time. */
static void activate_backward_row(int act, const float *gate, const float *up, const float *u, float *a,
                                  float *dgate, float *dup, int64_t n)
{
    int64_t i = 0;
    if (act == ACT_SWIGLU || act == ACT_SILU) {
        const __m256 one = _mm256_set1_ps(1.0f);
        for (; i + 8 <= n; i += 8) {
            const __m256 g = _mm256_loadu_ps(gate + i), s = sigmoid8(g), uv = _mm256_loadu_ps(u + i);
            const __m256 f = _mm256_mul_ps(g, s);
            const __m256 slope = _mm256_mul_ps(s, _mm256_fmadd_ps(g, _mm256_sub_ps(one, s), one));
            if (up) {
                const __m256 upv = _mm256_loadu_ps(up + i);
                _mm256_storeu_ps(a + i, _mm256_mul_ps(f, upv));
                _mm256_storeu_ps(dgate + i, _mm256_mul_ps(_mm256_mul_ps(uv, upv), slope));
                _mm256_storeu_ps(dup + i, _mm256_mul_ps(uv, f));
            } else {
                _mm256_storeu_ps(a + i, f);
                _mm256_storeu_ps(dgate + i, _mm256_mul_ps(uv, slope));
            }
        }
    }
    for (; i < n; i++) {
        float f, slope;
        act_grad(act, gate[i], &f, &slope);
        if (up) {
            const float upv = up[i], uv = u[i];
            a[i] = f * upv;
            dgate[i] = uv * upv * slope;
            dup[i] = uv * f;
        } else {
            a[i] = f;
            dgate[i] = u[i] * slope;
        }
    }
}

/* Floats of `work` the backward needs: per thread a block's gathered inputs, output gradients and
   input gradients [rows, D] each, dL/da and a [rows, F] each, dL/dh [rows, H]; for every thread but
   the first a [T, D] accumulator of dL/dx and one expert's partial weight and bias gradients (the
   expert whose rows it shares with the thread before it). */
int64_t moekit_many_rows_backward_work_floats(int64_t T, int64_t D, int64_t F, int glu, int nthreads,
                                              int64_t block_rows)
{
    const int64_t H = glu ? 2 * F : F;
    return (int64_t)nthreads * block_rows * (3 * D + 2 * F + H) + (int64_t)(nthreads - 1) * (T * D + 2 * D * H + H + D);
}

/* The backward of moekit_many_rows (with h_save) for out[t] = sum over t's rows n of
   weight[n] * (act(x[t] W_in[e] + b_in[e]) W_out[e] + b_out[e]), given grad_out = dL/dout [T, D]:
     u = dL/dout[t] W_out[e]^T (unweighted), a = act(h) recomputed from h_save, dL/dh by the activation's
     derivative; dL/dweight[n] = <u, a> + <dL/dout[t], b_out[e]>; then with g = weight[n] dL/dout[t]
     and dh = weight[n] dL/dh: dW_out[e] = sum a^T g, db_out[e] = sum g, dW_in[e] = sum x^T dh,
     db_in[e] = sum dh, dL/dx[t] += dh W_in[e]^T.
   Outputs may be NULL (not needed). grad_x, grad_b_in, grad_b_out are added to (the caller zeroes
   them); grad_w_in and grad_w_out are written for the experts with rows only (the caller zeroes the
   others); grad_weight [N] is written. Threads split the sorted rows as the forward does; an expert
   whose rows two threads share gets the later thread's part through a partial buffer, added after
   a barrier. Returns 0, or -2 if memory ran out (nothing written then). */
int moekit_many_rows_backward(const float *x, const int64_t *token, const float *weight, const int64_t *bounds,
                              int64_t G, const float *w_in, const float *w_out, const float *b_out,
                              const float *h_save, const float *grad_out, int64_t D, int64_t F, int glu, int act,
                              int64_t N, int64_t T, float *grad_x, float *grad_weight, float *grad_w_in,
                              float *grad_w_out, float *grad_b_in, float *grad_b_out, float *work, int nthreads,
                              void *sgemm_ptr, int64_t block_rows)
{
    const sgemm_fn sgemm = (sgemm_fn)sgemm_ptr;
    const int64_t H = glu ? 2 * F : F, BM = block_rows;
    const int64_t per_thread = BM * (3 * D + 2 * F + H), shared = T * D + 2 * D * H + H + D;
    int64_t *part_e = malloc((nthreads > 0 ? nthreads : 1) * sizeof(int64_t)); /* expert of each partial */
    if (!part_e) return -2;
    for (int p = 0; p < nthreads; p++) part_e[p] = -1;
#pragma omp parallel num_threads(nthreads)
    {
        const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
        float *x_b = work + (int64_t)tid * per_thread; /* [BM, D] */
        float *g_b = x_b + BM * D;                     /* [BM, D] dL/dout rows, then weighted */
        float *dx_b = g_b + BM * D;                    /* [BM, D] */
        float *u_b = dx_b + BM * D;                    /* [BM, F] dL/da, unweighted */
        float *a_b = u_b + BM * F;                     /* [BM, F] */
        float *dh_b = a_b + BM * F;                    /* [BM, H] */
        float *mine = work + (int64_t)nthreads * per_thread + (int64_t)(tid > 0 ? tid - 1 : 0) * shared;
        float *acc = tid == 0 ? grad_x : mine;               /* [T, D] dL/dx */
        float *part_w_in = mine + T * D, *part_w_out = part_w_in + D * H;    /* [D, H], [F, D] (D H floats) */
        float *part_b_in = part_w_in + 2 * D * H, *part_b_out = part_b_in + H; /* [H], [D] */
        if (tid > 0 && grad_x) memset(acc, 0, T * D * sizeof(float));
        const int64_t lo = N * tid / nt, hi = N * (tid + 1) / nt;
        for (int64_t g = 0; g < G; g++) {
            const int64_t e = bounds[3 * g];
            const int64_t s = bounds[3 * g + 1] > lo ? bounds[3 * g + 1] : lo;
            const int64_t t = bounds[3 * g + 2] < hi ? bounds[3 * g + 2] : hi;
            if (s >= t) continue;
            const int own = bounds[3 * g + 1] >= lo; /* the group starts here: write its gradients */
            float *gw_in = grad_w_in ? (own ? grad_w_in + e * D * H : part_w_in) : NULL;
            float *gw_out = grad_w_out ? (own ? grad_w_out + e * F * D : part_w_out) : NULL;
            float *gb_in = grad_b_in ? (own ? grad_b_in + e * H : part_b_in) : NULL;
            float *gb_out = grad_b_out ? (own ? grad_b_out + e * D : part_b_out) : NULL;
            if (!own) {
                part_e[tid] = e;
                memset(part_b_in, 0, H * sizeof(float));
                memset(part_b_out, 0, D * sizeof(float));
            }
            for (int64_t r0 = s; r0 < t; r0 += BM) {
                const int64_t m = t - r0 < BM ? t - r0 : BM;
                const float beta = r0 == s ? 0.0f : 1.0f; /* weight gradients: the first block writes */
                const float *h_b = h_save + r0 * H;
                for (int64_t i = 0; i < m; i++) memcpy(g_b + i * D, grad_out + token[r0 + i] * D, D * sizeof(float));
                gemm_rm(sgemm, 0, 1, m, F, D, g_b, D, w_out + e * F * D, D, 0.0f, u_b, F); /* u = g W_out^T */
                for (int64_t i = 0; i < m; i++)
                    activate_backward_row(act, h_b + i * H, glu ? h_b + i * H + F : NULL, u_b + i * F, a_b + i * F,
                                          dh_b + i * H, glu ? dh_b + i * H + F : NULL, F);
                for (int64_t i = 0; i < m; i++) {
                    const float w = weight[r0 + i];
                    float *gi = g_b + i * D, *dhi = dh_b + i * H;
                    if (grad_weight) {
                        float dot = 0.0f;
                        for (int64_t f = 0; f < F; f++) dot += u_b[i * F + f] * a_b[i * F + f];
                        if (b_out)
                            for (int64_t c = 0; c < D; c++) dot += gi[c] * b_out[e * D + c];
                        grad_weight[r0 + i] = dot;
                    }
                    for (int64_t c = 0; c < D; c++) gi[c] *= w;
                    for (int64_t c = 0; c < H; c++) dhi[c] *= w;
                    if (gb_out)
                        for (int64_t c = 0; c < D; c++) gb_out[c] += gi[c];
                    if (gb_in)
                        for (int64_t c = 0; c < H; c++) gb_in[c] += dhi[c];
                }
                if (gw_out) gemm_rm(sgemm, 1, 0, F, D, m, a_b, F, g_b, D, beta, gw_out, D); /* a^T g */
                if (gw_in) {
                    for (int64_t i = 0; i < m; i++) memcpy(x_b + i * D, x + token[r0 + i] * D, D * sizeof(float));
                    gemm_rm(sgemm, 1, 0, D, H, m, x_b, D, dh_b, H, beta, gw_in, H); /* x^T dh */
                }
                if (grad_x) {
                    gemm_rm(sgemm, 0, 1, m, D, H, dh_b, H, w_in + e * D * H, H, 0.0f, dx_b, D); /* dh W_in^T */
                    for (int64_t i = 0; i < m; i++) {
                        float *o = acc + token[r0 + i] * D;
                        const float *d = dx_b + i * D;
                        for (int64_t c = 0; c < D; c++) o[c] += d[c];
                    }
                }
            }
        }
        if (nt > 1) {
#pragma omp barrier
            /* the shared experts' partials, thread by thread in order; this thread adds its slice of
               each (the same slices every time: deterministic) */
            for (int p = 1; p < nt; p++) {
                const int64_t e = part_e[p];
                if (e < 0) continue;
                const float *pm = work + (int64_t)nthreads * per_thread + (int64_t)(p - 1) * shared + T * D;
                if (grad_w_in) {
                    const int64_t n0 = D * H * tid / nt, n1 = D * H * (tid + 1) / nt;
                    for (int64_t i = n0; i < n1; i++) grad_w_in[e * D * H + i] += pm[i];
                }
                if (grad_w_out) {
                    const int64_t n0 = F * D * tid / nt, n1 = F * D * (tid + 1) / nt;
                    for (int64_t i = n0; i < n1; i++) grad_w_out[e * F * D + i] += pm[D * H + i];
                }
                if (tid == 0 && grad_b_in)
                    for (int64_t i = 0; i < H; i++) grad_b_in[e * H + i] += pm[2 * D * H + i];
                if (tid == 0 && grad_b_out)
                    for (int64_t i = 0; i < D; i++) grad_b_out[e * D + i] += pm[2 * D * H + H + i];
            }
            if (grad_x) { /* dL/dx += the other threads' accumulators, thread p summing rows [t0, t1) */
                const int64_t t0 = T * tid / nt, t1 = T * (tid + 1) / nt;
                for (int p = 1; p < nt; p++) {
                    const float *a = work + (int64_t)nthreads * per_thread + (int64_t)(p - 1) * shared;
                    for (int64_t i = t0 * D; i < t1 * D; i++) grad_x[i] += a[i];
                }
            }
        }
    }
    free(part_e);
    return 0;
}

/* -------------------------------------------------------------------------- from a routing */

/* Straight from a token-choice routing: assignment a (of A = T * top_k, token-major) sends token
   a / top_k to expert expert_idx[a] with combine weight weight[a]; out [T, D] += the weighted outputs,
   by moekit_many_rows when `sgemm` is given (with `block_rows`), else by moekit_few_rows. The sort
   of the assignments by expert (stable, counting) that a dispatcher would do in torch is done here. Returns 0, -1 if an expert index is outside [0, E), -2 if memory ran out (then out is
   untouched). */
/* experts and assignments up to which moekit_routed keeps its index arrays on the stack (13 KiB) */
#define ROUTED_STACK 256

int moekit_routed(const float *x, const int64_t *expert_idx, const float *weight, int64_t top_k, int64_t E,
                  const float *w_in, const float *w_out, const float *b_in, const float *b_out, int64_t D,
                  int64_t F, int glu, int act, int64_t A, float *out, float *work, int nthreads, void *sgemm,
                  int64_t block_rows)
{
    for (int64_t a = 0; a < A; a++)
        if (expert_idx[a] < 0 || expert_idx[a] >= E) return -1;
    /* the sort's index arrays: on the stack for a decode-size call (a malloc there found the heap
       cold or trimmed after the other layers' calls, and took 20 us of a one-token layer call),
       else on the heap */
    int64_t start_s[ROUTED_STACK + 1], token_s[ROUTED_STACK], bounds_s[3 * ROUTED_STACK];
    float w_s[ROUTED_STACK];
    const int on_stack = E <= ROUTED_STACK && A <= ROUTED_STACK;
    int64_t *start = on_stack ? memset(start_s, 0, (E + 1) * sizeof(int64_t)) : calloc(E + 1, sizeof(int64_t));
    int64_t *token = on_stack ? token_s : malloc((A > 0 ? A : 1) * sizeof(int64_t));
    int64_t *bounds = on_stack ? bounds_s : malloc(3 * (E > 0 ? E : 1) * sizeof(int64_t));
    float *w_sorted = on_stack ? w_s : malloc((A > 0 ? A : 1) * sizeof(float));
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
        if (sgemm)
            moekit_many_rows(x, token, w_sorted, bounds, G, w_in, w_out, b_in, b_out, D, F, glu, act, A, A / top_k,
                             out, work, nthreads, sgemm, block_rows, NULL);
        else
            moekit_few_rows(x, token, w_sorted, bounds, G, w_in, w_out, b_in, b_out, D, F, glu, act, A, out, work,
                            nthreads);
        status = 0;
    }
    if (!on_stack) {
        free(start);
        free(token);
        free(bounds);
        free(w_sorted);
    }
    return status;
}

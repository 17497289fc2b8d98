/* Row-major float32 GEMM for one thread: C [m, n] = op(A) [m, k] op(B) [k, n] + beta C.

   Every kernel here runs its products one per thread inside its own parallel region (the experts
   of a thread, a block of attention rows, a chunk of the LM head), so this GEMM is single-threaded.
   It is the classic blocked scheme (Goto; BLIS's loops): k in slices of KC, m in blocks of MC rows,
   n in blocks of NC columns; each A block is copied ("packed") into panels of MR rows and each B
   block into panels of NR columns, laid out in the order the micro-kernel reads them, and the
   micro-kernel keeps an MR x NR tile of C in registers while it walks one A panel and one B panel.

     for pc in k by KC                     A block [MC, KC] packed: in L2
       for ic in m by MC                   B block [KC, NC] packed: in L2, read row by row from B
         for jc in n by NC                 (the next block's rows are prefetched meanwhile)
           for each NR panel, each MR panel: the micro-kernel, a 6 x 32 tile in 12 of the 32
                                           AVX-512 registers (6 x 16 in 12 of 16 with AVX2 only)

   Why not the BLAS's sgemm: the MKL that torch links runs its AVX2 code on AMD CPUs. On this
   machine (AMD EPYC, family 26: AVX-512 with full-width FMA units, ~285 GFLOP/s per core against
   ~140 with AVX2) it reaches 100-120 GFLOP/s per core on the kernels' products; this scheme
   190-250 with AVX-512 (and 115-135 with AVX2 alone: benchmarks/bench_native.py --part gemm,
   docs/benchmarks.md). op(A) = A^T when ta (A stored [k, m]), op(B) = B^T when tb (B stored
   [n, k]), as in common.h's gemm_rm. */

#include "common.h"

#define MR 6
#ifdef __AVX512F__
#define NR 32  /* two 16-float AVX-512 registers per row of the tile */
#define KC 128 /* a B panel, 128 x 32 floats = 16 KiB, stays in L1 */
#else
#define NR 16  /* two 8-float AVX registers */
#define KC 256 /* a B panel, 256 x 16 floats = 16 KiB */
#endif
#define MC 144 /* at most, a multiple of MR: the A block, 144 x KC floats (in L2) */
#define NC 128 /* a multiple of NR: the B block, KC x 128 floats (in L2) */

/* The micro-kernel's vector type and operations: 16 floats with AVX-512, 8 with AVX2. */
#ifdef __AVX512F__
typedef __m512 vec;
#define VW 16
#define vzero _mm512_setzero_ps
#define vload _mm512_load_ps
#define vfma _mm512_fmadd_ps
#define vset1(p) _mm512_set1_ps(*(p))
#else
typedef __m256 vec;
#define VW 8
#define vzero _mm256_setzero_ps
#define vload _mm256_load_ps
#define vfma _mm256_fmadd_ps
#define vset1(p) _mm256_broadcast_ss(p)
#endif

/* Rows i and j of the tile, one k: two broadcast values of A times the panel's row of B (b0 | b1)
   into the four accumulators c<row><half>. */
#define TWO_ROWS(i, j)                                                                                        \
    do {                                                                                                      \
        const vec ai = vset1(a + i), aj = vset1(a + j);                                                       \
        c##i##0 = vfma(ai, b0, c##i##0), c##i##1 = vfma(ai, b1, c##i##1);                                     \
        c##j##0 = vfma(aj, b0, c##j##0), c##j##1 = vfma(aj, b1, c##j##1);                                     \
    } while (0)

/* C rows [mr, nr] = beta C + acc (the tile's first mr rows, first nr columns); beta 0 never reads C
   (it may hold NaN). */
static inline void store_tile(const vec acc[MR][2], float *c, int64_t ldc, float beta, int mr, int nr)
{
#ifdef __AVX512F__
    const __mmask16 lo = nr >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nr) - 1);
    const __mmask16 hi = nr >= 32 ? (__mmask16)0xFFFF : nr > 16 ? (__mmask16)((1u << (nr - 16)) - 1) : 0;
    const __m512 vb = _mm512_set1_ps(beta);
    for (int i = 0; i < mr; i++) {
        float *ci = c + i * ldc;
        __m512 v0 = acc[i][0], v1 = acc[i][1];
        if (beta != 0.0f) {
            v0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(lo, ci), v0);
            v1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(hi, ci + 16), v1);
        }
        _mm512_mask_storeu_ps(ci, lo, v0);
        _mm512_mask_storeu_ps(ci + 16, hi, v1);
    }
#else
    float tile[NR] __attribute__((aligned(32)));
    for (int i = 0; i < mr; i++) {
        float *ci = c + i * ldc;
        if (nr == NR) {
            __m256 lo = acc[i][0], hi = acc[i][1];
            if (beta != 0.0f) {
                lo = _mm256_fmadd_ps(_mm256_set1_ps(beta), _mm256_loadu_ps(ci), lo);
                hi = _mm256_fmadd_ps(_mm256_set1_ps(beta), _mm256_loadu_ps(ci + 8), hi);
            }
            _mm256_storeu_ps(ci, lo);
            _mm256_storeu_ps(ci + 8, hi);
            continue;
        }
        _mm256_store_ps(tile, acc[i][0]);
        _mm256_store_ps(tile + 8, acc[i][1]);
        for (int j = 0; j < nr; j++) ci[j] = tile[j] + (beta != 0.0f ? beta * ci[j] : 0.0f);
    }
#endif
}

/* The next B block's memory, read into L2 while this block's micro-kernel calls run (a share of its
   lines per call, one line every few steps of the call's k loop), so that its packing finds it there:
   weights read once per product (an expert's, at 64 rows) would otherwise come from DRAM while the
   cores wait, 20-25% of the product's time. Issued as a burst before each call instead, the
   prefetches stalled on the misses in flight: spread, one thread's [61-66, 512] x [512, 2816]
   products from cold weights run 1.116x, the 128-expert layer at T=4096 1.08x. */
struct prefetch {
    const char *base;  /* first byte of segment 0 */
    int64_t stride;    /* bytes between segments */
    int64_t segments;  /* rows of B (or of B^T) in the block */
    int64_t lines;     /* cache lines per segment */
    int64_t per_call;  /* lines to issue per micro-kernel call */
    int64_t seg, line; /* the next line to issue: segment, line in it */
};

static struct prefetch next_block(int tb, const float *B, int64_t ldb, int64_t pc, int64_t jc, int64_t kc, int64_t n,
                                  int64_t k, int64_t calls)
{
    struct prefetch f = {NULL, 0, 0, 0, 0, 0, 0};
    if (pc >= k) return f;
    const int64_t nc = n - jc < NC ? n - jc : NC;
    f.stride = ldb * (int64_t)sizeof(float);
    if (!tb) { /* kc rows of nc floats */
        f.base = (const char *)(B + pc * ldb + jc);
        f.segments = kc;
        f.lines = (nc * (int64_t)sizeof(float) + 63) / 64;
    } else { /* nc rows of kc floats */
        f.base = (const char *)(B + jc * ldb + pc);
        f.segments = nc;
        f.lines = (kc * (int64_t)sizeof(float) + 63) / 64;
    }
    f.per_call = (f.segments * f.lines + calls - 1) / calls;
    return f;
}

static inline void prefetch_line(struct prefetch *f)
{
    if (f->seg >= f->segments) return;
    _mm_prefetch(f->base + f->seg * f->stride + f->line * 64, _MM_HINT_T1);
    if (++f->line == f->lines) f->line = 0, f->seg++;
}

/* A micro-kernel call's share of the next block, spread over its kc steps of k: one line every `every`
   steps (`share_step` in the loop), what is left after it (`share_rest`). All at once, a burst of ~24
   prefetches to memory stalls on the misses in flight. */
struct share {
    int64_t left, every, countdown;
};

static inline struct share share_of(const struct prefetch *f, int64_t kc)
{
    const int64_t left = f->per_call;
    return (struct share){left, left > 0 && kc / left > 0 ? kc / left : 1, 1};
}

static inline void share_step(struct share *s, struct prefetch *f)
{
    if (--s->countdown == 0) {
        s->countdown = s->every;
        if (s->left > 0) prefetch_line(f), s->left--;
    }
}

static inline void share_rest(struct share *s, struct prefetch *f)
{
    for (; s->left > 0; s->left--) prefetch_line(f);
}

/* The C tile's lines, read at the end: a large C (799 x 2816, an expert's block) is in L3 or memory,
   and a 128-deep tile is too short to wait for it. */
static inline void prefetch_c(const float *c, int64_t ldc, int mr)
{
#ifdef __AVX512F__
    for (int i = 0; i < mr; i++) {
        _mm_prefetch((const char *)(c + i * ldc), _MM_HINT_T0);
        _mm_prefetch((const char *)(c + i * ldc + 16), _MM_HINT_T0);
    }
#else
    (void)c, (void)ldc, (void)mr;
#endif
}

/* C tile [mr, nr] = beta C + the 6 x NR product of a packed A panel (kc x MR) and B panel (kc x NR);
   only the first mr rows and nr columns are written. 12 vector registers hold the tile (of 32 with
   AVX-512, 16 with AVX2), two a row of B, two broadcast values of A. */
static void micro_kernel(int64_t kc, const float *restrict a, const float *restrict b, float *c, int64_t ldc,
                         float beta, int mr, int nr, struct prefetch *f)
{
    prefetch_c(c, ldc, mr);
    vec c00 = vzero(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    vec c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    struct share share = share_of(f, kc);
    for (int64_t p = 0; p < kc; p++) {
        share_step(&share, f);
        const vec b0 = vload(b), b1 = vload(b + VW);
        TWO_ROWS(0, 1);
        TWO_ROWS(2, 3);
        TWO_ROWS(4, 5);
        a += MR;
        b += NR;
    }
    share_rest(&share, f);
    const vec acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    store_tile(acc, c, ldc, beta, mr, nr);
}

/* The same for a last tile of M < MR rows (an expert's rows rarely divide by 6): only M rows of the
   tile are computed, so the padding rows cost nothing (at 64 rows per expert, with 128 experts, the
   last tiles' padding is ~4% of the rows). The A panel keeps its MR-wide layout. */
#define DEFINE_SHORT_TILE(M)                                                                               \
    static void micro_kernel_##M(int64_t kc, const float *restrict a, const float *restrict b, float *c,    \
                                 int64_t ldc, float beta, int nr, struct prefetch *f)                       \
    {                                                                                                      \
        prefetch_c(c, ldc, M);                                                                             \
        vec acc[MR][2];                                                                                    \
        for (int i = 0; i < M; i++) acc[i][0] = acc[i][1] = vzero();                                       \
        struct share share = share_of(f, kc);                                                              \
        for (int64_t p = 0; p < kc; p++) {                                                                 \
            share_step(&share, f);                                                                         \
            const vec b0 = vload(b), b1 = vload(b + VW);                                                   \
            for (int i = 0; i < M; i++) {                                                                  \
                const vec ai = vset1(a + i);                                                               \
                acc[i][0] = vfma(ai, b0, acc[i][0]), acc[i][1] = vfma(ai, b1, acc[i][1]);                   \
            }                                                                                              \
            a += MR;                                                                                       \
            b += NR;                                                                                       \
        }                                                                                                  \
        share_rest(&share, f);                                                                             \
        store_tile(acc, c, ldc, beta, M, nr);                                                              \
    }
DEFINE_SHORT_TILE(1)
DEFINE_SHORT_TILE(2)
DEFINE_SHORT_TILE(3)
DEFINE_SHORT_TILE(4)
DEFINE_SHORT_TILE(5)

/* A tile of mr <= MR rows. */
static inline void tile(int64_t kc, const float *a, const float *b, float *c, int64_t ldc, float beta, int mr, int nr,
                        struct prefetch *f)
{
    switch (mr) {
    case 1: micro_kernel_1(kc, a, b, c, ldc, beta, nr, f); break;
    case 2: micro_kernel_2(kc, a, b, c, ldc, beta, nr, f); break;
    case 3: micro_kernel_3(kc, a, b, c, ldc, beta, nr, f); break;
    case 4: micro_kernel_4(kc, a, b, c, ldc, beta, nr, f); break;
    case 5: micro_kernel_5(kc, a, b, c, ldc, beta, nr, f); break;
    default: micro_kernel(kc, a, b, c, ldc, beta, mr, nr, f);
    }
}

/* op(A)[ic : ic + mc, pc : pc + kc] into panels of MR rows: ap[t][p][i] = op(A)[ic + t MR + i, pc + p],
   rows past mc zero. */
static void pack_a(int ta, const float *A, int64_t lda, int64_t ic, int64_t pc, int64_t mc, int64_t kc, float *ap)
{
    for (int64_t t = 0; t < mc; t += MR, ap += kc * MR) {
        const int rows = mc - t < MR ? (int)(mc - t) : MR;
        if (!ta) { /* rows of A: MR streams along k */
            const float *src[MR];
            for (int i = 0; i < MR; i++) src[i] = A + (ic + t + (i < rows ? i : 0)) * lda + pc;
            for (int64_t p = 0; p < kc; p++)
                for (int i = 0; i < MR; i++) ap[p * MR + i] = i < rows ? src[i][p] : 0.0f;
        } else { /* A stored [k, m]: each k a run of MR contiguous values */
            for (int64_t p = 0; p < kc; p++) {
                const float *src = A + (pc + p) * lda + ic + t;
                for (int i = 0; i < MR; i++) ap[p * MR + i] = i < rows ? src[i] : 0.0f;
            }
        }
    }
}

/* r[j][q] -> r[q][j] for an 8 x 8 block of floats */
static inline void transpose8(__m256 r[8])
{
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* op(B)[pc : pc + kc, jc : jc + nc] into panels of NR columns: bp[s][p][j] = op(B)[pc + p, jc + s NR + j],
   columns past nc zero. */
static void pack_b(int tb, const float *B, int64_t ldb, int64_t pc, int64_t jc, int64_t kc, int64_t nc, float *bp)
{
    const int64_t panels = (nc + NR - 1) / NR;
    if (!tb) {
        for (int64_t p = 0; p < kc; p++) {
            const float *row = B + (pc + p) * ldb + jc;
            for (int64_t s = 0; s < panels; s++) {
                float *dst = bp + (s * kc + p) * NR;
                const int64_t cols = nc - s * NR;
                if (cols >= NR) {
#ifdef __AVX512F__
                    _mm512_store_ps(dst, _mm512_loadu_ps(row + s * NR));
                    _mm512_store_ps(dst + 16, _mm512_loadu_ps(row + s * NR + 16));
#else
                    _mm256_store_ps(dst, _mm256_loadu_ps(row + s * NR));
                    _mm256_store_ps(dst + 8, _mm256_loadu_ps(row + s * NR + 8));
#endif
                } else {
                    for (int j = 0; j < NR; j++) dst[j] = j < cols ? row[s * NR + j] : 0.0f;
                }
            }
        }
        return;
    }
    /* B stored [n, k]: column j of op(B) is row j of B, read along k; 8 x 8 blocks transposed in
       registers (NR / 8 per panel and 8 values of k) */
    for (int64_t s = 0; s < panels; s++) {
        float *dst = bp + s * kc * NR;
        const int64_t cols = nc - s * NR < NR ? nc - s * NR : NR;
        const float *src[NR];
        for (int j = 0; j < NR; j++) src[j] = B + (jc + s * NR + (j < cols ? j : 0)) * ldb + pc;
        int64_t p = 0;
        if (cols == NR)
            for (; p + 8 <= kc; p += 8)
                for (int group = 0; group < NR / 8; group++) {
                    __m256 r[8];
                    for (int j = 0; j < 8; j++) r[j] = _mm256_loadu_ps(src[8 * group + j] + p);
                    transpose8(r);
                    for (int q = 0; q < 8; q++) _mm256_store_ps(dst + (p + q) * NR + 8 * group, r[q]);
                }
        for (; p < kc; p++)
            for (int j = 0; j < NR; j++) dst[p * NR + j] = j < cols ? src[j][p] : 0.0f;
    }
}

int moekit_gemm_blas = 0;

/* 1: gemm_rm takes the BLAS's sgemm for every product; 0: moekit_gemm where it applies. */
void moekit_set_gemm(int blas) { moekit_gemm_blas = blas; }

/* The calling thread's next product's B (moekit_gemm_next in common.h), taken by its current one. */
static __thread struct {
    const float *B;
    int64_t ldb, k, n;
    int tb;
} next_product = {NULL, 0, 0, 0, 0};

void moekit_gemm_next(int tb, int64_t k, int64_t n, const float *B, int64_t ldb)
{
    next_product.B = B, next_product.ldb = ldb, next_product.k = k, next_product.n = n, next_product.tb = tb;
}

/* This thread's packing buffers (the kernels' OpenMP threads live as long as the process): allocated
   at the first product, kept. NULL if memory ran out. */
static float *pack_buffers(void)
{
    static __thread float *buffers = NULL;
    if (!buffers) buffers = aligned_alloc(64, (size_t)(MC * KC + KC * NC) * sizeof(float));
    return buffers;
}

int moekit_gemm(int ta, int tb, int64_t m, int64_t n, int64_t k, const float *A, int64_t lda, const float *B,
                int64_t ldb, float beta, float *C, int64_t ldc)
{
    if (m <= 0 || n <= 0) return 0;
    if (k <= 0) { /* C = beta C */
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) C[i * ldc + j] = beta != 0.0f ? beta * C[i * ldc + j] : 0.0f;
        return 0;
    }
    float *ap = pack_buffers();
    if (!ap) return -2;
    float *bp = ap + MC * KC;
    /* m in equal blocks of at most MC rows (a multiple of MR): 150 rows as 78 + 72, not 144 + 6 */
    const int64_t blocks = (m + MC - 1) / MC, mc_step = ((m + blocks - 1) / blocks + MR - 1) / MR * MR;
    for (int64_t pc = 0; pc < k; pc += KC) {
        const int64_t kc = k - pc < KC ? k - pc : KC;
        const float b = pc == 0 ? beta : 1.0f; /* later slices add to the first */
        for (int64_t ic = 0; ic < m; ic += mc_step) {
            const int64_t mc = m - ic < mc_step ? m - ic : mc_step;
            pack_a(ta, A, lda, ic, pc, mc, kc, ap);
            for (int64_t jc = 0; jc < n; jc += NC) {
                const int64_t nc = n - jc < NC ? n - jc : NC;
                pack_b(tb, B, ldb, pc, jc, kc, nc, bp);
                /* the block packed next: this slice's next columns, else its first ones (for the next
                   row block), else the next slice's first */
                int64_t next_pc = pc, next_jc = jc + NC;
                if (next_jc >= n) {
                    next_jc = 0;
                    if (ic + mc >= m) next_pc = pc + KC;
                }
                const int64_t next_kc = k - next_pc < KC ? k - next_pc : KC;
                const int64_t calls = (nc + NR - 1) / NR * ((mc + MR - 1) / MR);
                struct prefetch next = next_block(tb, B, ldb, next_pc, next_jc, next_kc, n, k, calls);
                if (next_pc >= k && next.base == NULL && next_product.B) { /* the product after this one */
                    const int64_t kc1 = next_product.k < KC ? next_product.k : KC;
                    next = next_block(next_product.tb, next_product.B, next_product.ldb, 0, 0, kc1, next_product.n,
                                      next_product.k, calls);
                    next_product.B = NULL;
                }
                for (int64_t s = 0; s < nc; s += NR) {
                    const int nr = nc - s < NR ? (int)(nc - s) : NR;
                    for (int64_t t = 0; t < mc; t += MR) {
                        const int mr = mc - t < MR ? (int)(mc - t) : MR;
                        tile(kc, ap + t * kc, bp + s * kc, C + (ic + t) * ldc + jc + s, ldc, b, mr, nr, &next);
                    }
                }
            }
        }
    }
    return 0;
}

/* moekit_gemm over `nthreads` threads: the longer side of C split in whole micro-tiles (rows of MR,
   columns of NR), one block per thread. For products that are not inside a kernel's own parallel
   region (the model's linear layers). 0, or -2 when a thread's packing buffers could not be had. */
int moekit_matmul(int ta, int tb, int64_t m, int64_t n, int64_t k, const float *A, int64_t lda, const float *B,
                  int64_t ldb, float beta, float *C, int64_t ldc, int nthreads)
{
    int status = 0;
#pragma omp parallel num_threads(nthreads) reduction(min : status)
    {
        const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
        if (m >= n) {
            const int64_t per = ((m + nt - 1) / nt + MR - 1) / MR * MR;
            const int64_t r0 = tid * per < m ? tid * per : m, r1 = r0 + per < m ? r0 + per : m;
            if (r0 < r1)
                status = moekit_gemm(ta, tb, r1 - r0, n, k, ta ? A + r0 : A + r0 * lda, lda, B, ldb, beta, C + r0 * ldc,
                                     ldc);
        } else {
            const int64_t per = ((n + nt - 1) / nt + NR - 1) / NR * NR;
            const int64_t c0 = tid * per < n ? tid * per : n, c1 = c0 + per < n ? c0 + per : n;
            if (c0 < c1)
                status = moekit_gemm(ta, tb, m, c1 - c0, k, A, lda, tb ? B + c0 * ldb : B + c0, ldb, beta, C + c0, ldc);
        }
    }
    return status;
}

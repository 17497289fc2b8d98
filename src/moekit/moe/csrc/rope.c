/* Rotary position embedding on CPU float32 (moekit.model.layers.apply_rope), forward and backward.

   With full-width tables c = (cos | cos), s = (-sin | sin) [S, K] and k' = (k + K/2) mod K (the
   other half of the pair):
     forward:  y[k]  = x[k] c[k] + x[k'] s[k]
     backward: dx[k] = g[k] c[k] + g[k'] s[k']   (the transpose of the half swap is the half swap)
   The input may be a strided view with contiguous K (the heads split off a [B, S, H * K] projection
   are [B, H, S, K] with strides (S H K, K, H K, 1)); the output is a contiguous [B, H, S, K].
   Products and sums are rounded separately, as torch's x * cos + roll(x) * sin is (no fused
   multiply-add), so either path gives the same bits.

   Shape legend: B batch, H heads, S positions, K head dim (even). */

#include "common.h"

__attribute__((optimize("fp-contract=off"))) void
moekit_rope(const float *x, int64_t sB, int64_t sH, int64_t sS, int64_t B, int64_t H, int64_t S, int64_t K,
            const float *c, const float *s, int backward, float *out, int nthreads)
{
    const int64_t half = K / 2;
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static) if (B * H * S * K >= 32768)
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t p = 0; p < S; p++) {
                const float *xr = x + b * sB + h * sH + p * sS, *cr = c + p * K, *sr = s + p * K;
                float *o = out + ((b * H + h) * S + p) * K;
                /* forward pairs x[k'] with s[k], backward g[k'] with s[k'] */
                const float *s_lo = backward ? sr + half : sr, *s_hi = backward ? sr : sr + half;
                for (int64_t k = 0; k < half; k++) {
                    const float a = xr[k] * cr[k], r = xr[k + half] * s_lo[k];
                    o[k] = a + r;
                }
                for (int64_t k = 0; k < half; k++) {
                    const float a = xr[half + k] * cr[half + k], r = xr[k] * s_hi[k];
                    o[half + k] = a + r;
                }
            }
}

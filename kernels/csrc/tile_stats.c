/* Fused epilogue of the exact pass (kernels/exact_pass.py) for one tile of logits, on the CPU.
 *
 * t holds t_ij = scale*q_i.k_j - lse_i for `heads` x `n` rows and `nk` keys (row-major). For every
 * row it forms p_ij = exp(t_ij) once (t clamped to [-80, 80]: exp stays on its fast path, and a
 * probability below exp(-80) = 1.8e-35 vanishes next to any mass) and accumulates, without writing
 * p anywhere:
 *   pmax[row] = max(pmax[row], max_j p)       ent[row]  += sum_j p * t
 *   mom[row]  += sum_j p * w_j                mass[row] += sum_j p
 *   col[h * ldc + j] += p                     (the received mass of key j, per head)
 * with w_j = jrel[j] (j - c), or |jrel[j] - relrow[r]| = |j - p_r| when absmode is set.
 * Row r sees the first min(nk, vis_base + r) keys (vis_base < 0: all of them: the causal
 * diagonal tile passes 1), keys whose keymask entry is 0 (padding) get p = 0, and rows whose
 * live entry is 0 are skipped. Single-threaded: the caller runs query blocks on a thread pool
 * (ctypes releases the GIL during the call). Compiled at first use with -O3 -march=native
 * -ffast-math, so exp is glibc's vectorised expf (libmvec).
 */
#include <math.h>
#include <stdint.h>

#define T_CLAMP 80.0f

static inline void row_stats(const float *restrict tr, int64_t m, const float *restrict w,
                             const float *restrict km, float *restrict colh, float *pmax,
                             float *ent, float *mom, float *mass) {
    float mx = *pmax, e = 0.f, d = 0.f, s = 0.f;
    for (int64_t j = 0; j < m; ++j) {
        float x = fminf(fmaxf(tr[j], -T_CLAMP), T_CLAMP);
        float p = expf(x);
        if (km) p = km[j] != 0.f ? p : 0.f;
        mx = fmaxf(mx, p);
        e += p * x;
        d += p * w[j];
        s += p;
        if (colh) colh[j] += p;
    }
    *pmax = mx;
    *ent += e;
    *mom += d;
    *mass += s;
}

void tile_stats(const float *t, int64_t heads, int64_t n, int64_t nk, const float *jrel,
                const float *relrow, int32_t absmode, int64_t vis_base, const float *keymask,
                int64_t ldk, int64_t heads_per_batch, const uint8_t *live, float *pmax, float *ent,
                float *mom, float *mass, float *col, int64_t ldc, float *wbuf) {
    for (int64_t h = 0; h < heads; ++h) {
        const float *km = keymask ? keymask + (h / heads_per_batch) * ldk : 0;
        float *colh = col ? col + h * ldc : 0;
        for (int64_t r = 0; r < n; ++r) {
            int64_t row = h * n + r;
            if (live && !live[row]) continue;
            int64_t m = vis_base < 0 ? nk : (vis_base + r < nk ? vis_base + r : nk);
            if (m <= 0) continue;
            const float *w = jrel;
            if (absmode) {
                for (int64_t j = 0; j < m; ++j) wbuf[j] = fabsf(jrel[j] - relrow[r]);
                w = wbuf;
            }
            const float *tr = t + row * nk;
            /* four specialisations, so each inner loop vectorises without branches */
            if (km && colh) row_stats(tr, m, w, km, colh, pmax + row, ent + row, mom + row, mass + row);
            else if (km) row_stats(tr, m, w, km, 0, pmax + row, ent + row, mom + row, mass + row);
            else if (colh) row_stats(tr, m, w, 0, colh, pmax + row, ent + row, mom + row, mass + row);
            else row_stats(tr, m, w, 0, 0, pmax + row, ent + row, mom + row, mass + row);
        }
    }
}

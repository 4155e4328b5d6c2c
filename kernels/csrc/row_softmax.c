/* Whole-row softmax with the docs/metrics.md §1 row sums, in place, on the CPU
 * (kernels/row_pass.py): the middle step of a "logits -> probabilities -> P @ V" forward that
 * never holds more than one block of query rows.
 *
 * s holds the logits s_ij = scale * q_i.k_j of `heads` x `n` rows, each `nk` keys wide (row-major).
 * Row r of a head sees its first m = min(nk, vis_base + r) keys (vis_base < 0: all nk), minus the
 * keys whose keymask entry is 0 (padding). For every live row it
 *   - finds the row max mx over the visible keys,
 *   - overwrites s_ij with e_ij = exp(max(s_ij - mx, -80)) for visible keys and 0 for every other
 *     key of the row (so the caller's e @ V needs no mask; exp(-80) = 1.8e-35 vanishes next to
 *     the row's mass, which is at least 1),
 *   - and writes, with l = sum_j e_ij:
 *       lse = mx + log l                 inv_l = 1 / l            pmax = 1 / l (e = 1 at the max)
 *       ent = log l - sum_j e (s - mx) / l                        (the entropy, -sum p log p)
 *       dist = sum_j e_ij w_ij / l   with w_ij = pos_r - jpos_j, or |pos_r - jpos_j| when absmode
 *       col[h * ldc + j] += e_ij / l when col is given (the received mass of key j, per head).
 * With `amax` given (the long-context rows, kernels/long_context.py), it also writes per row
 *       amax = the first visible key holding the row max (-1 for a dead row)
 *       stream = sum_j e_ij / l over the first `sinks` keys plus keys pos_r - window < j <= pos_r
 *   and, with `bmass` given ([heads, nqb, nkb], rows of this call starting at query block qb0 and
 *   blocks of `bs` rows/keys), adds each row's mass per key block: bmass[h, qb0 + r/bs, u] +=
 *   sum_{j in block u} e_ij / l. Query rows of one call must start at a block boundary.
 * Rows whose live entry is 0 (they see no key) are zeroed and get lse = -inf and zero sums.
 * Single-threaded: the caller runs query blocks on a thread pool (ctypes releases the GIL).
 * Compiled with -O3 -march=native -ffast-math: exp is glibc's vectorised expf (libmvec).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define X_FLOOR (-80.0f)

static inline float row_max(const float *restrict s, int64_t m, const float *restrict km) {
    float mx = -INFINITY;
    if (km) {
        for (int64_t j = 0; j < m; ++j) mx = fmaxf(mx, km[j] != 0.f ? s[j] : -INFINITY);
    } else {
        for (int64_t j = 0; j < m; ++j) mx = fmaxf(mx, s[j]);
    }
    return mx;
}

/* e = exp(s - mx) in place; returns l, and the sums of e * (s - mx) and e * w through pointers */
static inline float row_exp(float *restrict s, int64_t m, float mx, const float *restrict km,
                            const float *restrict jpos, float pos, int32_t absmode,
                            float *ex_out, float *ew_out) {
    float l = 0.f, ex = 0.f, ew = 0.f;
    for (int64_t j = 0; j < m; ++j) {
        float x = fmaxf(s[j] - mx, X_FLOOR);
        float e = expf(x);
        if (km) e = km[j] != 0.f ? e : 0.f;
        float w = pos - jpos[j];
        if (absmode) w = fabsf(w);
        s[j] = e;
        l += e;
        ex += e * x;
        ew += e * w;
    }
    *ex_out = ex;
    *ew_out = ew;
    return l;
}

static inline int64_t first_max(const float *restrict s, int64_t m, float mx, const float *restrict km) {
    for (int64_t j = 0; j < m; ++j) {
        if (s[j] == mx && (!km || km[j] != 0.f)) return j;
    }
    return -1;
}

static inline float range_sum(const float *restrict e, int64_t j0, int64_t j1) {
    float acc = 0.f;
    for (int64_t j = j0; j < j1; ++j) acc += e[j];
    return acc;
}

/* the streaming keys of a row at position pos that sees m keys: j < sinks, and pos - window < j <= pos */
static inline float streaming_sum(const float *restrict e, int64_t m, int64_t pos, int64_t sinks, int64_t window) {
    int64_t head = sinks < m ? sinks : m;
    int64_t lo = pos - window + 1, hi = pos + 1 < m ? pos + 1 : m;
    if (lo < head) lo = head;
    return range_sum(e, 0, head) + (window > 0 && lo < hi ? range_sum(e, lo, hi) : 0.f);
}

static inline void add_block_mass(const float *restrict e, int64_t m, int64_t bs, float il, float *restrict out) {
    for (int64_t j0 = 0, u = 0; j0 < m; j0 += bs, ++u) {
        out[u] += range_sum(e, j0, j0 + bs < m ? j0 + bs : m) * il;
    }
}

void row_softmax(float *s, int64_t heads, int64_t n, int64_t nk, int64_t vis_base, const float *keymask,
                 int64_t ldk, int64_t heads_per_batch, const uint8_t *live, const float *jpos, float pos0,
                 int32_t absmode, float *lse, float *inv_l, float *pmax, float *ent, float *dist,
                 float *col, int64_t ldc, int64_t *amax, float *stream, int64_t sinks, int64_t window,
                 float *bmass, int64_t bs, int64_t qb0, int64_t nqb, int64_t nkb) {
    for (int64_t h = 0; h < heads; ++h) {
        const float *km = keymask ? keymask + (h / heads_per_batch) * ldk : 0;
        float *colh = col ? col + h * ldc : 0;
        for (int64_t r = 0; r < n; ++r) {
            int64_t row = h * n + r;
            float *sr = s + row * nk;
            int64_t m = vis_base < 0 ? nk : (vis_base + r < nk ? vis_base + r : nk);
            if ((live && !live[row]) || m <= 0) {
                memset(sr, 0, (size_t)nk * sizeof(float));
                lse[row] = -INFINITY;
                inv_l[row] = pmax[row] = ent[row] = dist[row] = 0.f;
                if (amax) {
                    amax[row] = -1;
                    stream[row] = 0.f;
                }
                continue;
            }
            float mx = row_max(sr, m, km);
            if (amax) amax[row] = first_max(sr, m, mx, km);
            float ex, ew;
            float l = km ? row_exp(sr, m, mx, km, jpos, pos0 + (float)r, absmode, &ex, &ew)
                         : row_exp(sr, m, mx, 0, jpos, pos0 + (float)r, absmode, &ex, &ew);
            if (m < nk) memset(sr + m, 0, (size_t)(nk - m) * sizeof(float));
            float il = 1.f / l;
            lse[row] = mx + logf(l);
            inv_l[row] = il;
            pmax[row] = il;
            ent[row] = logf(l) - ex * il;
            dist[row] = ew * il;
            if (colh) {
                for (int64_t j = 0; j < m; ++j) colh[j] += sr[j] * il;
            }
            if (amax) stream[row] = streaming_sum(sr, m, (int64_t)pos0 + r, sinks, window) * il;
            if (bmass) add_block_mass(sr, m, bs, il, bmass + (h * nqb + qb0 + r / bs) * nkb);
        }
    }
}

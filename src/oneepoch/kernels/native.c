/* oneepoch's CPU kernels: the hot loops of one training step, each a single pass over memory.
 *
 * Built on first use by oneepoch/kernels/__init__.py (plain C11, no torch headers, loaded with
 * ctypes); every function has a pure-PyTorch twin that gives the same numbers within float
 * tolerance (tests/test_kernels.py compares them). Arrays are C-contiguous float32 / int64 /
 * int32, sizes are int64. Loops are written so that the inner loop runs over independent lanes
 * (columns or embedding dims) and vectorises without reassociating sums.
 *
 * Built with OpenMP when the compiler has it, sharing PyTorch's own runtime (the same
 * libgomp.so.1, already loaded), so torch.set_num_threads sets their threads too. Work is split
 * by columns, samples or rows, never inside one sum, so results do not depend on the thread
 * count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* exp(x) for float: 2^(x log2 e) with a degree-5 polynomial on the fraction (rel. err ~2e-7);
 * 0 below -87.
 * Inlined and vectorisable, unlike libm's expf without -ffast-math. */
static inline float fexp(float x) {
    const float under = x < -87.0f ? 0.0f : 1.0f;  /* exp(-inf) and underflow give 0 */
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float t = x * 1.44269504088896341f;
    float fi = floorf(t);
    float f = t - fi;
    float p = 1.8775767e-3f;
    p = p * f + 8.9893397e-3f;
    p = p * f + 5.5826318e-2f;
    p = p * f + 2.4015361e-1f;
    p = p * f + 6.9315308e-1f;
    p = p * f + 9.9999994e-1f;
    union { float f; int32_t i; } u;
    u.i = ((int32_t)fi + 127) << 23;
    return p * u.f * under;
}

/* How many rows ahead the scattered-row loops prefetch. */
#define PREFETCH 12

static inline float fsigmoid(float x) { return 1.0f / (1.0f + fexp(-x)); }

/* ---------------------------------------------------------------------------------------- */
/* Dice (DIN): y = x * (alpha + (1 - alpha) * p), p = sigmoid((x - mean) * rstd).            */
/* x, y, p: [B, H]. With batch statistics (stats = 1) mean and the biased variance over the    */
/* batch are written to mean/var; otherwise mean/var are read (running statistics).           */
/* ---------------------------------------------------------------------------------------- */
/* Column statistics of x [B, H] over columns [h0, h1). */
static void dice_stats(const float *restrict x, int64_t B, int64_t H, int64_t h0, int64_t h1,
                       float *restrict mean, float *restrict var) {
    for (int64_t h = h0; h < h1; h++) mean[h] = 0.0f, var[h] = 0.0f;
    for (int64_t b = 0; b < B; b++) {
        const float *xr = x + b * H;
        for (int64_t h = h0; h < h1; h++) mean[h] += xr[h];
    }
    for (int64_t h = h0; h < h1; h++) mean[h] /= (float)B;
    for (int64_t b = 0; b < B; b++) {
        const float *xr = x + b * H;
        for (int64_t h = h0; h < h1; h++) {
            float d = xr[h] - mean[h];
            var[h] += d * d;
        }
    }
    for (int64_t h = h0; h < h1; h++) var[h] /= (float)B;
}

/* Rows [b0, b1) of the forward output. */
static void dice_rows(const float *restrict x, const float *restrict alpha, int64_t b0,
                      int64_t b1, int64_t H, const float *restrict mean,
                      const float *restrict rstd, float *restrict p, float *restrict y) {
    for (int64_t b = b0; b < b1; b++) {
        const float *xr = x + b * H;
        float *pr = p + b * H, *yr = y + b * H;
        for (int64_t h = 0; h < H; h++) {
            float ph = fsigmoid((xr[h] - mean[h]) * rstd[h]);
            pr[h] = ph;
            yr[h] = xr[h] * (alpha[h] + (1.0f - alpha[h]) * ph);
        }
    }
}

/* This thread's share [*i0, *i1) of n items (multiples of `quantum`). */
static inline void share(int64_t n, int64_t quantum, int64_t *i0, int64_t *i1) {
    int64_t t = 0, T = 1;
#ifdef _OPENMP
    t = omp_get_thread_num(), T = omp_get_num_threads();
#endif
    int64_t per = ((n + T - 1) / T + quantum - 1) / quantum * quantum;
    *i0 = t * per < n ? t * per : n;
    *i1 = (t + 1) * per < n ? (t + 1) * per : n;
}

void dice_forward(const float *x, const float *alpha, int64_t B, int64_t H, int stats,
                  float eps, float *mean, float *var, float *rstd, float *p, float *y) {
#pragma omp parallel if (B * H >= 16384)
    {
        int64_t i0, i1;
        if (stats) {  /* each thread owns a block of columns */
            share(H, 16, &i0, &i1);
            dice_stats(x, B, H, i0, i1, mean, var);
#pragma omp barrier
        }
#pragma omp single
        for (int64_t h = 0; h < H; h++) rstd[h] = 1.0f / sqrtf(var[h] + eps);
        share(B, 1, &i0, &i1);  /* and a block of rows */
        dice_rows(x, alpha, i0, i1, H, mean, rstd, p, y);
    }
}

/* Column sums for the backward over columns [h0, h1): sg = mean(g), sgx = mean(g * xn) (times
 * inv_b), dalpha. */
static void dice_back_sums(const float *restrict x, const float *restrict p,
                           const float *restrict dy, const float *restrict alpha,
                           const float *restrict mean, const float *restrict rstd, int64_t B,
                           int64_t H, int64_t h0, int64_t h1, float inv_b, float *restrict sg,
                           float *restrict sgx, float *restrict dalpha) {
    for (int64_t h = h0; h < h1; h++) sg[h] = 0.0f, sgx[h] = 0.0f, dalpha[h] = 0.0f;
    for (int64_t b = 0; b < B; b++) {
        const float *xr = x + b * H, *pr = p + b * H, *dr = dy + b * H;
        for (int64_t h = h0; h < h1; h++) {
            float dyx = dr[h] * xr[h];
            float g = dyx * (1.0f - alpha[h]) * pr[h] * (1.0f - pr[h]);  /* d loss / d xn */
            float xn = (xr[h] - mean[h]) * rstd[h];
            sg[h] += g;
            sgx[h] += g * xn;
            dalpha[h] += dyx * (1.0f - pr[h]);
        }
    }
    for (int64_t h = h0; h < h1; h++) sg[h] *= inv_b, sgx[h] *= inv_b;
}

static void dice_back_rows(const float *restrict x, const float *restrict p,
                           const float *restrict dy, const float *restrict alpha,
                           const float *restrict mean, const float *restrict rstd, int64_t b0,
                           int64_t b1, int64_t H, const float *restrict sg,
                           const float *restrict sgx, float *restrict dx) {
    for (int64_t b = b0; b < b1; b++) {
        const float *xr = x + b * H, *pr = p + b * H, *dr = dy + b * H;
        float *out = dx + b * H;
        for (int64_t h = 0; h < H; h++) {
            float g = dr[h] * xr[h] * (1.0f - alpha[h]) * pr[h] * (1.0f - pr[h]);
            float xn = (xr[h] - mean[h]) * rstd[h];
            out[h] = dr[h] * (alpha[h] + (1.0f - alpha[h]) * pr[h])
                     + rstd[h] * (g - sg[h] - xn * sgx[h]);
        }
    }
}

/* Gradients of dice_forward: dx [B, H] and dalpha [H] (overwritten). With batch statistics the
 * gradient also flows through mean and variance (batch-norm backward). acc: scratch [2H]. */
void dice_backward(const float *x, const float *p, const float *dy, const float *alpha,
                   const float *mean, const float *rstd, int64_t B, int64_t H, int stats,
                   float *dx, float *dalpha, float *acc) {
    const float inv_b = stats ? 1.0f / (float)B : 0.0f;
#pragma omp parallel if (B * H >= 16384)
    {
        int64_t i0, i1;
        share(H, 16, &i0, &i1);
        dice_back_sums(x, p, dy, alpha, mean, rstd, B, H, i0, i1, inv_b, acc, acc + H, dalpha);
#pragma omp barrier
        share(B, 1, &i0, &i1);
        dice_back_rows(x, p, dy, alpha, mean, rstd, i0, i1, H, acc, acc + H, dx);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Pooled field embeddings of a batch, straight from the table.                               */
/* Fields in model order: S single-ID fields (ids [B, S]), then K sequence fields             */
/* (seqs[k] [B, L[k]] padded, lens[k] [B]); field f's rows start at off[f] in table W [R, D].  */
/* out [B, S + K, D]: the row of a single field, the mean over a sequence (zeros if empty).   */
/* With slot != NULL (int32 [R], all -1 on entry and on return) the batch's distinct rows are  */
/* listed in rows (first-occurrence order) and each lookup's position in that list is written  */
/* to inv, in the order the lookups are visited (sample-major, fields in order).              */
/* Returns the number of distinct rows (0 without slot), -1 if a row is outside the table,    */
/* -2 if a length is outside [0, L[k]].                                                       */
/* ---------------------------------------------------------------------------------------- */
typedef struct {
    const int64_t *ids, *off, *L;
    const int64_t *const *seqs, *const *lens;
    const float *W;
    int64_t B, S, K, R, D;
    float *out;
} Bags;

/* Prefetch sample b's scattered table rows (if rows) and slots (if slot). */
static inline void prefetch_sample(const Bags *a, int64_t b, const int32_t *slot, int rows) {
    for (int64_t s = 0; s < a->S; s++) {
        int64_t r = a->ids[b * a->S + s] + a->off[s];
        if (r >= 0 && r < a->R) {
            if (rows) __builtin_prefetch(a->W + r * a->D);
            if (slot) __builtin_prefetch(slot + r, 1);
        }
    }
    for (int64_t k = 0; k < a->K; k++) {
        const int64_t *q = a->seqs[k] + b * a->L[k];
        for (int64_t t = 0, n = a->lens[k][b]; t < n && t < a->L[k]; t++) {
            int64_t r = q[t] + a->off[a->S + k];
            if (r >= 0 && r < a->R) {
                if (rows) __builtin_prefetch(a->W + r * a->D);
                if (slot) __builtin_prefetch(slot + r, 1);
            }
        }
    }
}

/* Pool samples [b0, b1); with slot, also de-duplicate (then b0 must be 0 and the range is
 * visited in order). Returns U, or -1 / -2 as emb_pool_forward. */
static int64_t pool(const Bags *a, int64_t b0, int64_t b1, int32_t *slot, int64_t *rows,
                    int32_t *inv, int pooling) {
    const int64_t F = a->S + a->K, D = a->D;
    int64_t j = 0, U = 0, err = 0;
    for (int64_t b = b0; b < b1; b++) {
        if (b + 2 < b1) prefetch_sample(a, b + 2, slot, pooling);
        float *ob = a->out + b * F * D;
        if (pooling) memset(ob, 0, sizeof(float) * F * D);
        for (int64_t f = 0; f < F; f++) {
            const int64_t *q;
            int64_t n;
            if (f < a->S) {
                q = a->ids + b * a->S + f, n = 1;
            } else {
                int64_t k = f - a->S;
                q = a->seqs[k] + b * a->L[k], n = a->lens[k][b];
                if (n < 0 || n > a->L[k]) { err = -2; goto done; }
            }
            float *o = ob + f * D;
            for (int64_t t = 0; t < n; t++, j++) {
                int64_t r = q[t] + a->off[f];
                if (r < 0 || r >= a->R) { err = -1; goto done; }
                if (pooling) {
                    const float *w = a->W + r * D;
                    for (int64_t d = 0; d < D; d++) o[d] += w[d];
                }
                if (slot) {
                    int32_t s_ = slot[r];
                    if (s_ < 0) { s_ = (int32_t)U; slot[r] = s_; rows[U++] = r; }
                    inv[j] = s_;
                }
            }
            if (pooling && n > 1) {
                float inv_n = 1.0f / (float)n;
                for (int64_t d = 0; d < D; d++) o[d] *= inv_n;
            }
        }
    }
done:
    if (slot)  /* leave the slot array clean, also after an error */
        for (int64_t u = 0; u < U; u++) slot[rows[u]] = -1;
    return err ? err : U;
}

int64_t emb_pool_forward(const int64_t *ids, int64_t B, int64_t S, const int64_t *off,
                         int64_t K, const int64_t *const *seqs, const int64_t *L,
                         const int64_t *const *lens, const float *W, int64_t R, int64_t D,
                         float *out, int32_t *slot, int64_t *rows, int32_t *inv) {
    const Bags a = {ids, off, L, seqs, lens, W, B, S, K, R, D, out};
    int64_t T = 1, U = 0, err = 0;
#ifdef _OPENMP
    T = B * (S + K) * D >= 8192 ? omp_get_max_threads() : 1;
#endif
    if (T == 1) {  /* one pass does both */
        U = pool(&a, 0, B, slot, rows, inv, 1);
    } else {
        /* Thread 0 de-duplicates (in order); the others pool their share of the samples. */
#pragma omp parallel num_threads(T) reduction(min : err)
        {
            int64_t t = 0, nt = 1;
#ifdef _OPENMP
            t = omp_get_thread_num(), nt = omp_get_num_threads();
#endif
            int64_t workers = slot ? nt - 1 : nt, w = slot ? t - 1 : t;
            if (slot && t == 0) {  /* (a team of one also pools) */
                U = pool(&a, 0, B, slot, rows, inv, workers == 0);
                err = U < 0 ? U : 0;
            } else {
                int64_t r = pool(&a, B * w / workers, B * (w + 1) / workers, NULL, NULL, NULL, 1);
                err = r < 0 ? r : 0;
            }
        }
        if (err < 0) U = err;
    }
    return U;
}

/* Gradient of emb_pool_forward's output gout [B, S + K, D] with respect to the distinct rows:
 * grad [U, D] (overwritten), summed in lookup order (deterministic). */
void emb_pool_backward(const float *restrict gout, int64_t B, int64_t S, int64_t K,
                       const int64_t *const *lens, const int32_t *restrict inv, int64_t U,
                       int64_t D, float *restrict grad) {
    const int64_t F = S + K;
    memset(grad, 0, sizeof(float) * U * D);
    int64_t j = 0;
    for (int64_t b = 0; b < B; b++) {
        const float *gb = gout + b * F * D;
        for (int64_t s = 0; s < S; s++, j++) {
            float *g = grad + (int64_t)inv[j] * D;
            for (int64_t d = 0; d < D; d++) g[d] += gb[s * D + d];
        }
        for (int64_t k = 0; k < K; k++) {
            int64_t n = lens[k][b];
            if (n == 0) continue;
            float scale = 1.0f / (float)n;
            const float *gf = gb + (S + k) * D;
            for (int64_t t = 0; t < n; t++, j++) {
                float *g = grad + (int64_t)inv[j] * D;
                for (int64_t d = 0; d < D; d++) g[d] += scale * gf[d];
            }
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Row-wise (lazy) Adam on the rows of a table: W, m, v [R, D]; rows [U]; grad [U, D].         */
/* The same update as RowWiseOptimizer's torch path; row_lr [U] (or NULL) scales lr per row.   */
/* Returns the largest |update| applied.                                                      */
/* ---------------------------------------------------------------------------------------- */
static float adam_rows(float *restrict W, float *restrict m, float *restrict v,
                       const int64_t *restrict rows, const float *restrict grad, int64_t u0,
                       int64_t u1, int64_t D, float lr, const float *restrict row_lr, float b1,
                       float b2, float eps, float ib1, float ib2, float wd) {
    float linf = 0.0f;
    for (int64_t u = u0; u < u1; u++) {
        if (u + PREFETCH < u1) {  /* rows are scattered: ask for a later row's lines now (~4x) */
            const int64_t q = rows[u + PREFETCH] * D;
            __builtin_prefetch(W + q, 1);
            __builtin_prefetch(m + q, 1);
            __builtin_prefetch(v + q, 1);
        }
        const int64_t r = rows[u];
        float *w = W + r * D, *mr = m + r * D, *vr = v + r * D;
        const float *g = grad + u * D;
        const float a = row_lr ? lr * row_lr[u] : lr;
        for (int64_t d = 0; d < D; d++) {
            float gd = g[d] + wd * w[d];
            float md = b1 * mr[d] + (1.0f - b1) * gd;
            float vd = b2 * vr[d] + (1.0f - b2) * gd * gd;
            mr[d] = md;
            vr[d] = vd;
            float delta = (md * ib1) / (sqrtf(vd * ib2) + eps) * a;
            w[d] -= delta;
            float ad = fabsf(delta);
            linf = ad > linf ? ad : linf;
        }
    }
    return linf;
}

float rowwise_adam(float *W, float *m, float *v, const int64_t *rows, const float *grad,
                   int64_t U, int64_t D, float lr, const float *row_lr, float b1, float b2,
                   float eps, float bc1, float bc2, float wd) {
    float linf = 0.0f;
#pragma omp parallel reduction(max : linf) if (U * D >= 8192)
    {
        int64_t u0, u1;
        share(U, 1, &u0, &u1);  /* rows are distinct: threads never touch the same row */
        linf = adam_rows(W, m, v, rows, grad, u0, u1, D, lr, row_lr, b1, b2, eps, 1.0f / bc1,
                         1.0f / bc2, wd);
    }
    return linf;
}

/* ---------------------------------------------------------------------------------------- */
/* Sampled-softmax rows (stage-1 contrastive loss): z [n, C] logits, row i's positive at      */
/* column col0 + i. Returns sum_i (logsumexp(z_i) - z_i,pos); with grad, z is overwritten by  */
/* softmax(z_i) - onehot(pos), the loss's gradient with respect to the logits.                 */
/* ---------------------------------------------------------------------------------------- */
#define LANES 16
static double softmax_row(float *restrict z, int64_t C, int64_t pos, int grad) {
    float mx[LANES], sm[LANES];
    for (int l = 0; l < LANES; l++) mx[l] = -INFINITY, sm[l] = 0.0f;
    const int64_t C16 = C / LANES * LANES;
    for (int64_t j = 0; j < C16; j += LANES)
        for (int l = 0; l < LANES; l++) mx[l] = z[j + l] > mx[l] ? z[j + l] : mx[l];
    float m = -INFINITY;
    for (int l = 0; l < LANES; l++) m = mx[l] > m ? mx[l] : m;
    for (int64_t j = C16; j < C; j++) m = z[j] > m ? z[j] : m;
    const float zpos = z[pos];
    for (int64_t j = 0; j < C16; j += LANES)
        for (int l = 0; l < LANES; l++) {
            float e = fexp(z[j + l] - m);
            z[j + l] = e;
            sm[l] += e;
        }
    float sum = 0.0f;
    for (int l = 0; l < LANES; l++) sum += sm[l];
    for (int64_t j = C16; j < C; j++) {
        float e = fexp(z[j] - m);
        z[j] = e;
        sum += e;
    }
    if (grad) {
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < C; j++) z[j] *= inv;
        z[pos] -= 1.0f;
    }
    return (double)logf(sum) + (double)m - (double)zpos;
}

double softmax_xent_rows(float *z, int64_t n, int64_t C, int64_t col0, int grad) {
    double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total) if (n * C >= 65536)
    for (int64_t i = 0; i < n; i++) total += softmax_row(z + i * C, C, col0 + i, grad);
    return total;
}

/* ---------------------------------------------------------------------------------------- */
/* Full-catalogue ranking rows: held-out pair i is scored by row row[i] of s [*, C] (row i     */
/* when row is NULL), its item at column pos[i] with score s_pos[i]. Over the candidate        */
/* columns j >= c0: lse[i] = logsumexp(s_ij * inv_tau) (the held-out item included) and       */
/* rank[i] = #{j != pos[i] : s_ij >= s_pos[i]} (pessimistic ties). Masked candidates hold     */
/* -inf and count in neither.                                                                 */
/* ---------------------------------------------------------------------------------------- */
static void rank_row(const float *restrict s, int64_t C, int64_t c0, int64_t pos, float sp,
                     float inv_tau, float *lse, int64_t *rank) {
    float mx[LANES], sm[LANES];
    int32_t cnt[LANES];
    for (int l = 0; l < LANES; l++) mx[l] = -INFINITY, sm[l] = 0.0f, cnt[l] = 0;
    const int64_t n = C - c0, n16 = n / LANES * LANES;
    const float *r = s + c0;
    for (int64_t j = 0; j < n16; j += LANES)
        for (int l = 0; l < LANES; l++) mx[l] = r[j + l] > mx[l] ? r[j + l] : mx[l];
    float m = -INFINITY;
    for (int l = 0; l < LANES; l++) m = mx[l] > m ? mx[l] : m;
    for (int64_t j = n16; j < n; j++) m = r[j] > m ? r[j] : m;
    for (int64_t j = 0; j < n16; j += LANES)
        for (int l = 0; l < LANES; l++) {
            sm[l] += fexp((r[j + l] - m) * inv_tau);
            cnt[l] += r[j + l] >= sp;
        }
    float sum = 0.0f;
    int64_t c = 0;
    for (int l = 0; l < LANES; l++) sum += sm[l], c += cnt[l];
    for (int64_t j = n16; j < n; j++) {
        sum += fexp((r[j] - m) * inv_tau);
        c += r[j] >= sp;
    }
    if (pos >= c0 && s[pos] >= sp) c -= 1;  /* the held-out item itself */
    *lse = m * inv_tau + logf(sum);
    *rank = c;
}

void rank_rows(const float *s, int64_t n, int64_t C, int64_t c0, const int64_t *row,
               const int64_t *pos, const float *s_pos, float inv_tau, float *lse,
               int64_t *rank) {
#pragma omp parallel for schedule(static) if (n * C >= 65536)
    for (int64_t i = 0; i < n; i++)
        rank_row(s + (row ? row[i] : i) * C, C, c0, pos[i], s_pos[i], inv_tau, lse + i, rank + i);
}

/* ---------------------------------------------------------------------------------------- */
/* Top-K columns of each row of s [n, C] (K <= C), by descending score: idx [n, K]. One pass  */
/* with a K-element min-heap; a block of 16 scores is only looked at one by one when its      */
/* maximum beats the heap's minimum, so the pass runs at about memory speed. Ties: any order. */
/* ---------------------------------------------------------------------------------------- */
static void sift_down(float *hv, int64_t *hi, int64_t K, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < K && hv[l] < hv[m]) m = l;
        if (r < K && hv[r] < hv[m]) m = r;
        if (m == i) return;
        float tv = hv[i]; hv[i] = hv[m]; hv[m] = tv;
        int64_t ti = hi[i]; hi[i] = hi[m]; hi[m] = ti;
        i = m;
    }
}

static void topk_row(const float *restrict s, int64_t C, int64_t K, float *hv, int64_t *hi,
                     int64_t *out) {
    for (int64_t j = 0; j < K; j++) hv[j] = s[j], hi[j] = j;
    for (int64_t i = K / 2 - 1; i >= 0; i--) sift_down(hv, hi, K, i);
    int64_t j = K;
    for (; j < C && (j % LANES); j++)
        if (s[j] > hv[0]) hv[0] = s[j], hi[0] = j, sift_down(hv, hi, K, 0);
    for (; j + LANES <= C; j += LANES) {
        float mx = s[j];
        for (int l = 1; l < LANES; l++) mx = s[j + l] > mx ? s[j + l] : mx;
        if (mx > hv[0])
            for (int l = 0; l < LANES; l++)
                if (s[j + l] > hv[0]) hv[0] = s[j + l], hi[0] = j + l, sift_down(hv, hi, K, 0);
    }
    for (; j < C; j++)
        if (s[j] > hv[0]) hv[0] = s[j], hi[0] = j, sift_down(hv, hi, K, 0);
    for (int64_t k = K - 1; k >= 0; k--) {  /* pop the minimum into the last free slot */
        out[k] = hi[0];
        hv[0] = hv[k], hi[0] = hi[k];
        sift_down(hv, hi, k, 0);
    }
}

int topk_rows(const float *s, int64_t n, int64_t C, int64_t K, int64_t *idx) {
    int failed = 0;
#pragma omp parallel if (n * C >= 65536) reduction(| : failed)
    {
        float *hv = malloc(sizeof(float) * K);  /* this thread's heap */
        int64_t *hi = malloc(sizeof(int64_t) * K);
        failed = !hv || !hi;
#pragma omp for schedule(static)  /* every thread reaches the loop, even without buffers */
        for (int64_t i = 0; i < n; i++)
            if (hv && hi) topk_row(s + i * C, C, K, hv, hi, idx + i * K);
        free(hv);
        free(hi);
    }
    return failed;
}

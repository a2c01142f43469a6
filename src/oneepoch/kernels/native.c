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
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int32_t id32;  /* a batch's IDs, sequence entries and lengths */
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

/* How many rows ahead the scattered-row loops prefetch, and samples ahead the pooling does. */
#ifndef PREFETCH
#define PREFETCH 12
#endif
#ifndef POOL_AHEAD
#define POOL_AHEAD 2
#endif

static inline float fsigmoid(float x) { return 1.0f / (1.0f + fexp(-x)); }

/* Prefetch every cache line of a row of D floats (one line at D <= 16, four at D = 64). */
#define PREFETCH_ROW(ptr, D, rw)                                                     \
    do {                                                                             \
        for (int64_t o_ = 0; o_ < (D); o_ += 16) __builtin_prefetch((ptr) + o_, rw); \
    } while (0)

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
/* (IDs, sequence entries and lengths are id32: int32, as the encoded splits store them)     */
/* (seqs[k] [B, L[k]] padded, lens[k] [B]); field f's IDs are [0, lim[f]), its rows start at */
/* off[f] in table W [R, D].                                                                  */
/* out [B, S + K, D]: the row of a single field, the mean over a sequence (zeros if empty).   */
/* With slot != NULL (int32 [R], all -1 on entry and on return) the batch's distinct rows are  */
/* listed in rows (first-occurrence order) and each lookup's position in that list is written  */
/* to inv, in the order the lookups are visited (sample-major, fields in order).              */
/* Returns the number of distinct rows (0 without slot), -1 if an ID is outside its field,    */
/* -2 if a length is outside [0, L[k]].                                                       */
/* ---------------------------------------------------------------------------------------- */
typedef struct {  /* one lookup for the table update: its row, where its gradient comes from */
    int32_t row, src;
} Lookup;

typedef struct {
    const id32 *ids;
    const int64_t *off, *lim, *L;  /* field f: rows [off[f], off[f] + lim[f]) of W */
    const id32 *const *seqs, *const *lens;
    const float *W;
    int64_t B, S, K, R, D;
    float *out;
    const int64_t *sel;  /* sample b is row sel[b] of ids/seqs/lens (NULL: row b) */
    /* NULL, or out: each lookup, in visiting order, appended to the list of its row's owner
     * (owner_of(row, owners)) as the row and (b - b0) * F + f; and fscale[(b - b0) * F + f] the
     * field's pooling scale (1 / its length, 1 for single-ID fields). Rows must fit int32. */
    int64_t owners, cap_list, *lk_n;
    Lookup *lk;
    float *fscale;
} Bags;

static inline int64_t row_of(const int64_t *sel, int64_t b) { return sel ? sel[b] : b; }

/* Which of T threads updates table row r: a multiplicative hash scaled to [0, T) (balanced
 * for any ID order, and no division). */
static inline int64_t owner_of(int64_t r, int64_t T) {
    return (int64_t)((((uint64_t)((uint32_t)r * 2654435761u)) * (uint64_t)T) >> 32);
}

/* Prefetch sample b's scattered table rows (if rows) and slots (if slot). */
static inline void prefetch_sample(const Bags *a, int64_t b, const int32_t *slot, int rows) {
    for (int64_t s = 0; s < a->S; s++) {
        int64_t r = a->ids[b * a->S + s] + a->off[s];
        if (r >= 0 && r < a->R) {
            if (rows) PREFETCH_ROW(a->W + r * a->D, a->D, 0);
            if (slot) __builtin_prefetch(slot + r, 1);
        }
    }
    for (int64_t k = 0; k < a->K; k++) {
        const id32 *q = a->seqs[k] + b * a->L[k];
        for (int64_t t = 0, n = a->lens[k][b]; t < n && t < a->L[k]; t++) {
            int64_t r = q[t] + a->off[a->S + k];
            if (r >= 0 && r < a->R) {
                if (rows) PREFETCH_ROW(a->W + r * a->D, a->D, 0);
                if (slot) __builtin_prefetch(slot + r, 1);
            }
        }
    }
}

/* Prefetch sample b's own (scattered, with sel) rows of ids, sequences and lengths. */
static inline void prefetch_raw(const Bags *a, int64_t b) {
    const int64_t i = row_of(a->sel, b);
    __builtin_prefetch(a->ids + i * a->S);
    for (int64_t k = 0; k < a->K; k++) {
        const id32 *q = a->seqs[k] + i * a->L[k];
        for (int64_t t = 0; t < a->L[k]; t += 16) __builtin_prefetch(q + t);
        __builtin_prefetch(a->lens[k] + i);
    }
}

/* Pool samples [b0, b1); with slot, also de-duplicate (then b0 must be 0 and the range is
 * visited in order). Returns U, or -1 / -2 as emb_pool_forward. Prefetches a sample's table
 * rows POOL_AHEAD samples ahead. The batch is contiguous (chunk_view gathers scattered ones). */
static int64_t pool(const Bags *a, int64_t b0, int64_t b1, int32_t *slot, int64_t *rows,
                    int32_t *inv, int pooling) {
    const int64_t F = a->S + a->K, D = a->D;
    int64_t j = 0, U = 0, err = 0;
    for (int64_t b = b0; b < b1; b++) {
        if (b + POOL_AHEAD < b1) prefetch_sample(a, b + POOL_AHEAD, slot, pooling);
        float *ob = a->out + b * F * D;
        if (pooling) memset(ob, 0, sizeof(float) * F * D);
        for (int64_t f = 0; f < F; f++) {
            const id32 *q;
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
                const int64_t id = q[t], r = id + a->off[f];
                if (id < 0 || id >= a->lim[f] || r >= a->R) { err = -1; goto done; }
                if (a->lk_n) {
                    const int64_t ow = owner_of(r, a->owners);
                    Lookup *e = a->lk + ow * a->cap_list + a->lk_n[ow]++;
                    e->row = (int32_t)r;
                    e->src = (int32_t)((b - b0) * F + f);
                }
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
            if (a->fscale) a->fscale[(b - b0) * F + f] = n > 1 ? 1.0f / (float)n : 1.0f;
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

int64_t emb_pool_forward(const id32 *ids, int64_t B, int64_t S,
                         const int64_t *off, const int64_t *lim, int64_t K,
                         const id32 *const *seqs,
                         const int64_t *L, const id32 *const *lens, const float *W,
                         int64_t R, int64_t D, float *out, int32_t *slot, int64_t *rows,
                         int32_t *inv) {
    const Bags a = {ids, off, lim, L, seqs, lens, W, B, S, K, R, D, out, NULL, 0, 0, NULL,
                    NULL, NULL};
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
 * grad [U, D] (overwritten), summed in lookup order (deterministic). With several threads each
 * owns a block of the distinct rows and adds only their lookups, in the same order. */
static void pool_back_range(const float *restrict gout, int64_t B, int64_t S, int64_t K,
                            const id32 *const *lens, const int32_t *restrict inv, int64_t u0, int64_t u1, int64_t D,
                            float *restrict grad) {
    const int64_t F = S + K;
    memset(grad + u0 * D, 0, sizeof(float) * (u1 - u0) * D);
    int64_t j = 0;
    for (int64_t b = 0; b < B; b++) {
        const float *gb = gout + b * F * D;
        for (int64_t s = 0; s < S; s++, j++) {
            const int64_t u = inv[j];
            if (u < u0 || u >= u1) continue;
            float *g = grad + u * D;
            for (int64_t d = 0; d < D; d++) g[d] += gb[s * D + d];
        }
        for (int64_t k = 0; k < K; k++) {
            int64_t n = lens[k][b];
            if (n == 0) continue;
            float scale = 1.0f / (float)n;
            const float *gf = gb + (S + k) * D;
            for (int64_t t = 0; t < n; t++, j++) {
                const int64_t u = inv[j];
                if (u < u0 || u >= u1) continue;
                float *g = grad + u * D;
                for (int64_t d = 0; d < D; d++) g[d] += scale * gf[d];
            }
        }
    }
}

void emb_pool_backward(const float *gout, int64_t B, int64_t S, int64_t K,
                       const id32 *const *lens, const int32_t *inv,
                       int64_t U, int64_t D, float *grad) {
#pragma omp parallel if (B * (S + K) * D >= 16384)
    {
        int64_t u0, u1;
        share(U, 1, &u0, &u1);
        pool_back_range(gout, B, S, K, lens, inv, u0, u1, D, grad);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Dense Adam at row-wise cost. torch.optim.Adam on a dense table (and TF1's AdamOptimizer)    */
/* decays every row's moments at every step and moves every row by lr/bc1 m/(sqrt(v)/sqrt(bc2) */
/* + eps), gradient or not. Here a row keeps the step it was last brought up to date (last[r]); */
/* when it is next touched (or at sync) the k zero-gradient steps i = t0+1 .. t0+k it missed    */
/* are applied at once: m *= b1^k, v *= b2^k, and w -= m0 F(x), x = sqrt(v0), where             */
/*   F(x) = sum_j w_j / (x + e_j),  w_j = lr (s_i / bc1_i) r^j,  e_j = eps s_i b2^(-j/2),       */
/*   j = i - t0, s_i = sqrt(1 - b2^i), bc1_i = 1 - b1^i, r = b1 / sqrt(b2).                       */
/* Closed form: F ~ W / (x + e~), W = sum w_j, e~ = sum w_j e_j / W (the sums are window sums of */
/* the suffix tables H0, H1, H2 built by kernels/abi.py: sum_{j=1..k} a_{t0+j} q^j =            */
/* q (H(t0+1) - q^k H(t0+k+1)), H(i) = sum_{i'>=i} a_i' q^(i'-i)). It is exact when eps = 0 and */
/* its relative error is sum (w_j/W) (e~ - e_j)^2 / ((x + e_j)(x + e~)) <= var / ((x + e_1)(x + */
/* e~)) (e_j grows with j), var the w-weighted variance of e_j (from H2). An element whose bound */
/* exceeds tol is summed exactly instead, step by step (exact_catch_up).                        */
/* ---------------------------------------------------------------------------------------- */
typedef struct {
    double beta1, beta2, eps, tol;
    int64_t T;           /* H0, H1, H2, s hold i = 0 .. T + 1; from T + 1 on, bc1 = bc2 = 1 */
    const double *H0, *H1, *H2, *s;
    int64_t P;           /* pw holds exponents 0 .. P - 1 of each ratio */
    const double *pw;    /* [5 P]: b1^k, b2^k, r^k, rho^k, rho2^k (rho = b1/b2, rho2 = b1/b2^1.5) */
    double log_q[5];     /* their logs, for exponents >= P */
    double alpha;        /* AdamAR row decay (optim.row_decay_alpha; 0 = off), see ar_log_decay */
    int64_t moves;       /* 1: dense Adam's moves and moment decay; 0: the row decay only (lazy) */
    /* AdamAR: touch [R], the step each row was last in a batch, kept for the rows not updated
     * since the last sync (step *synced); a row with last[r] > *synced was last in a batch at
     * last[r] itself, so the hot path reads neither (adam_catch_up_all refreshes touch) */
    int64_t *touch;
    const int64_t *synced;
} AdamCatchUp;

/* AdamAR's row decay (optim.row_decay_alpha, docs/training.md): a row that misses a step j steps
 * after it was last in a batch is multiplied by 1 - lr min(1, alpha j); over steps j = 1..k by
 *   P(k) = prod_{j=1..k} (1 - lr min(1, alpha j)) = ramp(c, M) (1 - lr)^(k - M),
 * M = min(k, floor(1 / alpha)), c = lr alpha, ramp(c, M) = prod_{j=1..M} (1 - c j). log ramp:
 * a power series in c when c M <= 1e-3 (four terms: error below 1e-15 M), the sum itself for
 * M <= 16, else Stirling's series of lgamma(x) - lgamma(x - M), x = 1 / c (ramp = c^M
 * Gamma(x) / Gamma(x - M)), its last 8 factors taken directly when x - M < 8. Needs lr < 1
 * (lr >= 1 zeroes the row). */
static inline double ar_g(double y) {  /* Stirling's corrections of lgamma */
    const double i = 1.0 / y, i2 = i * i;
    return i * (1.0 / 12 - i2 * (1.0 / 360 - i2 * (1.0 / 1260 - i2 / 1680)));
}

static double ar_log_ramp(double c, double M) {
    if (M <= 0.0) return 0.0;
    const double cm = c * M;
    if (cm <= 1e-3) {  /* -sum_n c^n S_n(M) / n, S_n the power sums */
        const double S1 = M * (M + 1) / 2, S2 = S1 * (2 * M + 1) / 3, S3 = S1 * S1,
                     S4 = S2 * (3 * M * M + 3 * M - 1) / 5;
        return -c * (S1 + c * (S2 / 2 + c * (S3 / 3 + c * S4 / 4)));
    }
    double L = 0.0;
    if (M <= 16) {
        for (double j = 1; j <= M; j++) L += log1p(-c * j);
        return L;
    }
    const double x = 1.0 / c;
    if (x - M < 8) {
        for (int i = 0; i < 8; i++) L += log1p(-c * (M - i));
        M -= 8;
    }
    const double z = x - M;
    return L - (z - 0.5) * log1p(-M / x) - M + ar_g(x) - ar_g(z);
}

/* log P(k) of the comment above (0 < lr < 1, alpha > 0). */
static double ar_log_decay(double alpha, double lr, int64_t k) {
    if (k <= 0) return 0.0;
    const double J = floor(1.0 / alpha), M = (double)k < J ? (double)k : J;
    return ar_log_ramp(lr * alpha, M) + ((double)k - M) * log1p(-lr);
}

/* The decay of steps j = g0 + 1 .. g0 + k of a row's gap: P(g0 + k) / P(g0) (1 when alpha = 0
 * or lr = 0, 0 when lr >= 1). */
static float ar_decay(double alpha, double lr, int64_t g0, int64_t k) {
    if (!(alpha > 0.0) || lr == 0.0 || k <= 0) return 1.0f;
    if (lr >= 1.0) return 0.0f;
    const double L0 = g0 > 0 ? ar_log_decay(alpha, lr, g0) : 0.0;
    return (float)exp(ar_log_decay(alpha, lr, g0 + k) - L0);
}

static inline double cu_pow(const AdamCatchUp *a, int q, int64_t k) {
    return k < a->P ? a->pw[q * a->P + k] : exp((double)k * a->log_q[q]);
}

static inline double cu_window(const AdamCatchUp *a, const double *H, int q, int64_t t0,
                               int64_t k) {
    const int64_t T1 = a->T + 1, i0 = t0 + 1 < T1 ? t0 + 1 : T1, i1 = t0 + k + 1 < T1 ? t0 + k + 1 : T1;
    return a->pw[q * a->P + 1] * (H[i0] - cu_pow(a, q, k) * H[i1]);
}

/* F(x) / lr of the comment above, summed step by step (the few elements the closed form's
 * bound does not cover); stops once the remaining weight is below 1e-12 of S0 = W / lr and adds
 * that remainder at the last e_j (e_j only grows). */
static double exact_catch_up(const AdamCatchUp *a, double x, int64_t t0, int64_t k, double S0) {
    const double b1 = a->beta1, b2 = a->beta2, r = b1 / sqrt(b2), ib2h = 1.0 / sqrt(b2);
    double acc = 0.0, wp = 0.0, rj = 1.0, bj = 1.0, e = a->eps;
    double b1i = pow(b1, (double)t0), b2i = pow(b2, (double)t0);
    for (int64_t j = 1; j <= k; j++) {
        rj *= r, bj *= ib2h, b1i *= b1, b2i *= b2;
        const double si = sqrt(1.0 - b2i), wj = si / (1.0 - b1i) * rj;
        e = a->eps * si * bj;
        acc += wj / (x + e);
        wp += wj;
        if (S0 - wp <= 1e-12 * S0) break;
    }
    if (S0 > wp) acc += (S0 - wp) / (x + e);
    return acc;
}

/* Brings one row (D elements) from step t0 through the k >= 1 zero-gradient steps after it.
 * lr: the row's learning rate. By chunks of 64 elements: the closed form for all (vectorised),
 * then the exact sum for the elements its bound does not cover (if any), then the update. */
static void catch_up_row(float *restrict w, float *restrict m, float *restrict v, int64_t D,
                         int64_t t0, int64_t k, double lr, const AdamCatchUp *a, int64_t r) {
    /* AdamAR: the decay of these k steps of the row's gap (after the moves, below); the gap
     * began at t0 unless the row was last brought up to date by a sync */
    float P = 1.0f;
    if (a->alpha > 0.0)
        P = ar_decay(a->alpha, lr, a->touch && t0 <= *a->synced ? t0 - a->touch[r] : 0, k);
    if (!a->moves) {
        for (int64_t d = 0; d < D; d++) w[d] *= P;
        return;
    }
    const double S0 = cu_window(a, a->H0, 2, t0, k);
    const float b1k = (float)cu_pow(a, 0, k), b2k = (float)cu_pow(a, 1, k);
    float Wf = 0.0f, ebf = 1.0f, e1f = 1.0f, lim = 0.0f;
    if (S0 > 0.0 && lr != 0.0) {
        const double S1 = cu_window(a, a->H1, 3, t0, k), S2 = cu_window(a, a->H2, 4, t0, k);
        const double eb = a->eps * S1 / S0;
        const double var = fmax(a->eps * a->eps * (S2 / S0) - eb * eb, 0.0);
        const int64_t T1 = a->T + 1;
        Wf = (float)(lr * S0);
        ebf = (float)eb > FLT_MIN ? (float)eb : FLT_MIN;  /* (eps = 0: m = 0 where v = 0) */
        e1f = (float)(a->eps * a->s[t0 + 1 < T1 ? t0 + 1 : T1] / sqrt(a->beta2));
        lim = (float)(var / a->tol);  /* exact where (x + e_1)(x + e~) < var / tol */
    }
    float mv[64];
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
        const int64_t n = D - d0 < 64 ? D - d0 : 64;
        float *restrict wc = w + d0, *restrict mc = m + d0, *restrict vc = v + d0;
        int need = 0;
        for (int64_t d = 0; d < n; d++) {
            const float x = sqrtf(vc[d]);
            mv[d] = mc[d] * Wf / (x + ebf);
            need |= ((x + e1f) * (x + ebf) < lim) & (mc[d] != 0.0f);
        }
        if (need)
            for (int64_t d = 0; d < n; d++) {
                const float x = sqrtf(vc[d]);
                if ((x + e1f) * (x + ebf) < lim && mc[d] != 0.0f)
                    mv[d] = (float)((double)mc[d] * lr * exact_catch_up(a, (double)x, t0, k, S0));
            }
        for (int64_t d = 0; d < n; d++) {
            wc[d] = (wc[d] - mv[d]) * P;  /* (x 1 is exact: no decay, no change) */
            mc[d] *= b1k;
            vc[d] *= b2k;
        }
    }
}

/* Brings every row of W, m, v [R, D] with last[r] < t up to step t (Optimizer.sync); row_lr
 * [R] (or NULL) scales lr per row. Returns the rows moved. AdamAR: first sets touch[r] =
 * last[r] for the rows updated since the last sync (the caller then sets *synced = t). */
int64_t adam_catch_up_all(float *W, float *m, float *v, int64_t *last, int64_t R, int64_t D,
                          int64_t t, float lr, const float *row_lr, const AdamCatchUp *a) {
    int64_t n = 0;
    int64_t *touch = a->touch;
    const int64_t prev = touch ? *a->synced : 0;
#pragma omp parallel for schedule(static) reduction(+ : n) if (R * D >= 65536)
    for (int64_t r = 0; r < R; r++) {
        if (touch && last[r] > prev) touch[r] = last[r];
        if (last[r] >= t) continue;
        const double lr_r = row_lr ? (double)lr * row_lr[r] : (double)lr;
        catch_up_row(W + r * D, m + r * D, v + r * D, D, last[r], t - last[r], lr_r, a, r);
        last[r] = t;
        n++;
    }
    return n;
}

/* Dense Adam, before a forward pass: brings the rows the batch looks up (valid lookups only;
 * pooling reports the others) that thread `who` of T owns (owner_of) from last[r] < t up to step
 * t, so the forward and the gradient see what torch.optim.Adam's table would hold, and sets
 * last[r] = mark (t, or t + 1 when the step's update follows for sure). By blocks of samples:
 * their rows listed with last[r] prefetched, then the stale ones' W, m, v rows prefetched, then
 * caught up (rows are scattered: misses in flight together instead of one after another). */
#define CU_BLOCK 16
static void catch_up_lookups(const Bags *a, float *W, float *m, float *v, int64_t *last,
                             int64_t t, int64_t mark, float lr, const float *row_lr,
                             const AdamCatchUp *cu, int64_t who, int64_t T, int64_t *buf) {
    const int64_t S = a->S, K = a->K, D = a->D;
    for (int64_t b0 = 0; b0 < a->B; b0 += CU_BLOCK) {
        const int64_t b1 = b0 + CU_BLOCK < a->B ? b0 + CU_BLOCK : a->B;
        int64_t n = 0, ns = 0;
        for (int64_t b = b0; b < b1; b++) {  /* 1. my rows of these samples */
            const int64_t i = row_of(a->sel, b);
            for (int64_t f = 0; f < S; f++) {
                const int64_t id = a->ids[i * S + f];
                if (id < 0 || id >= a->lim[f]) continue;
                const int64_t r = a->off[f] + id;
                if (T == 1 || owner_of(r, T) == who) {
                    __builtin_prefetch(last + r);
                    buf[n++] = r;
                }
            }
            for (int64_t k = 0; k < K; k++) {
                const int64_t L = a->L[k], lim = a->lim[S + k], off = a->off[S + k];
                int64_t len = a->lens[k][i];
                len = len < 0 ? 0 : (len > L ? L : len);
                const id32 *q = a->seqs[k] + i * L;
                for (int64_t j = 0; j < len; j++) {
                    if (q[j] < 0 || q[j] >= lim) continue;
                    const int64_t r = off + q[j];
                    if (T == 1 || owner_of(r, T) == who) {
                        __builtin_prefetch(last + r);
                        buf[n++] = r;
                    }
                }
            }
        }
        for (int64_t e = 0; e < n; e++)  /* 2. the stale ones (and rows seen first here) */
            if (last[buf[e]] < mark) buf[ns++] = buf[e];
        for (int64_t e = 0; e < ns; e++) {  /* 3. caught up (a row listed twice: once) */
            if (e + PREFETCH < ns) {
                const int64_t q = buf[e + PREFETCH] * D;
                PREFETCH_ROW(W + q, D, 1);
                PREFETCH_ROW(m + q, D, 1);
                PREFETCH_ROW(v + q, D, 1);
            }
            const int64_t r = buf[e], t0 = last[r];
            if (t0 >= mark) continue;
            if (t0 < t) {
                const double lr_r = row_lr ? (double)lr * row_lr[r] : (double)lr;
                catch_up_row(W + r * D, m + r * D, v + r * D, D, t0, t - t0, lr_r, cu, r);
            }
            last[r] = mark;
        }
    }
}

/* Lookups per sample at most (the block buffer of catch_up_lookups holds CU_BLOCK samples'). */
static int64_t lookups_per_sample(const Bags *a) {
    int64_t lps = a->S;
    for (int64_t k = 0; k < a->K; k++) lps += a->L[k];
    return lps;
}

/* 0 if every lookup of samples [b0, b1) is inside its field (and every length inside its
 * padding), else -1. */
static int64_t lookups_valid(const Bags *a, int64_t b0, int64_t b1) {
    const int64_t S = a->S, K = a->K;
    for (int64_t b = b0; b < b1; b++) {
        const int64_t i = row_of(a->sel, b);
        for (int64_t f = 0; f < S; f++) {
            const int64_t id = a->ids[i * S + f];
            if (id < 0 || id >= a->lim[f]) return -1;
        }
        for (int64_t k = 0; k < K; k++) {
            const int64_t L = a->L[k], lim = a->lim[S + k], n = a->lens[k][i];
            if (n < 0 || n > L) return -1;
            const id32 *q = a->seqs[k] + i * L;
            for (int64_t j = 0; j < n; j++)
                if (q[j] < 0 || q[j] >= lim) return -1;
        }
    }
    return 0;
}

/* catch_up_lookups over the whole batch (the autograd path's FieldEmbedding, before pooling),
 * each thread its own rows. Returns -1 (and changes nothing) if a lookup is outside its field
 * (pooling then says which). */
int64_t adam_catch_up_batch(const id32 *ids, int64_t B, int64_t S, const int64_t *off,
                         const int64_t *lim, int64_t K, const id32 *const *seqs,
                         const int64_t *L, const id32 *const *lens, float *W, float *m, float *v,
                         int64_t *last, int64_t R, int64_t D, int64_t t, float lr,
                         const float *row_lr, const AdamCatchUp *cu) {
    const Bags a = {ids, off, lim, L, seqs, lens, W, B, S, K, R, D, NULL, NULL, 0, 0, NULL,
                    NULL, NULL};
    if (lookups_valid(&a, 0, B)) return -1;
#pragma omp parallel if (B * (S + K) * D >= 8192)
    {
        int64_t who = 0, T = 1;
#ifdef _OPENMP
        who = omp_get_thread_num(), T = omp_get_num_threads();
#endif
        int64_t *buf = malloc(sizeof(int64_t) * CU_BLOCK * lookups_per_sample(&a));
        if (buf) catch_up_lookups(&a, W, m, v, last, t, t, lr, row_lr, cu, who, T, buf);
        free(buf);
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Row-wise (lazy) Adam on the rows of a table: W, m, v [R, D]; rows [U]; grad [U, D].         */
/* The same update as RowWiseOptimizer's torch path; row_lr [U] (or NULL) scales lr per row.   */
/* Returns the largest |update| applied. Dense (last != NULL): each row is first brought up to */
/* step t - 1 (catch_up_row), then updated at step t, and last[row] = t.                       */
/* ---------------------------------------------------------------------------------------- */
static float adam_rows(float *restrict W, float *restrict m, float *restrict v,
                       const int64_t *restrict rows, const float *restrict grad, int64_t u0,
                       int64_t u1, int64_t D, float lr, const float *restrict row_lr,
                       const float *restrict lr_of_row, float b1, float b2, float eps,
                       float ib1, float ib2, float wd, int64_t *restrict last, int64_t t,
                       const AdamCatchUp *cu) {
    float linf = 0.0f;
    for (int64_t u = u0; u < u1; u++) {
        if (last) {  /* dense: the steps this row missed, then this one */
            const int64_t r = rows[u], t0 = last[r];
            if (t0 < t - 1) {
                const float a = row_lr ? lr * row_lr[u] : (lr_of_row ? lr * lr_of_row[r] : lr);
                catch_up_row(W + r * D, m + r * D, v + r * D, D, t0, t - 1 - t0, (double)a, cu,
                             r);
            }
            last[r] = t;
        }
        if (u + PREFETCH < u1) {  /* rows are scattered: ask for a later row's lines now (~4x) */
            const int64_t q = rows[u + PREFETCH] * D;
            PREFETCH_ROW(W + q, D, 1);
            PREFETCH_ROW(m + q, D, 1);
            PREFETCH_ROW(v + q, D, 1);
        }
        const int64_t r = rows[u];
        float *w = W + r * D, *mr = m + r * D, *vr = v + r * D;
        const float *g = grad + u * D;
        const float a = row_lr ? lr * row_lr[u] : (lr_of_row ? lr * lr_of_row[r] : lr);
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
                   float eps, float bc1, float bc2, float wd, int64_t *last, int64_t t,
                   const AdamCatchUp *cu) {
    float linf = 0.0f;
#pragma omp parallel reduction(max : linf) if (U * D >= 8192)
    {
        int64_t u0, u1;
        share(U, 1, &u0, &u1);  /* rows are distinct: threads never touch the same row */
        linf = adam_rows(W, m, v, rows, grad, u0, u1, D, lr, row_lr, NULL, b1, b2, eps,
                         1.0f / bc1, 1.0f / bc2, wd, last, t, cu);
    }
    return linf;
}

/* ---------------------------------------------------------------------------------------- */
/* Hash join of int64 keys: a table of the distinct keys with, per key, the chain of positions */
/* holding it (ascending). Used to find stage 1's accidental hits and to sum duplicate rows of  */
/* a sparse gradient, in O(n) instead of a sort.                                               */
/* ---------------------------------------------------------------------------------------- */
typedef struct {
    int64_t mask;
    int64_t *key;   /* [mask + 1] distinct keys (slot empty when head < 0) */
    int32_t *head;  /* [mask + 1] first position of the slot's key, -1 = empty */
    int32_t *tail;  /* [mask + 1] last position of the slot's key (while building) */
    int32_t *next;  /* [n] next position with the same key, -1 = last */
} KeyIndex;

static inline uint64_t key_hash(int64_t k) {
    uint64_t h = (uint64_t)k * 0x9E3779B97F4A7C15ull;
    return h ^ (h >> 29);
}

static void key_index_free(KeyIndex *t) {
    free(t->key), free(t->head), free(t->tail), free(t->next);
}

/* Index keys[0..n): returns 0, or -1 if out of memory. Chains list positions in ascending order. */
static int key_index_build(KeyIndex *t, const int64_t *keys, int64_t n) {
    int64_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    t->mask = cap - 1;
    t->key = malloc(sizeof(int64_t) * cap), t->head = malloc(sizeof(int32_t) * cap);
    t->tail = malloc(sizeof(int32_t) * cap);
    t->next = malloc(sizeof(int32_t) * (n > 0 ? n : 1));
    if (!t->key || !t->head || !t->tail || !t->next || n > INT32_MAX) {
        key_index_free(t);
        return -1;
    }
    for (int64_t i = 0; i < cap; i++) t->head[i] = -1;
    int32_t *tail = t->tail;
    for (int64_t i = 0; i < n; i++) {
        uint64_t h = key_hash(keys[i]) & (uint64_t)t->mask;
        while (t->head[h] >= 0 && t->key[h] != keys[i]) h = (h + 1) & (uint64_t)t->mask;
        t->next[i] = -1;
        if (t->head[h] < 0) {
            t->head[h] = (int32_t)i, t->key[h] = keys[i], tail[h] = (int32_t)i;
        } else {
            t->next[tail[h]] = (int32_t)i, tail[h] = (int32_t)i;
        }
    }
    return 0;
}

static inline int32_t key_index_find(const KeyIndex *t, int64_t k) {
    uint64_t h = key_hash(k) & (uint64_t)t->mask;
    while (t->head[h] >= 0) {
        if (t->key[h] == k) return t->head[h];
        h = (h + 1) & (uint64_t)t->mask;
    }
    return -1;
}

/* Stage 1's accidental hits: the (row i, column j) pairs with cand[j] == pos[i], j != i (and
 * j >= n unless in_batch), rows ascending, columns ascending within a row. Writes at most cap
 * pairs to hr, hc and returns the total number (call again with more room if it is larger);
 * -1 if out of memory. */
int64_t accidental_hits(const int64_t *pos, int64_t n, const int64_t *cand, int64_t C,
                        int in_batch, int64_t *hr, int64_t *hc, int64_t cap) {
    KeyIndex t;
    if (key_index_build(&t, cand, C) < 0) return -1;
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++)
        for (int32_t j = key_index_find(&t, pos[i]); j >= 0; j = t.next[j]) {
            if (j == i || (!in_batch && j < n)) continue;
            if (k < cap) hr[k] = i, hc[k] = j;
            k++;
        }
    key_index_free(&t);
    return k;
}

/* Sum the rows of vals [n, D] that share an index: rows_out [U] gets the distinct indices in
 * order of first appearance, sums [U, D] their sums (added in position order). Returns U, or
 * -1 if out of memory. rows_out and sums need room for n rows. */
int64_t coalesce_rows(const int64_t *idx, const float *vals, int64_t n, int64_t D,
                      int64_t *rows_out, float *sums) {
    KeyIndex t;
    if (key_index_build(&t, idx, n) < 0) return -1;
    int64_t U = 0;
    for (int64_t i = 0; i < n; i++) {  /* distinct keys, in order of first appearance */
        const int32_t j = key_index_find(&t, idx[i]);
        if (j != i) continue;
        float *restrict o = sums + U * D;
        memcpy(o, vals + i * D, sizeof(float) * D);
        for (int32_t q = t.next[i]; q >= 0; q = t.next[q]) {
            const float *restrict v = vals + (int64_t)q * D;
            for (int64_t e = 0; e < D; e++) o[e] += v[e];
        }
        rows_out[U++] = idx[i];
    }
    key_index_free(&t);
    return U;
}

/* ---------------------------------------------------------------------------------------- */
/* Sampled-softmax rows (stage-1 contrastive loss): z [n, C] logits, row i's positive at      */
/* column col0 + i. Returns sum_i (logsumexp(z_i) - z_i,pos); with grad, z is overwritten by  */
/* softmax(z_i) - onehot(pos), the loss's gradient with respect to the logits.                 */
/* ---------------------------------------------------------------------------------------- */
#define LANES 16
/* Row max of z [C]. */
static float row_max(const float *restrict z, int64_t C) {
    float mx[LANES];
    for (int l = 0; l < LANES; l++) mx[l] = -INFINITY;
    const int64_t C16 = C / LANES * LANES;
    for (int64_t j = 0; j < C16; j += LANES)
        for (int l = 0; l < LANES; l++) mx[l] = z[j + l] > mx[l] ? z[j + l] : mx[l];
    float m = -INFINITY;
    for (int l = 0; l < LANES; l++) m = mx[l] > m ? mx[l] : m;
    for (int64_t j = C16; j < C; j++) m = z[j] > m ? z[j] : m;
    return m;
}

/* The first two passes of a softmax over n rows of z [n, C] (row i's positive at column
 * col0 + i): z becomes exp(z - row max) and inv_sum [n] 1 / the row sums (a caller can fold the
 * normalisation and the one-hot into its GEMMs); returns the rows' summed loss.
 * Software-pipelined: the exp pass of row i also takes the max of row i + 1, whose loads then
 * hide under row i's arithmetic instead of a pass of their own (~30% faster; same results). */
static double softmax_rows_exp(float *restrict z, int64_t n, int64_t C, int64_t col0,
                               float *restrict inv_sum) {
    const int64_t C16 = C / LANES * LANES;
    double loss = 0.0;
    float m = n > 0 ? row_max(z, C) : 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float *restrict zr = z + i * C;
        const float *restrict nz = zr + C;  /* the next row: only read while i + 1 < n */
        const float zpos = zr[col0 + i];
        float mx[LANES], sm[LANES];
        for (int l = 0; l < LANES; l++) mx[l] = -INFINITY, sm[l] = 0.0f;
        if (i + 1 < n) {
            for (int64_t j = 0; j < C16; j += LANES)
                for (int l = 0; l < LANES; l++) {
                    const float e = fexp(zr[j + l] - m);
                    zr[j + l] = e;
                    sm[l] += e;
                    mx[l] = nz[j + l] > mx[l] ? nz[j + l] : mx[l];
                }
        } else {
            for (int64_t j = 0; j < C16; j += LANES)
                for (int l = 0; l < LANES; l++) {
                    const float e = fexp(zr[j + l] - m);
                    zr[j + l] = e;
                    sm[l] += e;
                }
        }
        float sum = 0.0f, next = -INFINITY;
        for (int l = 0; l < LANES; l++) sum += sm[l], next = mx[l] > next ? mx[l] : next;
        for (int64_t j = C16; j < C; j++) {
            const float e = fexp(zr[j] - m);
            zr[j] = e;
            sum += e;
            if (i + 1 < n) next = nz[j] > next ? nz[j] : next;
        }
        inv_sum[i] = 1.0f / sum;
        loss += (double)logf(sum) + (double)m - (double)zpos;
        m = next;
    }
    return loss;
}

static double softmax_row(float *restrict z, int64_t C, int64_t pos, int grad) {
    float inv;
    const double loss = softmax_rows_exp(z, 1, C, pos, &inv);
    if (grad) {
        for (int64_t j = 0; j < C; j++) z[j] *= inv;
        z[pos] -= 1.0f;
    }
    return loss;
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

/* ---------------------------------------------------------------------------------------- */
/* One whole training step of the Embedding & Dice-MLP model (paper A's base model) with BCE, */
/* row-wise Adam on the table and Adam on the MLP, in one call: no autograd graph, no Python  */
/* between the passes.                                                                        */
/*                                                                                            */
/* The batch is cut into fixed chunks of CHUNK_ROWS samples; in one OpenMP region each thread */
/* takes chunks t, t + T, ... through pooling, every layer's GEMMs (PyTorch's own BLAS,       */
/* sgemm_ handed over by set_sgemm, one thread per call), Dice, the loss and the backward, so */
/* a chunk's activations stay in its core's cache. Batch-wide sums (Dice statistics, weight   */
/* gradients, the loss) are per-chunk partials added in chunk order, and each thread updates  */
/* the table rows it owns (owner_of), visiting their lookups in batch order: the numbers do not */
/* depend on the thread count, and match the autograd path within float tolerance            */
/* (tests/test_fused_step.py).                                                                */
/* ---------------------------------------------------------------------------------------- */
typedef void (*sgemm_t)(const char *, const char *, const int *, const int *, const int *,
                        const float *, const float *, const int *, const float *, const int *,
                        const float *, float *, const int *);
static sgemm_t sgemm_fn = NULL;
#define MAX_LAYERS 64   /* linear layers of the fused step's MLP, at most */
#define MAX_SEQS 64     /* sequence fields, at most */
#define CHUNK_ROWS 256  /* samples per chunk */
/* A chunk's lookup counters (one per owner, bumped at every lookup) start a cache line of
 * their own: two threads pooling their chunks must not share one. */
#define LKN_STRIDE(T) (((T) + 7) & ~(int64_t)7)

void set_sgemm(void *f) { sgemm_fn = (sgemm_t)f; }

/* Row-major C [M, N] = alpha op(A) op(B) + beta C, through column-major sgemm (C^T = ...). */
static void gemm_rm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha,
                    const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
                    float *C, int64_t ldc) {
    const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
    const int m = (int)N, n = (int)M, k = (int)K, la = (int)lda, lb = (int)ldb, lc = (int)ldc;
    sgemm_fn(&cb, &ca, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

typedef struct {
    /* the batch: sample b is row sel[b] (sel NULL: row b) of ids [*, S], seqs[k] [*, L[k]],
     * lens[k] [*] and label [*] */
    const id32 *ids;
    const int64_t *sel;
    const id32 *const *seqs;
    const int64_t *L;
    const id32 *const *lens;
    const float *label;
    int64_t B, S, K;
    /* the table W [R, D], its Adam moments, field row offsets and ID counts (rows of field f:
     * [off[f], off[f] + lim[f])), slot array (int32 [R], -1) */
    float *W, *Wm, *Wv;
    const int64_t *off, *lim;
    int32_t *slot;
    int64_t R, D;
    float emb_lr, emb_bc1, emb_bc2;
    const float *emb_row_lr;  /* NULL, or [R]: per-row multipliers of emb_lr */
    /* dense Adam on the table: emb_last [R] each row's last step (NULL: lazy), emb_t this
     * step (set by ctr_steps), emb_catch the catch-up tables */
    int64_t *emb_last;
    int64_t emb_t;
    const AdamCatchUp *emb_catch;
    /* the MLP: n_layers linear layers, width[0..n_layers] (width[0] = (S + K) * D, last 1);
     * dense parameters in the order W_0, b_0, alpha_0, W_1, b_1, alpha_1, ..., W_last, b_last,
     * each with its gradient buffer, Adam moments and step counter (float, as torch keeps it) */
    int64_t n_layers;
    const int64_t *width;
    float *const *p, *const *g, *const *m, *const *v, *const *step;
    float *const *run_mean, *const *run_var;
    float dice_eps, dice_momentum;
    /* Adam settings (shared by both optimizers) */
    float lr, beta1, beta2, eps, wd;
    /* scratch: ctr_step_scratch(B, n_layers, width, cap, D, threads) floats */
    float *scratch;
    int64_t cap;      /* lookups per batch at most: B * (S + sum L) */
    int64_t threads;  /* threads to use (the scratch was sized for at least this many) */
    /* out */
    int64_t status;  /* 0, emb_pool_forward's error code (-1, -2), or -3: sizes out of range */
    int64_t unique_rows;
    double *prof;  /* NULL, or [PROF_N] seconds per phase, accumulated (benchmarks) */
} CtrStep;

/* The ABI Python relies on (kernels/abi.py checks it when it loads the library, so a library
 * built from another version of this file is refused instead of read out of step). Bump
 * ONEEPOCH_ABI whenever a signature, a struct passed by pointer or a limit changes. */
#define ONEEPOCH_ABI 3
#define OFF(f) offsetof(CtrStep, f)
static const int64_t ctr_step_offsets[] = {  /* every field, in declaration order */
    OFF(ids), OFF(sel), OFF(seqs), OFF(L), OFF(lens), OFF(label), OFF(B), OFF(S), OFF(K),
    OFF(W), OFF(Wm), OFF(Wv), OFF(off), OFF(lim), OFF(slot), OFF(R), OFF(D), OFF(emb_lr),
    OFF(emb_bc1), OFF(emb_bc2), OFF(emb_row_lr), OFF(emb_last), OFF(emb_t), OFF(emb_catch), OFF(n_layers), OFF(width), OFF(p), OFF(g),
    OFF(m), OFF(v), OFF(step), OFF(run_mean), OFF(run_var), OFF(dice_eps),
    OFF(dice_momentum), OFF(lr), OFF(beta1), OFF(beta2), OFF(eps), OFF(wd), OFF(scratch),
    OFF(cap), OFF(threads), OFF(status), OFF(unique_rows), OFF(prof)};
#undef OFF
#define OFF(f) offsetof(AdamCatchUp, f)
static const int64_t catch_up_offsets[] = {
    OFF(beta1), OFF(beta2), OFF(eps), OFF(tol), OFF(T), OFF(H0), OFF(H1), OFF(H2), OFF(s),
    OFF(P), OFF(pw), OFF(log_q), OFF(alpha), OFF(moves), OFF(touch), OFF(synced)};
#undef OFF

/* out[0..n) = ABI version, sizeof(CtrStep), MAX_LAYERS, MAX_SEQS, sizeof(AdamCatchUp), the
 * numbers of CtrStep and AdamCatchUp fields F and G, then the F and G field offsets in
 * declaration order; returns how many values there are (call with n = 0 to size out). */
int64_t oneepoch_abi(int64_t *out, int64_t n) {
    const int64_t F = (int64_t)(sizeof(ctr_step_offsets) / sizeof(ctr_step_offsets[0]));
    const int64_t G = (int64_t)(sizeof(catch_up_offsets) / sizeof(catch_up_offsets[0]));
    const int64_t head[] = {ONEEPOCH_ABI, (int64_t)sizeof(CtrStep), MAX_LAYERS, MAX_SEQS,
                            (int64_t)sizeof(AdamCatchUp), F, G};
    const int64_t H = (int64_t)(sizeof(head) / sizeof(head[0]));
    for (int64_t i = 0; i < n && i < H + F + G; i++)
        out[i] = i < H ? head[i] : (i < H + F ? ctr_step_offsets[i - H]
                                              : catch_up_offsets[i - H - F]);
    return H + F + G;
}

/* Phases of the profile, as thread 0 sees them (waits at barriers included): pool, forward
 * GEMMs, Dice forward, loss, backward GEMMs, Dice backward, embedding backward + row-wise
 * Adam, weight-gradient sums + dense Adam, and (dense Adam on the table) the rows' catch-up
 * before pooling. */
#define PROF_N 9
static inline double now_s(void) {
#ifdef _OPENMP
    return omp_get_wtime();
#else
    return 0.0;
#endif
}

typedef struct {  /* where ctr_step keeps things in the scratch */
    float *x0, *logit, *glogit, *part, *wpart, *bufA, *bufB, *egrad;
    double *lossc;
    int64_t *rows, *lk_n;
    id32 *graw;
    Lookup *lk;
    float *fscale;
    float *z[MAX_LAYERS], *pp[MAX_LAYERS], *y[MAX_LAYERS], *mean[MAX_LAYERS];
    float *var[MAX_LAYERS], *rstd[MAX_LAYERS], *sg[MAX_LAYERS], *sgx[MAX_LAYERS];
    int64_t hs[MAX_LAYERS];  /* per-thread stride of mean..sgx of layer l (each thread its copy) */
    int64_t woff[MAX_LAYERS], n_wb, max_h, mw, NC;
} Layout;

static inline float *align16(float *base, float *s) {
    return base + ((s - base + 15) & ~(int64_t)15);
}

/* Lays out the scratch (base NULL: only counts); returns its size in floats. */
static int64_t layout(Layout *o, float *base, int64_t B, int64_t NL, const int64_t *w,
                      int64_t cap, int64_t lps, int64_t D, int64_t T) {
    float *s = base;
    o->NC = (B + CHUNK_ROWS - 1) / CHUNK_ROWS;
    o->max_h = 1, o->mw = w[0], o->n_wb = 0;
    for (int64_t i = 0; i < NL; i++) {
        o->woff[i] = o->n_wb;
        o->n_wb += w[i] * w[i + 1] + w[i + 1];
        if (i > 0) o->max_h = w[i] > o->max_h ? w[i] : o->max_h;
        o->mw = w[i] > o->mw ? w[i] : o->mw;
    }
#define TAKE(dst, n) do { s = align16(base, s); dst = s; s += (n); } while (0)
    TAKE(o->x0, B * w[0]);
    TAKE(o->logit, B);
    TAKE(o->glogit, B);
    float *tmp;
    TAKE(tmp, 2 * o->NC);
    o->lossc = (double *)tmp;
    for (int64_t l = 1; l < NL; l++) {
        const int64_t hs = o->hs[l] = (w[l] + 15) & ~(int64_t)15;
        TAKE(o->z[l], B * w[l]);
        TAKE(o->pp[l], B * w[l]);
        TAKE(o->y[l], B * w[l]);
        TAKE(o->mean[l], T * hs);
        TAKE(o->var[l], T * hs);
        TAKE(o->rstd[l], T * hs);
        TAKE(o->sg[l], T * hs);
        TAKE(o->sgx[l], T * hs);
    }
    TAKE(o->part, 2 * NL * o->NC * 3 * o->max_h);  /* forward and backward, per layer */
    TAKE(o->wpart, o->NC * o->n_wb);
    TAKE(o->bufA, o->NC * CHUNK_ROWS * o->mw);  /* chunk-major: chunk ch at ch * CHUNK_ROWS * mw */
    TAKE(o->bufB, o->NC * CHUNK_ROWS * o->mw);
    TAKE(o->egrad, cap * D);  /* shared: each thread's distinct rows in a region of their own */
    TAKE(tmp, 2 * cap);
    o->rows = (int64_t *)tmp;
    const int64_t n_lk = T * o->NC * lps * CHUNK_ROWS;
    TAKE(tmp, 2 * LKN_STRIDE(T) * o->NC);  /* a cache line (or more) per chunk */
    o->lk_n = (int64_t *)tmp;
    TAKE(tmp, 2 * n_lk);
    o->lk = (Lookup *)tmp;
    TAKE(o->fscale, o->NC * CHUNK_ROWS * (w[0] / D));
    TAKE(tmp, 2 * B * (lps + w[0] + 1));  /* the batch's own rows, gathered per chunk */
    o->graw = (id32 *)tmp;
#undef TAKE
    return (s - base) + 16;
}

int64_t ctr_step_scratch(int64_t B, int64_t n_layers, const int64_t *width, int64_t cap,
                         int64_t D, int64_t threads) {
    Layout o;
    if (n_layers > MAX_LAYERS || n_layers < 1) return -1;
    if (B < 1) return -1;
    return layout(&o, NULL, B, n_layers, width, cap, cap / B, D, threads < 1 ? 1 : threads);
}

/* Column sums of x [., H] over rows [b0, b1) (into out, overwritten). */
static void col_sums(const float *restrict x, int64_t b0, int64_t b1, int64_t H,
                     float *restrict out) {
    memset(out, 0, sizeof(float) * H);
    for (int64_t b = b0; b < b1; b++) {
        const float *xr = x + b * H;
        for (int64_t h = 0; h < H; h++) out[h] += xr[h];
    }
}

static void col_sqdev(const float *restrict x, int64_t b0, int64_t b1, int64_t H,
                      const float *restrict mean, float *restrict out) {
    memset(out, 0, sizeof(float) * H);
    for (int64_t b = b0; b < b1; b++) {
        const float *xr = x + b * H;
        for (int64_t h = 0; h < H; h++) {
            float d = xr[h] - mean[h];
            out[h] += d * d;
        }
    }
}

/* Dice backward's column partials over rows [b0, b1): out [3H] = sum g, sum g * xn, dalpha. */
static void dice_back_partial(const float *restrict x, const float *restrict p,
                              const float *restrict dy, const float *restrict alpha,
                              const float *restrict mean, const float *restrict rstd,
                              int64_t b0, int64_t b1, int64_t H, float *restrict sg,
                              float *restrict sgx, float *restrict da) {
    memset(sg, 0, sizeof(float) * H);
    memset(sgx, 0, sizeof(float) * H);
    memset(da, 0, sizeof(float) * H);
    for (int64_t b = b0; b < b1; b++) {
        const float *xr = x + b * H, *pr = p + b * H, *dr = dy + b * H;
        for (int64_t h = 0; h < H; h++) {
            float dyx = dr[h] * xr[h];
            float g = dyx * (1.0f - alpha[h]) * pr[h] * (1.0f - pr[h]);
            float xn = (xr[h] - mean[h]) * rstd[h];
            sg[h] += g;
            sgx[h] += g * xn;
            da[h] += dyx * (1.0f - pr[h]);
        }
    }
}

/* Sum of the chunk partials part[c * stride + j] over chunks, for columns [h0, h1). */
static void sum_parts(const float *restrict part, int64_t NC, int64_t stride, int64_t h0,
                      int64_t h1, float scale, float *restrict out) {
    for (int64_t h = h0; h < h1; h++) out[h] = 0.0f;
    for (int64_t c = 0; c < NC; c++)
        for (int64_t h = h0; h < h1; h++) out[h] += part[c * stride + h];
    for (int64_t h = h0; h < h1; h++) out[h] *= scale;
}

static void adam_slice(float *restrict p, const float *restrict g, float *restrict m,
                       float *restrict v, int64_t i0, int64_t i1, float step_size,
                       float bc2_sqrt, float b1, float b2, float eps, float wd) {
    for (int64_t i = i0; i < i1; i++) {
        float gi = g[i] + wd * p[i];
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
    }
}

/* Samples [b0, b0 + nb) of a batch as a batch of their own (sel NULL, samples 0..nb-1): with a
 * scattered batch (sel) their rows are first gathered into graw (independent loads, in flight
 * together, instead of misses inside the pooling loop; gather 0: they already are), else
 * pointers into the arrays. gseq and glen receive the sequence and length pointers; graw needs
 * nb * (S + sum L + K) int64. */
static void chunk_view(const Bags *all, int64_t b0, int64_t nb, id32 *graw,
                       const id32 **gseq, const id32 **glen, Bags *a, int gather) {
    const int64_t S = all->S, K = all->K;
    *a = *all;
    if (all->sel) {
        id32 *g = graw + nb * S;
        for (int64_t k = 0; k < K; k++) {
            gseq[k] = g, g += nb * all->L[k];
            glen[k] = g, g += nb;
        }
        for (int64_t b = 0; b < nb && gather; b++) {
            if (b + 16 < nb) prefetch_raw(all, b0 + b + 16);
            const int64_t i = all->sel[b0 + b];
            memcpy(graw + b * S, all->ids + i * S, sizeof(id32) * S);
            for (int64_t k = 0; k < K; k++) {
                memcpy((id32 *)gseq[k] + b * all->L[k], all->seqs[k] + i * all->L[k],
                       sizeof(id32) * all->L[k]);
                ((id32 *)glen[k])[b] = all->lens[k][i];
            }
        }
        a->ids = graw;
    } else {
        for (int64_t k = 0; k < K; k++) {
            gseq[k] = all->seqs[k] + b0 * all->L[k];
            glen[k] = all->lens[k] + b0;
        }
        a->ids = all->ids + b0 * S;
    }
    a->seqs = gseq, a->lens = glen, a->sel = NULL, a->B = nb;
}

/* This thread's gradient sums and Adam updates for the table rows it owns (owner_of),
 * from the lookups pooling listed for it, chunk by chunk: in batch order. */
static int64_t emb_update_owned(const CtrStep *c, const Layout *o, const float *restrict dX,
                                int64_t t, int64_t T, int64_t *restrict rows,
                                float *restrict egrad) {
    const int64_t D = c->D;
    int64_t per_chunk = c->S;
    for (int64_t k = 0; k < c->K; k++) per_chunk += c->L[k];
    per_chunk *= CHUNK_ROWS;
    int32_t *restrict slot = c->slot;
    int64_t U = 0;
    for (int64_t ch = 0; ch < o->NC; ch++) {
        const int64_t at = (ch * T + t) * per_chunk, n = o->lk_n[ch * LKN_STRIDE(T) + t];
        const Lookup *restrict lk = o->lk + at;
        const float *gx = dX + ch * CHUNK_ROWS * o->mw;  /* chunk-major, pooling scales applied */
        for (int64_t e = 0; e < n; e++) {
            if (e + 16 < n) __builtin_prefetch(slot + lk[e + 16].row);
            const int64_t r = lk[e].row;
            const float *gf = gx + (int64_t)lk[e].src * D;
            int32_t u = slot[r];
            float *ge;
            if (u < 0) {
                u = (int32_t)U++;
                slot[r] = u;
                rows[u] = r;
                PREFETCH_ROW(c->Wm + r * D, D, 1);  /* for the Adam pass */
                PREFETCH_ROW(c->Wv + r * D, D, 1);
                ge = egrad + (int64_t)u * D;
                for (int64_t d = 0; d < D; d++) ge[d] = gf[d];
            } else {
                ge = egrad + (int64_t)u * D;
                for (int64_t d = 0; d < D; d++) ge[d] += gf[d];
            }
        }
    }
    /* (dense Adam: the rows were caught up, and their last step set, before pooling) */
    adam_rows(c->W, c->Wm, c->Wv, rows, egrad, 0, U, D, c->emb_lr, NULL, c->emb_row_lr,
              c->beta1, c->beta2, c->eps, 1.0f / c->emb_bc1, 1.0f / c->emb_bc2, c->wd,
              NULL, 0, NULL);
    for (int64_t u = 0; u < U; u++) slot[rows[u]] = -1;
    return U;
}

/* What every phase of one ctr_step reads, shared by the threads (set up before the parallel
 * region), and a thread's own view. */
typedef struct {
    CtrStep *c;
    Layout o;
    const int64_t *w;
    int64_t B, NL, D, NC, lps, per_chunk, n_dense;
    float inv_b;
    Bags bags;
    /* dense Adam's bias corrections, once per parameter (counters advance after the step) */
    float step_size[3 * MAX_LAYERS], bc2_sqrt[3 * MAX_LAYERS];
    int64_t err;  /* pooling's error code (a lookup outside its field), else 0 */
    int gathered; /* the batch's scattered samples are already gathered (step_catch_up) */
} Step;

typedef struct {
    int64_t t, nt;  /* this thread, of nt */
    double tp;      /* thread 0's clock at the last phase mark (profiling) */
} Thread;

static inline void tick(const Step *s, Thread *th, int k) {
    if (s->c->prof && th->t == 0) {
        const double t_ = now_s();
        s->c->prof[k] += t_ - th->tp;
        th->tp = t_;
    }
}

/* A thread's chunks ch = t, t + nt, ...: samples [CB0, CB1); CHUNK_BUF: chunk ch's rows in
 * bufA / bufB. */
#define CHUNKS for (int64_t ch = th->t; ch < s->NC; ch += th->nt)
#define CB0 (ch * CHUNK_ROWS)
#define CB1 (CB0 + CHUNK_ROWS < s->B ? CB0 + CHUNK_ROWS : s->B)
#define CHUNK_BUF(buf) ((buf) + ch * CHUNK_ROWS * s->o.mw)

/* 1. pooled embeddings of my chunks (their lookups listed by owner for step 5) */
static void step_pool(Step *s, Thread *th) {
    const CtrStep *c = s->c;
    const Layout *o = &s->o;
    const int64_t nt = th->nt;
    CHUNKS {
        Bags a;  /* the chunk as a batch of its own */
        const id32 *gseq[MAX_SEQS], *glen[MAX_SEQS];
        chunk_view(&s->bags, CB0, CB1 - CB0, o->graw + CB0 * (s->lps + c->K), gseq, glen, &a,
                   !s->gathered);
        a.out = o->x0 + CB0 * (c->S + c->K) * s->D;
        const int64_t at = ch * nt * s->per_chunk;
        a.owners = nt, a.cap_list = s->per_chunk, a.lk_n = o->lk_n + ch * LKN_STRIDE(nt);
        a.lk = o->lk + at, a.fscale = o->fscale + CB0 * (c->S + c->K);
        for (int64_t q = 0; q < nt; q++) a.lk_n[q] = 0;
        const int64_t r = pool(&a, 0, CB1 - CB0, NULL, NULL, NULL, 1);
        if (r < 0) {
#pragma omp atomic write
            s->err = r;
        }
    }
    tick(s, th, 0);
}

/* 0. (dense Adam on the table) the rows the batch looks up, brought up to the previous step
 * before pooling reads them, and marked with this step: each thread gathers and checks its
 * chunks (a batch with a lookup outside its field changes nothing), then catches up the rows
 * it owns over all chunks. */
static void step_catch_up(Step *s, Thread *th) {
    CtrStep *c = s->c;
    const Layout *o = &s->o;
    const id32 *gseq[MAX_SEQS], *glen[MAX_SEQS];
    Bags a;
    CHUNKS {
        chunk_view(&s->bags, CB0, CB1 - CB0, o->graw + CB0 * (s->lps + c->K), gseq, glen, &a, 1);
        if (lookups_valid(&a, 0, CB1 - CB0)) {
#pragma omp atomic write
            s->err = -1;
        }
    }
    s->gathered = 1;  /* (every thread writes the same) */
#pragma omp barrier
    if (!s->err) {
        int64_t *buf = (int64_t *)o->lk + th->t * s->per_chunk;  /* free until pooling */
        for (int64_t ch = 0; ch < s->NC; ch++) {
            chunk_view(&s->bags, CB0, CB1 - CB0, o->graw + CB0 * (s->lps + c->K), gseq, glen,
                       &a, 0);
            catch_up_lookups(&a, c->W, c->Wm, c->Wv, c->emb_last, c->emb_t - 1, c->emb_t,
                             c->emb_lr, c->emb_row_lr, c->emb_catch, th->t, th->nt, buf);
        }
    }
#pragma omp barrier
    tick(s, th, 8);
}

/* 2. forward: Linear -> Dice (batch statistics from chunk partials) ... -> logit. Returns 0
 * (in every thread alike) if pooling failed: then nothing may be updated. */
static int step_forward(Step *s, Thread *th) {
    const CtrStep *c = s->c;
    const Layout *o = &s->o;
    const int64_t *w = s->w, NL = s->NL, NC = s->NC, B = s->B, t = th->t;
    const float *h = o->x0;
    const int64_t st = 3 * o->max_h;
    for (int64_t i = 0; i < NL; i++) {
        const int64_t win = w[i], wout = w[i + 1];
        const float *Wi = c->p[3 * i], *bi = c->p[3 * i + 1];
        float *zi = i + 1 < NL ? o->z[i + 1] : o->logit;
        CHUNKS {
            for (int64_t b = CB0; b < CB1; b++)
                memcpy(zi + b * wout, bi, sizeof(float) * wout);
            gemm_rm(0, 1, CB1 - CB0, wout, win, 1.0f, h + CB0 * win, win, Wi, win, 1.0f,
                    zi + CB0 * wout, wout);
        }
        tick(s, th, 1);
        if (i + 1 == NL) break;
        const int64_t l = i + 1, H = wout;
        float *part = o->part + l * NC * st;
        float *mean = o->mean[l] + t * o->hs[l], *var = o->var[l] + t * o->hs[l];
        float *rstd = o->rstd[l] + t * o->hs[l];
        CHUNKS {  /* the chunk's mean and squared deviations from it */
            float *cm = part + ch * st, *m2 = cm + o->max_h;
            col_sums(zi, CB0, CB1, H, cm);
            const float inv_n = 1.0f / (float)(CB1 - CB0);
            for (int64_t j = 0; j < H; j++) cm[j] *= inv_n;
            col_sqdev(zi, CB0, CB1, H, cm, m2);
        }
#pragma omp barrier
        if (s->err) return 0;  /* a lookup was out of range: update nothing */
        /* batch statistics from the chunks' (Chan et al.), in chunk order */
        for (int64_t j = 0; j < H; j++) mean[j] = 0.0f, var[j] = 0.0f;
        for (int64_t ch = 0; ch < NC; ch++) {
            const float n_c = (float)(CB1 - CB0), *cm = part + ch * st;
            for (int64_t j = 0; j < H; j++) mean[j] += n_c * cm[j];
        }
        for (int64_t j = 0; j < H; j++) mean[j] *= s->inv_b;
        for (int64_t ch = 0; ch < NC; ch++) {
            const float n_c = (float)(CB1 - CB0), *cm = part + ch * st;
            const float *m2 = cm + o->max_h;
            for (int64_t j = 0; j < H; j++) {
                const float d = cm[j] - mean[j];
                var[j] += m2[j] + n_c * d * d;
            }
        }
        for (int64_t j = 0; j < H; j++) {
            var[j] *= s->inv_b;
            rstd[j] = 1.0f / sqrtf(var[j] + c->dice_eps);
        }
        int64_t h0, h1;  /* the running statistics: a slice per thread */
        share(H, 16, &h0, &h1);
        float *rm = c->run_mean[i], *rv = c->run_var[i];
        const float mo = c->dice_momentum, unb = (float)B / (float)(B - 1);
        for (int64_t j = h0; j < h1; j++) {
            rm[j] += mo * (mean[j] - rm[j]);
            rv[j] += mo * (var[j] * unb - rv[j]);
        }
        CHUNKS dice_rows(zi, c->p[3 * i + 2], CB0, CB1, H, mean, rstd, o->pp[l], o->y[l]);
        h = o->y[l];
        tick(s, th, 2);
    }
    if (NL == 1) {  /* no statistics barrier above */
#pragma omp barrier
        return !s->err;
    }
    return 1;
}

/* 3. the loss and its gradient with respect to the logits, per chunk */
static void step_loss(Step *s, Thread *th) {
    const CtrStep *c = s->c;
    const Layout *o = &s->o;
    CHUNKS {
        double lc = 0.0;
        for (int64_t b = CB0; b < CB1; b++) {
            if (c->sel && b + 16 < CB1) __builtin_prefetch(c->label + c->sel[b + 16]);
            const float zb = o->logit[b], lb = c->label[row_of(c->sel, b)];
            lc += (double)(fmaxf(zb, 0.0f) - zb * lb + log1pf(expf(-fabsf(zb))));
            o->glogit[b] = (1.0f / (1.0f + expf(-zb)) - lb) * s->inv_b;
        }
        o->lossc[ch] = lc;
    }
    tick(s, th, 3);
}

/* 4. backward, last layer first: weight and bias partials per chunk, dH = G W into the buffer
 * G is not in, then Dice's backward from there into the other. Returns the gradient of the
 * pooled embeddings (chunk-major, pooling scales applied). */
static const float *step_backward(Step *s, Thread *th) {
    const CtrStep *c = s->c;
    const Layout *o = &s->o;
    const int64_t *w = s->w, NL = s->NL, NC = s->NC, D = s->D, t = th->t;
    const int64_t st = 3 * o->max_h;
    const float *G = o->glogit;
    float *dH = o->bufA;
    for (int64_t i = NL - 1; i >= 0; i--) {
        const int64_t win = w[i], wout = w[i + 1];
        const float *Hin = i == 0 ? o->x0 : o->y[i];
        dH = G == o->bufA ? o->bufB : o->bufA;
        CHUNKS {
            float *wp = o->wpart + ch * o->n_wb + o->woff[i];
            const int64_t nb = CB1 - CB0;
            const float *Gc = G == o->glogit ? G + CB0 * wout : CHUNK_BUF(G);
            gemm_rm(1, 0, wout, win, nb, 1.0f, Gc, wout, Hin + CB0 * win, win, 0.0f, wp, win);
            col_sums(Gc, 0, nb, wout, wp + wout * win);
            gemm_rm(0, 0, nb, win, wout, 1.0f, Gc, wout, c->p[3 * i], win, 0.0f, CHUNK_BUF(dH),
                    win);
            if (i == 0) {  /* the gradient of each looked-up row: pooling's scale */
                const int64_t F = c->S + c->K;
                float *dx = CHUNK_BUF(dH);
                const float *fs = o->fscale + CB0 * F;
                for (int64_t b = 0; b < nb; b++)
                    for (int64_t f = c->S; f < F; f++) {
                        const float sc = fs[b * F + f];
                        float *g = dx + (b * F + f) * D;
                        if (sc != 1.0f)
                            for (int64_t d = 0; d < D; d++) g[d] *= sc;
                    }
            }
        }
        tick(s, th, 4);
        if (i == 0) break;
        const int64_t H = win;
        float *next = dH == o->bufA ? o->bufB : o->bufA;
        float *part = o->part + (NL + i) * NC * st;
        const float *alpha = c->p[3 * (i - 1) + 2];
        const float *mean = o->mean[i] + t * o->hs[i], *rstd = o->rstd[i] + t * o->hs[i];
        float *sg = o->sg[i] + t * o->hs[i], *sgx = o->sgx[i] + t * o->hs[i];
        CHUNKS {
            float *pt = part + ch * st;
            dice_back_partial(o->z[i] + CB0 * H, o->pp[i] + CB0 * H, CHUNK_BUF(dH), alpha, mean,
                              rstd, 0, CB1 - CB0, H, pt, pt + o->max_h, pt + 2 * o->max_h);
        }
#pragma omp barrier
        sum_parts(part, NC, st, 0, H, s->inv_b, sg);
        sum_parts(part + o->max_h, NC, st, 0, H, s->inv_b, sgx);
        int64_t h0, h1;
        share(H, 16, &h0, &h1);
        sum_parts(part + 2 * o->max_h, NC, st, h0, h1, 1.0f, c->g[3 * (i - 1) + 2]);
        CHUNKS dice_back_rows(o->z[i] + CB0 * H, o->pp[i] + CB0 * H, CHUNK_BUF(dH), alpha, mean,
                              rstd, 0, CB1 - CB0, H, sg, sgx, CHUNK_BUF(next));
        G = next;
        tick(s, th, 5);
    }
    return dH;
}

/* 5. (after every thread's backward) the table rows I own: gradient sums in lookup order,
 * row-wise Adam. Returns how many rows I updated. */
static int64_t step_table(Step *s, Thread *th, const float *dX) {
    const Layout *o = &s->o;
    const int64_t t = th->t, nt = th->nt;
#pragma omp barrier
    int64_t at = 0;  /* my region: after the lookups of the threads before me */
    for (int64_t q = 0; q < t; q++)
        for (int64_t ch = 0; ch < s->NC; ch++) at += o->lk_n[ch * LKN_STRIDE(nt) + q];
    const int64_t U = emb_update_owned(s->c, o, dX, t, nt, o->rows + at, o->egrad + at * s->D);
    tick(s, th, 6);
    return U;
}

/* 6. weight and bias gradients (chunk partials in chunk order) and dense Adam, by slices of
 * every parameter */
static void step_dense(Step *s, Thread *th) {
    const CtrStep *c = s->c;
    const Layout *o = &s->o;
    const int64_t *w = s->w;
    for (int64_t j = 0; j < s->n_dense; j++) {
        const int64_t layer = j / 3, kind = j % 3;
        const int64_t n = kind == 0 ? w[layer] * w[layer + 1] : w[layer + 1];
        int64_t e0, e1;
        share(n, 16, &e0, &e1);
        if (kind < 2) {
            const int64_t at = o->woff[layer] + (kind ? w[layer] * w[layer + 1] : 0);
            sum_parts(o->wpart + at, s->NC, o->n_wb, e0, e1, 1.0f, c->g[j]);
        }
        adam_slice(c->p[j], c->g[j], c->m[j], c->v[j], e0, e1, s->step_size[j], s->bc2_sqrt[j],
                   c->beta1, c->beta2, c->eps, c->wd);
    }
    tick(s, th, 7);
}
#undef CHUNK_BUF
#undef CHUNKS
#undef CB0
#undef CB1

/* Returns the batch's mean BCE loss (NaN with status != 0 if a lookup was outside the table:
 * then nothing has been updated). A chunk stays with its thread from pooling to its last
 * gradient, so the only barriers are where batch-wide sums are needed: each hidden layer's
 * Dice statistics (forward and backward; every thread then adds the chunk partials itself, in
 * chunk order, into its own copy) and before the updates. */
double ctr_step(CtrStep *c) {
    const int64_t B = c->B, NL = c->n_layers, D = c->D;
    const int64_t T = c->threads < 1 ? 1 : c->threads;
    if (NL < 1 || NL > MAX_LAYERS || c->K > MAX_SEQS || B < 2 || c->R > INT32_MAX) {
        c->status = -3;  /* outside what the scratch and the fixed arrays allow */
        return NAN;
    }
    Step s;
    s.c = c, s.w = c->width, s.B = B, s.NL = NL, s.D = D, s.err = 0, s.gathered = 0;
    s.lps = c->S;  /* lookups per sample, at most */
    for (int64_t k = 0; k < c->K; k++) s.lps += c->L[k];
    layout(&s.o, c->scratch, B, NL, s.w, c->cap, s.lps, D, T);
    s.NC = s.o.NC, s.n_dense = 3 * NL - 1;
    for (int64_t j = 0; j < s.n_dense; j++) {
        const float t = *c->step[j] + 1.0f;
        s.step_size[j] = c->lr / (1.0f - powf(c->beta1, t));
        s.bc2_sqrt[j] = sqrtf(1.0f - powf(c->beta2, t));
    }
    const Bags bags = {c->ids, c->off, c->lim, c->L, c->seqs, c->lens, c->W, B, c->S, c->K,
                       c->R, D, s.o.x0, c->sel, 0, 0, NULL, NULL, NULL};
    s.bags = bags;
    s.per_chunk = s.lps * CHUNK_ROWS;  /* lookups of a chunk, at most */
    s.inv_b = 1.0f / (float)B;
    int64_t U = 0;
#pragma omp parallel num_threads(T) reduction(+ : U)
    {
        Thread th = {0, 1, 0.0};
#ifdef _OPENMP
        th.t = omp_get_thread_num(), th.nt = omp_get_num_threads();
#endif
        th.tp = (c->prof && th.t == 0) ? now_s() : 0.0;
        if (c->emb_last) step_catch_up(&s, &th);
        step_pool(&s, &th);
        if (step_forward(&s, &th)) {
            step_loss(&s, &th);
            const float *dX = step_backward(&s, &th);
            U += step_table(&s, &th, dX);
            step_dense(&s, &th);
        }
    }
    if (s.err) {
        c->status = s.err;
        return NAN;
    }
    c->status = 0;
    c->unique_rows = U;
    for (int64_t j = 0; j < s.n_dense; j++) *c->step[j] += 1.0f;
    double loss = 0.0;
    for (int64_t ch = 0; ch < s.NC; ch++) loss += s.o.lossc[ch];
    return loss / (double)B;
}

/* Consecutive steps in one call (no Python between them): step k trains on the sample rows
 * rows[k B, min((k + 1) B, n_rows)) of the batch arrays (c->sel; rows NULL: the arrays' own
 * rows, then n_rows = B and one step), with the table's Adam bias corrections at step
 * t0 + k + 1 (1 - beta^t, in double). losses[k] gets step k's loss. Stops at the first step that fails (c->status says
 * why; nothing of that step is applied) and returns the number of steps done. */
int64_t ctr_steps(CtrStep *c, const int64_t *rows, int64_t n_rows, int64_t B, double beta1,
                  double beta2, int64_t t0, double *losses) {
    const int64_t n = (n_rows + B - 1) / B;
    for (int64_t k = 0; k < n; k++) {
        const int64_t b0 = k * B;
        c->sel = rows ? rows + b0 : NULL;
        c->B = n_rows - b0 < B ? n_rows - b0 : B;
        const double t = (double)(t0 + k + 1);
        c->emb_bc1 = (float)(1.0 - pow(beta1, t));
        c->emb_bc2 = (float)(1.0 - pow(beta2, t));
        c->emb_t = t0 + k + 1;
        losses[k] = ctr_step(c);
        if (c->status) return k;
    }
    return n;
}

/* ---------------------------------------------------------------------------------------- */
/* Stage 1's sampled softmax (paper B, Eq. 1) over row blocks of `blk` users, in one call:    */
/* per block z = inv_tau * u_blk c^T (sgemm), minus logq, accidental hits (hr, hc; sorted by  */
/* row, block k's at [hit_start[k], hit_start[k + 1])) and, without in-batch negatives, the   */
/* other positives masked, then the row softmax / loss / logit gradient (softmax_row), then   */
/* gu_blk = G c and gc += G^T u_blk. Blocks go to NACC accumulators of gc (block k to k % NACC, */
/* in block order), each owned by one thread; gc is their sum in accumulator order, so the    */
/* numbers do not depend on the thread count. u [n, d], c [C, d]; gu [n, d], gc [C, d]         */
/* (unscaled: the caller multiplies by 1 / (n tau)); zbuf: T * blk * C floats; acc:          */
/* (NACC - 1) * C * d floats. Returns the summed loss.                                        */
/* ---------------------------------------------------------------------------------------- */
#define NACC 4

int64_t contrastive_scratch(int64_t blk, int64_t C, int64_t d, int64_t threads) {
    return (threads < 1 ? 1 : threads) * blk * (C + d + 1) + (NACC - 1) * C * d + 16;
}

double contrastive_blocks(const float *u, const float *c, int64_t n, int64_t C, int64_t d,
                          float inv_tau, const float *logq, const int64_t *hr, const int64_t *hc,
                          const int64_t *hit_start, int in_batch, int64_t blk, int want_grad,
                          float *gu, float *gc, float *scratch, int64_t threads) {
    const int64_t NB = (n + blk - 1) / blk, T = threads < 1 ? 1 : threads;
    double loss_b[4096];  /* per-block losses, summed in block order */
    double *lb = NB <= 4096 ? loss_b : malloc(sizeof(double) * NB);
    if (!lb) return NAN;
    float *acc[NACC];
    acc[0] = gc;
    for (int q = 1; q < NACC; q++) acc[q] = scratch + T * blk * C + (q - 1) * C * d;
#pragma omp parallel num_threads(T)
    {
        int64_t t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(), nt = omp_get_num_threads();
#endif
        float *z = scratch + t * blk * C;
        float *us = scratch + T * blk * C + (NACC - 1) * C * d + t * blk * (d + 1);
        float *isum = us + blk * d;  /* 1 / row sums, and u_blk scaled by them */
        for (int64_t q = t; q < NACC; q += nt) {
            int first = 1;
            for (int64_t k = q; k < NB; k += NACC) {
                const int64_t a = k * blk, nb = a + blk < n ? blk : n - a;
                gemm_rm(0, 1, nb, C, d, inv_tau, u + a * d, d, c, d, 0.0f, z, C);
                for (int64_t i = 0; logq && i < nb; i++)
                    for (int64_t j = 0; j < C; j++) z[i * C + j] -= logq[j];
                for (int64_t h = hit_start[k]; h < hit_start[k + 1]; h++)
                    z[(hr[h] - a) * C + hc[h]] = -INFINITY;
                for (int64_t i = 0; !in_batch && i < nb; i++) {
                    float *zr = z + i * C;
                    const float keep = zr[a + i];
                    for (int64_t j = 0; j < n; j++) zr[j] = -INFINITY;
                    zr[a + i] = keep;
                }
                lb[k] = softmax_rows_exp(z, nb, C, a, isum);
                if (want_grad) {  /* G = diag(isum) E - onehot(pos), folded into the GEMMs */
                    float *gub = gu + a * d;
                    gemm_rm(0, 0, nb, d, C, 1.0f, z, C, c, d, 0.0f, gub, d);
                    for (int64_t i = 0; i < nb; i++) {
                        const float *ci = c + (a + i) * d, *ui = u + (a + i) * d;
                        float *g = gub + i * d, *ur = us + i * d;
                        for (int64_t e = 0; e < d; e++) {
                            g[e] = g[e] * isum[i] - ci[e];
                            ur[e] = ui[e] * isum[i];
                        }
                    }
                    gemm_rm(1, 0, C, d, nb, 1.0f, z, C, us, d, first ? 0.0f : 1.0f, acc[q], d);
                    for (int64_t i = 0; i < nb; i++) {
                        const float *ui = u + (a + i) * d;
                        float *gr = acc[q] + (a + i) * d;
                        for (int64_t e = 0; e < d; e++) gr[e] -= ui[e];
                    }
                    first = 0;
                }
            }
            if (want_grad && first) memset(acc[q], 0, sizeof(float) * C * d);
        }
        if (want_grad) {
#pragma omp barrier
            int64_t e0, e1;
            share(C * d, 16, &e0, &e1);
            for (int q = 1; q < NACC; q++)
                for (int64_t e = e0; e < e1; e++) gc[e] += acc[q][e];
        }
    }
    double total = 0.0;
    for (int64_t k = 0; k < NB; k++) total += lb[k];
    if (lb != loss_b) free(lb);
    return total;
}

/* ---------------------------------------------------------------------------------------- */
/* Click probabilities of the same model in eval mode (Dice with its running statistics):     */
/* the forward half of ctr_step without batch statistics, so every chunk is independent: each */
/* thread gathers, pools and runs its chunks through the MLP in its own buffers, no barriers.  */
/* Uses of CtrStep: the batch, W, off, lim, R, D, n_layers, width, p, run_mean, run_var, dice_eps,  */
/* scratch (ctr_forward_scratch floats), threads, status. prob [B] is written.                */
/* ---------------------------------------------------------------------------------------- */
int64_t ctr_forward_scratch(int64_t n_layers, const int64_t *width, int64_t lps, int64_t K,
                            int64_t threads) {
    int64_t mw = 1, hsum = 0;
    for (int64_t i = 0; i <= n_layers; i++) mw = width[i] > mw ? width[i] : mw;
    for (int64_t i = 1; i < n_layers; i++) hsum += width[i];
    const int64_t per_thread = 4 * CHUNK_ROWS * mw + 2 * CHUNK_ROWS * (lps + K) + 32;
    return (threads < 1 ? 1 : threads) * per_thread + hsum + 16;
}

void ctr_forward(CtrStep *c, float *prob) {
    const int64_t B = c->B, NL = c->n_layers, D = c->D;
    const int64_t *w = c->width;
    const int64_t T = c->threads < 1 ? 1 : c->threads;
    if (NL < 1 || NL > MAX_LAYERS || c->K > MAX_SEQS) {
        c->status = -3;
        return;
    }
    int64_t lps = c->S, mw = 1;
    for (int64_t k = 0; k < c->K; k++) lps += c->L[k];
    for (int64_t i = 0; i <= NL; i++) mw = w[i] > mw ? w[i] : mw;
    const int64_t per_thread = 4 * CHUNK_ROWS * mw + 2 * CHUNK_ROWS * (lps + c->K) + 32;
    const int64_t NC = (B + CHUNK_ROWS - 1) / CHUNK_ROWS;
    float *rstd = c->scratch + T * per_thread;  /* 1 / sqrt(running var + eps), per layer */
    const float *rs[MAX_LAYERS];
    for (int64_t i = 1, at = 0; i < NL; at += w[i], i++) {
        for (int64_t j = 0; j < w[i]; j++)
            rstd[at + j] = 1.0f / sqrtf(c->run_var[i - 1][j] + c->dice_eps);
        rs[i] = rstd + at;
    }
    const Bags bags = {c->ids, c->off, c->lim, c->L, c->seqs, c->lens, c->W, B, c->S, c->K,
                       c->R, D, NULL, c->sel, 0, 0, NULL, NULL, NULL};
    int64_t err = 0;
#pragma omp parallel num_threads(T)
    {
        int64_t e = 0;  /* this thread's error */
        int64_t t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(), nt = omp_get_num_threads();
#endif
        float *base = c->scratch + t * per_thread;
        float *x0 = base, *h1 = x0 + CHUNK_ROWS * mw, *h2 = h1 + CHUNK_ROWS * mw;
        float *pp = h2 + CHUNK_ROWS * mw;
        id32 *graw = (id32 *)align16(c->scratch, pp + CHUNK_ROWS * mw);
        for (int64_t ch = t; ch < NC && !e; ch += nt) {
            const int64_t b0 = ch * CHUNK_ROWS, nb = b0 + CHUNK_ROWS < B ? CHUNK_ROWS : B - b0;
            Bags a;
            const id32 *gseq[MAX_SEQS], *glen[MAX_SEQS];
            chunk_view(&bags, b0, nb, graw, gseq, glen, &a, 1);
            a.out = x0;
            const int64_t r = pool(&a, 0, nb, NULL, NULL, NULL, 1);
            if (r < 0) { e = r; break; }
            const float *h = x0;
            for (int64_t i = 0; i < NL; i++) {
                const int64_t win = w[i], wout = w[i + 1];
                float *z = h == h1 ? h2 : h1;
                for (int64_t b = 0; b < nb; b++)
                    memcpy(z + b * wout, c->p[3 * i + 1], sizeof(float) * wout);
                gemm_rm(0, 1, nb, wout, win, 1.0f, h, win, c->p[3 * i], win, 1.0f, z, wout);
                if (i + 1 < NL) {  /* Dice in place of z: y = z * (alpha + (1 - alpha) p) */
                    float *y = z == h1 ? h2 : h1;
                    if (y == h) y = x0;  /* the buffer not holding z or h */
                    dice_rows(z, c->p[3 * i + 2], 0, nb, wout, c->run_mean[i], rs[i + 1], pp, y);
                    h = y;
                } else {
                    for (int64_t b = 0; b < nb; b++) prob[b0 + b] = fsigmoid(z[b]);
                }
            }
        }
        if (e) {
#pragma omp atomic write
            err = e;
        }
    }
    c->status = err;
}

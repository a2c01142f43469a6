/* oneepoch's CPU kernels: the hot loops of one training step, each a single pass over memory.
 *
 * Built on first use by oneepoch/kernels/__init__.py (plain C11, no torch headers, loaded with
 * ctypes); every function has a pure-PyTorch twin that gives the same numbers within float
 * tolerance (tests/test_kernels.py compares them). Arrays are C-contiguous float32 / int64 /
 * int32, sizes are int64. Loops are written so that the inner loop runs over independent lanes
 * (columns or embedding dims) and vectorises without reassociating sums.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp(x) for float: 2^(x log2 e) with a degree-5 polynomial on the fraction (rel. err ~2e-7).
 * Inlined and vectorisable, unlike libm's expf without -ffast-math. */
static inline float fexp(float x) {
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
    return p * u.f;
}

/* How many rows ahead the scattered-row loops prefetch. */
#define PREFETCH 12

static inline float fsigmoid(float x) { return 1.0f / (1.0f + fexp(-x)); }

/* ---------------------------------------------------------------------------------------- */
/* Dice (DIN): y = x * (alpha + (1 - alpha) * p), p = sigmoid((x - mean) * rstd).            */
/* x, y, p: [B, H]. With batch statistics (stats = 1) mean and the biased variance over the    */
/* batch are written to mean/var; otherwise mean/var are read (running statistics).           */
/* ---------------------------------------------------------------------------------------- */
void dice_forward(const float *restrict x, const float *restrict alpha, int64_t B, int64_t H,
                  int stats, float eps, float *restrict mean, float *restrict var,
                  float *restrict rstd, float *restrict p, float *restrict y) {
    if (stats) {
        for (int64_t h = 0; h < H; h++) mean[h] = 0.0f, var[h] = 0.0f;
        for (int64_t b = 0; b < B; b++) {
            const float *xr = x + b * H;
            for (int64_t h = 0; h < H; h++) mean[h] += xr[h];
        }
        for (int64_t h = 0; h < H; h++) mean[h] /= (float)B;
        for (int64_t b = 0; b < B; b++) {
            const float *xr = x + b * H;
            for (int64_t h = 0; h < H; h++) {
                float d = xr[h] - mean[h];
                var[h] += d * d;
            }
        }
        for (int64_t h = 0; h < H; h++) var[h] /= (float)B;
    }
    for (int64_t h = 0; h < H; h++) rstd[h] = 1.0f / sqrtf(var[h] + eps);
    for (int64_t b = 0; b < B; b++) {
        const float *xr = x + b * H;
        float *pr = p + b * H, *yr = y + b * H;
        for (int64_t h = 0; h < H; h++) {
            float ph = fsigmoid((xr[h] - mean[h]) * rstd[h]);
            pr[h] = ph;
            yr[h] = xr[h] * (alpha[h] + (1.0f - alpha[h]) * ph);
        }
    }
}

/* Gradients of dice_forward: dx [B, H] and dalpha [H] (overwritten). With batch statistics the
 * gradient also flows through mean and variance (batch-norm backward). acc: scratch [2H]. */
void dice_backward(const float *restrict x, const float *restrict p, const float *restrict dy,
                   const float *restrict alpha, const float *restrict mean,
                   const float *restrict rstd, int64_t B, int64_t H, int stats,
                   float *restrict dx, float *restrict dalpha, float *restrict acc) {
    float *sg = acc, *sgx = acc + H;
    for (int64_t h = 0; h < H; h++) sg[h] = 0.0f, sgx[h] = 0.0f, dalpha[h] = 0.0f;
    for (int64_t b = 0; b < B; b++) {
        const float *xr = x + b * H, *pr = p + b * H, *dr = dy + b * H;
        for (int64_t h = 0; h < H; h++) {
            float dyx = dr[h] * xr[h];
            float g = dyx * (1.0f - alpha[h]) * pr[h] * (1.0f - pr[h]);  /* d loss / d xn */
            float xn = (xr[h] - mean[h]) * rstd[h];
            sg[h] += g;
            sgx[h] += g * xn;
            dalpha[h] += dyx * (1.0f - pr[h]);
        }
    }
    float inv_b = stats ? 1.0f / (float)B : 0.0f;
    for (int64_t h = 0; h < H; h++) sg[h] *= inv_b, sgx[h] *= inv_b;
    for (int64_t b = 0; b < B; b++) {
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

/* ---------------------------------------------------------------------------------------- */
/* Pooled field embeddings of a batch, straight from the table.                               */
/* Fields in model order: S single-ID fields (ids [B, S]), then K sequence fields             */
/* (seqs[k] [B, L[k]] padded, lens[k] [B]); field f's rows start at off[f] in table W [R, D].  */
/* out [B, S + K, D]: the row of a single field, the mean over a sequence (zeros if empty).   */
/* With slot != NULL (int32 [R], all -1 on entry and on return) the batch's distinct rows are  */
/* listed in rows (first-occurrence order) and each lookup's position in that list is written  */
/* to inv, in the order the lookups are visited (sample-major, fields in order).              */
/* Returns the number of distinct rows (0 without slot); -1 - j if lookup j is outside the     */
/* table, -(2^40) if a length is outside [0, L[k]].                                          */
/* ---------------------------------------------------------------------------------------- */
int64_t emb_pool_forward(const int64_t *restrict ids, int64_t B, int64_t S, const int64_t *off,
                         int64_t K, const int64_t *const *seqs, const int64_t *L,
                         const int64_t *const *lens, const float *restrict W, int64_t R,
                         int64_t D, float *restrict out, int32_t *restrict slot,
                         int64_t *restrict rows, int32_t *restrict inv) {
    const int64_t F = S + K;
    int64_t j = 0, U = 0, err = 0;
#define TAKE(r_expr)                                                              \
    do {                                                                          \
        int64_t r_ = (r_expr);                                                    \
        if (r_ < 0 || r_ >= R) { err = -1 - j; goto fail; }                         \
        const float *w_ = W + r_ * D;                                             \
        for (int64_t d = 0; d < D; d++) o[d] += w_[d];                            \
        if (slot) {                                                               \
            int32_t s_ = slot[r_];                                                \
            if (s_ < 0) { s_ = (int32_t)U; slot[r_] = s_; rows[U++] = r_; }       \
            inv[j] = s_;                                                          \
        }                                                                         \
        j++;                                                                      \
    } while (0)
    for (int64_t b = 0; b < B; b++) {
        const int64_t pb = b + 2;  /* prefetch a later sample's table rows (and slots) */
        if (pb < B) {
            for (int64_t s = 0; s < S; s++) {
                int64_t r = ids[pb * S + s] + off[s];
                if (r >= 0 && r < R) {
                    __builtin_prefetch(W + r * D);
                    if (slot) __builtin_prefetch(slot + r, 1);
                }
            }
            for (int64_t k = 0; k < K; k++) {
                int64_t n = lens[k][pb];
                const int64_t *q = seqs[k] + pb * L[k];
                for (int64_t t = 0; t < n && t < L[k]; t++) {
                    int64_t r = q[t] + off[S + k];
                    if (r >= 0 && r < R) {
                        __builtin_prefetch(W + r * D);
                        if (slot) __builtin_prefetch(slot + r, 1);
                    }
                }
            }
        }
        float *ob = out + b * F * D;
        memset(ob, 0, sizeof(float) * F * D);
        for (int64_t s = 0; s < S; s++) {
            float *o = ob + s * D;
            TAKE(ids[b * S + s] + off[s]);
        }
        for (int64_t k = 0; k < K; k++) {
            float *o = ob + (S + k) * D;
            int64_t n = lens[k][b];
            if (n < 0 || n > L[k]) { err = -((int64_t)1 << 40); goto fail; }
            const int64_t *q = seqs[k] + b * L[k];
            for (int64_t t = 0; t < n; t++) TAKE(q[t] + off[S + k]);
            if (n > 1) {
                float inv_n = 1.0f / (float)n;
                for (int64_t d = 0; d < D; d++) o[d] *= inv_n;
            }
        }
    }
#undef TAKE
    if (slot)
        for (int64_t u = 0; u < U; u++) slot[rows[u]] = -1;
    return U;
fail:
    if (slot)
        for (int64_t u = 0; u < U; u++) slot[rows[u]] = -1;
    return err;
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
float rowwise_adam(float *restrict W, float *restrict m, float *restrict v,
                   const int64_t *restrict rows, const float *restrict grad, int64_t U,
                   int64_t D, float lr, const float *restrict row_lr, float b1, float b2,
                   float eps, float bc1, float bc2, float wd) {
    float linf = 0.0f;
    const float ib1 = 1.0f / bc1, ib2 = 1.0f / bc2;
    for (int64_t u = 0; u < U; u++) {
        if (u + PREFETCH < U) {  /* rows are scattered: ask for a later row's lines now (~4x) */
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

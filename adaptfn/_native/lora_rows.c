/* adaptfn's native CPU kernel for adapter pools (float32): for each item j (up to 16 tokens of one adapter),
 *   y[row] += scale_j * (x[row] @ At[pos_j]) @ Bt[pos_j]    for row in tok[start_j : start_j + len_j]
 * x: rows of n_in floats (row stride xs); y: rows of n_out floats (row stride ys), updated in place;
 * At: [cap, n_in, R] and Bt: [cap, R, n_out], contiguous. Items write disjoint rows, so they run in parallel. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef VW /* floats per vector: the machine's widest (tests build every width with -DVW=4/8/16 on any CPU) */
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
#endif
#define TB 16 /* tokens per item at most */

typedef float vf __attribute__((vector_size(VW * 4), aligned(4)));   /* one machine vector */
typedef float vt __attribute__((vector_size(TB * 4), aligned(4)));   /* 16 tokens */
typedef float v4 __attribute__((vector_size(16), aligned(4)));

#define LOAD(T, p) ({ T v_; memcpy(&v_, (p), sizeof v_); v_; })
#define STORE(p, v) do { __typeof__(v) v_ = (v); memcpy((p), &v_, sizeof v_); } while (0)

/* ---- A side, 16 tokens, vectorized over tokens: h[t][r] = sc * sum_i xl[i][t] * A[i][r] ---- */
#define A_TOK(RC)                                                                                   \
static void a_tok_##RC(const float *xl, const float *A, int n_in, int R, int r0, float sc, float *h) { \
    vt acc[RC];                                                                                     \
    for (int k = 0; k < RC; k++) acc[k] = (vt){0};                                                  \
    const float *a = A + r0;                                                                        \
    for (int i = 0; i < n_in; i++, a += R) {                                                        \
        __builtin_prefetch(a + 8 * R);                                                              \
        vt xv = LOAD(vt, xl + (size_t)i * TB);                                                      \
        _Pragma("GCC unroll 8")                                                                     \
        for (int k = 0; k < RC; k++) acc[k] += a[k] * xv;                                           \
    }                                                                                               \
    for (int k = 0; k < RC; k++)                                                                    \
        for (int t = 0; t < TB; t++) h[t * R + r0 + k] = acc[k][t] * sc;                            \
}
A_TOK(8)
A_TOK(4)
A_TOK(1)

static void a_side_tok(const float *const *xr, float *xl, const float *A, int n_in, int R, float sc, float *h) {
    for (int i = 0; i < n_in; i++)
        for (int t = 0; t < TB; t++) xl[(size_t)i * TB + t] = xr[t][i];
    int r0 = 0;
    for (; r0 + 8 <= R; r0 += 8) a_tok_8(xl, A, n_in, R, r0, sc, h);
    for (; r0 + 4 <= R; r0 += 4) a_tok_4(xl, A, n_in, R, r0, sc, h);
    for (; r0 < R; r0++) a_tok_1(xl, A, n_in, R, r0, sc, h);
}

/* ---- A side, TM <= 4 tokens, vectorized over ranks ---- */
/* one chunk of W ranks (vector type T) at r0: two partial sums over alternate inputs (two dependency chains) */
#define RANK_CHUNK(TM, T, W)                                                                        \
    for (; r0 + (W) <= R; r0 += (W)) {                                                              \
        T acc[TM][2];                                                                               \
        for (int t = 0; t < TM; t++) acc[t][0] = acc[t][1] = (T){0};                                \
        const float *a = A + r0;                                                                    \
        int i = 0;                                                                                  \
        for (; i + 1 < n_in; i += 2, a += 2 * R) {                                                  \
            T a0 = LOAD(T, a), a1 = LOAD(T, a + R);                                                 \
            for (int t = 0; t < TM; t++) { acc[t][0] += xr[t][i] * a0; acc[t][1] += xr[t][i + 1] * a1; } \
        }                                                                                           \
        if (i < n_in) { T a0 = LOAD(T, a); for (int t = 0; t < TM; t++) acc[t][0] += xr[t][i] * a0; } \
        for (int t = 0; t < TM; t++) STORE(h + t * R + r0, (acc[t][0] + acc[t][1]) * sc);           \
    }

#define A_RANK(TM)                                                                                  \
static void a_rank_##TM(const float *const *xr, const float *A, int n_in, int R, float sc, float *h) { \
    int r0 = 0;                                                                                     \
    for (; r0 + 2 * VW <= R; r0 += 2 * VW) {                                                        \
        vf acc[TM][2];                                                                              \
        for (int t = 0; t < TM; t++) acc[t][0] = acc[t][1] = (vf){0};                               \
        const float *a = A + r0;                                                                    \
        for (int i = 0; i < n_in; i++, a += R) {                                                    \
            vf a0 = LOAD(vf, a), a1 = LOAD(vf, a + VW);                                             \
            for (int t = 0; t < TM; t++) { float xv = xr[t][i]; acc[t][0] += xv * a0; acc[t][1] += xv * a1; } \
        }                                                                                           \
        for (int t = 0; t < TM; t++) {                                                              \
            STORE(h + t * R + r0, acc[t][0] * sc); STORE(h + t * R + r0 + VW, acc[t][1] * sc);      \
        }                                                                                           \
    }                                                                                               \
    RANK_CHUNK(TM, vf, VW)                                                                          \
    RANK_CHUNK(TM, v4, 4)                                                                           \
    for (; r0 < R; r0++)                                                                            \
        for (int t = 0; t < TM; t++) {                                                              \
            float s = 0;                                                                            \
            for (int i = 0; i < n_in; i++) s += xr[t][i] * A[(size_t)i * R + r0];                   \
            h[t * R + r0] = s * sc;                                                                 \
        }                                                                                           \
}
A_RANK(1)
A_RANK(2)
A_RANK(4)

/* ---- B side: y[t] += h[t] @ B, TM tokens, NB vectors of outputs at a time ---- */
#define B_SIDE(TM, NB)                                                                              \
static void b_side_##TM(const float *h, const float *B, int R, int n_out, float *const *yr, int m) { \
    int n0 = 0;                                                                                     \
    for (; n0 + NB * VW <= n_out; n0 += NB * VW) {                                                  \
        vf acc[TM][NB];                                                                             \
        for (int t = 0; t < TM; t++) for (int c = 0; c < NB; c++) acc[t][c] = (vf){0};              \
        const float *b = B + n0;                                                                    \
        for (int r = 0; r < R; r++, b += n_out) {                                                   \
            vf bv[NB];                                                                              \
            for (int c = 0; c < NB * VW; c += 16) __builtin_prefetch(b + NB * VW + c);             \
            for (int c = 0; c < NB; c++) bv[c] = LOAD(vf, b + c * VW);                              \
            _Pragma("GCC unroll 16")                                                                \
            for (int t = 0; t < TM; t++) {                                                          \
                float hv = h[t * R + r];                                                            \
                for (int c = 0; c < NB; c++) acc[t][c] += hv * bv[c];                               \
            }                                                                                       \
        }                                                                                           \
        for (int t = 0; t < m; t++)                                                                 \
            for (int c = 0; c < NB; c++) {                                                          \
                float *y = yr[t] + n0 + c * VW;                                                     \
                STORE(y, LOAD(vf, y) + acc[t][c]);                                                  \
            }                                                                                       \
    }                                                                                               \
    for (; n0 < n_out; n0++)                                                                        \
        for (int t = 0; t < m; t++) {                                                               \
            float s = 0;                                                                            \
            for (int r = 0; r < R; r++) s += h[t * R + r] * B[(size_t)r * n_out + n0];              \
            yr[t][n0] += s;                                                                         \
        }                                                                                           \
}

/* one token: stream B's rows in order (one pass over the adapter's B, the output row stays in L1) */
static void b_side_1(const float *h, const float *B, int R, int n_out, float *const *yr, int m) {
    float *y = yr[0];
    (void)m;
    for (int r = 0; r < R; r++) {
        const float *b = B + (size_t)r * n_out;
        vf hv = (vf){0} + h[r];
        int n = 0;
        for (; n + VW <= n_out; n += VW) STORE(y + n, LOAD(vf, y + n) + hv * LOAD(vf, b + n));
        for (; n < n_out; n++) y[n] += h[r] * b[n];
    }
}
B_SIDE(2, 4)
B_SIDE(4, 2)
B_SIDE(16, 1)

/* returns 0; 1 when a thread's scratch could not be allocated; 2 when an item's length is not in 1..16 (such
   items are skipped, the others done) */
int adaptfn_lora_rows_f32(const float *x, int64_t xs, float *y, int64_t ys, const float *At, const float *Bt,
                          int n_in, int R, int n_out, const int64_t *tok, const int64_t *start, const int64_t *len,
                          const int64_t *pos, const float *scale, int64_t n_items, int nthreads) {
    int failed = 0;
    #pragma omp parallel num_threads(nthreads) if (nthreads > 1 && n_items > 1)
    {
        float *h = malloc(sizeof(float) * TB * (size_t)R);
        float *xl = malloc(sizeof(float) * TB * (size_t)n_in);
        if (!h || !xl) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t j = 0; j < n_items; j++) {
            if (!h || !xl) continue;
            int64_t m64 = len[j];
            if (m64 < 1 || m64 > TB) { /* 1..16 tokens per item: anything else is refused, nothing written */
                #pragma omp atomic write
                failed = 2;
                continue;
            }
            int m = (int)m64;
            const float *xr[TB];
            float *yr[TB];
            const int64_t *tk = tok + start[j];
            for (int t = 0; t < TB; t++) {
                int64_t row = tk[t < m ? t : 0]; /* rows past m repeat the first: computed, never written */
                xr[t] = x + row * xs;
                yr[t] = y + row * ys;
            }
            const float *A = At + pos[j] * (int64_t)n_in * R, *B = Bt + pos[j] * (int64_t)R * n_out;
            float sc = scale[j];
            if (m <= 1) { a_rank_1(xr, A, n_in, R, sc, h); b_side_1(h, B, R, n_out, yr, m); }
            else if (m <= 2) { a_rank_2(xr, A, n_in, R, sc, h); b_side_2(h, B, R, n_out, yr, m); }
            else if (m <= 4) { a_rank_4(xr, A, n_in, R, sc, h); b_side_4(h, B, R, n_out, yr, m); }
            else { a_side_tok(xr, xl, A, n_in, R, sc, h); b_side_16(h, B, R, n_out, yr, m); }
        }
        free(h);
        free(xl);
    }
    return failed;
}

/* what this build is: floats per vector, plus 256 when built with OpenMP */
int adaptfn_lora_rows_info(void) {
#ifdef _OPENMP
    return VW | 256;
#else
    return VW;
#endif
}

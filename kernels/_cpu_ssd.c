/* Fused CPU kernels for the Mamba-2 SSD recurrence (model-specs §3b; Dao & Gu, "Transformers are SSMs", ICML 2024,
 * eq. 1 with the ZOH/Euler discretisation), which TiM4Rec's time-aware step feeds through Δ (§5):
 *
 *     h_t = exp(Δ_t A_h) h_{t−1} + (Δ_t x_t) ⊗ B_t        (per head h: a (head_dim P, N) state, scalar decay)
 *     y_t = h_t C_t
 *
 * Sequential in time, like the CPU selective scan (kernels/_cpu_selective_scan.c): the (P, N) state of one
 * (row, head) stays in L1 cache, so none of the chunked algorithm's (chunk × chunk) masks or (P, N) chunk states
 * are formed. The scalar decay per (row, step, head) makes this cheaper per state element than Mamba-1's.
 *
 * Layout (fp32, contiguous): x, y, gy, dx (batch, L, H, P); delta, ddelta (batch, L, H); A, dA (H);
 * B, C, dB, dC (batch, L, G, N), head h reading group h / (H / G); h0, final, dh0 (batch, H, P, N).
 * Each call handles batch rows [b0, b1) and every head of them (heads of one group add into the same dB, dC), so
 * threads with disjoint row ranges and their own dA share nothing they write. Built by kernels/_cpu.py.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_cpu_exp2.h"

#define INLINE static inline __attribute__((always_inline))

/* y and the final states for rows [b0, b1); h0 may be NULL (zero initial state). */
INLINE int forward_impl(const float *x, const float *delta, const float *A, const float *B, const float *C,
                        const float *h0, float *y, float *final, int64_t b0, int64_t b1, int64_t L, int64_t H,
                        int64_t P, int64_t G, int64_t N) {
  const int64_t per_group = H / G;
  for (int64_t b = b0; b < b1; b++) {
    for (int64_t h = 0; h < H; h++) {
      float *s = final + (b * H + h) * P * N; /* the state lives in the output buffer it ends in */
      if (h0) memcpy(s, h0 + (b * H + h) * P * N, sizeof(float) * P * N);
      else memset(s, 0, sizeof(float) * P * N);
      const float Ah = A[h] * LOG2E;
      for (int64_t t = 0; t < L; t++) {
        const int64_t bt = b * L + t;
        const float dd = delta[bt * H + h], a = exp2_approx(dd * Ah);
        const float *xt = x + (bt * H + h) * P;
        const float *Bt = B + (bt * G + h / per_group) * N, *Ct = C + (bt * G + h / per_group) * N;
        float *yt = y + (bt * H + h) * P;
        for (int64_t p = 0; p < P; p++) {
          const float xp = dd * xt[p];
          float *sp = s + p * N;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t n = 0; n < N; n++) {
            sp[n] = a * sp[n] + xp * Bt[n];
            acc += sp[n] * Ct[n];
          }
          yt[p] = acc;
        }
      }
    }
  }
  return 0;
}

/* The reverse recurrence G_t = ∂L/∂h_t = gy_t ⊗ C_t + a_{t+1} G_{t+1} (G_{L−1} also gets the final state's
 * gradient gfinal, which may be NULL), with a_t = exp(Δ_t A_h) and σ_t = Σ_{p,n} G_t ⊙ h_{t−1}:
 * ∂x_t = Δ_t (G_t B_t), ∂Δ_t = x_t · (G_t B_t) + σ_t a_t A_h, ∂A_h += Σ_t σ_t a_t Δ_t, ∂B_t += Σ_p G_t Δ_t x_t,
 * ∂C_t += Σ_p gy_t h_t, ∂h0 = a_0 G_0. A first sweep recomputes the (row, head)'s states into a scratch buffer
 * ((L + 1) × P × N floats). dx, ddelta, dh0 are written; dA (this thread's own), dB and dC must be zeroed by the
 * caller and are accumulated into. dh0 may be NULL. Returns 1 if the scratch memory could not be allocated. */
INLINE int backward_impl(const float *x, const float *delta, const float *A, const float *B, const float *C,
                         const float *h0, const float *gy, const float *gfinal, float *dx, float *ddelta, float *dA,
                         float *dB, float *dC, float *dh0, int64_t b0, int64_t b1, int64_t L, int64_t H, int64_t P,
                         int64_t G, int64_t N) {
  const int64_t per_group = H / G, PN = P * N;
  float *states = malloc(sizeof(float) * (L + 1) * PN); /* states[t + 1] = h_t, states[0] = h0 */
  float *g = malloc(sizeof(float) * PN);
  if (!states || !g) {
    free(states);
    free(g);
    return 1;
  }
  for (int64_t b = b0; b < b1; b++) {
    for (int64_t h = 0; h < H; h++) {
      const float Ah = A[h], Ah2 = A[h] * LOG2E;
      if (h0) memcpy(states, h0 + (b * H + h) * PN, sizeof(float) * PN);
      else memset(states, 0, sizeof(float) * PN);
      for (int64_t t = 0; t < L; t++) {
        const int64_t bt = b * L + t;
        const float dd = delta[bt * H + h], a = exp2_approx(dd * Ah2);
        const float *xt = x + (bt * H + h) * P, *Bt = B + (bt * G + h / per_group) * N;
        const float *prev = states + t * PN;
        float *next = states + (t + 1) * PN;
        for (int64_t p = 0; p < P; p++) {
          const float xp = dd * xt[p];
#pragma omp simd
          for (int64_t n = 0; n < N; n++) next[p * N + n] = a * prev[p * N + n] + xp * Bt[n];
        }
      }
      if (gfinal) memcpy(g, gfinal + (b * H + h) * PN, sizeof(float) * PN);
      else memset(g, 0, sizeof(float) * PN);
      float dA_h = 0.f;
      for (int64_t t = L - 1; t >= 0; t--) {
        const int64_t bt = b * L + t;
        const float dd = delta[bt * H + h], a = exp2_approx(dd * Ah2);
        const float *xt = x + (bt * H + h) * P, *gyt = gy + (bt * H + h) * P;
        const int64_t gi = (bt * G + h / per_group) * N;
        const float *Bt = B + gi, *Ct = C + gi, *prev = states + t * PN, *cur = states + (t + 1) * PN;
        float *dBt = dB + gi, *dCt = dC + gi, *dxt = dx + (bt * H + h) * P;
        float sigma = 0.f, ddelta_x = 0.f;
        for (int64_t p = 0; p < P; p++) {
          const float gyp = gyt[p], xp = dd * xt[p];
          float *gp = g + p * N;
          float gb = 0.f, gs = 0.f;
#pragma omp simd reduction(+ : gb, gs)
          for (int64_t n = 0; n < N; n++) {
            gp[n] += gyp * Ct[n];
            dCt[n] += gyp * cur[p * N + n];
            gb += gp[n] * Bt[n];
            dBt[n] += gp[n] * xp;
            gs += gp[n] * prev[p * N + n];
            gp[n] *= a; /* carried to t − 1 */
          }
          dxt[p] = dd * gb;
          ddelta_x += xt[p] * gb;
          sigma += gs;
        }
        ddelta[bt * H + h] = ddelta_x + sigma * a * Ah;
        dA_h += sigma * a * dd;
      }
      dA[h] += dA_h;
      if (dh0) memcpy(dh0 + (b * H + h) * PN, g, sizeof(float) * PN);
    }
  }
  free(states);
  free(g);
  return 0;
}

/* Exported entry points; N = 16, 32 and 64 are compiled as constants (see _cpu_selective_scan.c). */
int ssd_forward(const float *x, const float *delta, const float *A, const float *B, const float *C, const float *h0,
                float *y, float *final, int64_t b0, int64_t b1, int64_t L, int64_t H, int64_t P, int64_t G,
                int64_t N) {
  switch (N) {
    case 16: return forward_impl(x, delta, A, B, C, h0, y, final, b0, b1, L, H, P, G, 16);
    case 32: return forward_impl(x, delta, A, B, C, h0, y, final, b0, b1, L, H, P, G, 32);
    case 64: return forward_impl(x, delta, A, B, C, h0, y, final, b0, b1, L, H, P, G, 64);
    default: return forward_impl(x, delta, A, B, C, h0, y, final, b0, b1, L, H, P, G, N);
  }
}

int ssd_backward(const float *x, const float *delta, const float *A, const float *B, const float *C,
                 const float *h0, const float *gy, const float *gfinal, float *dx, float *ddelta, float *dA,
                 float *dB, float *dC, float *dh0, int64_t b0, int64_t b1, int64_t L, int64_t H, int64_t P,
                 int64_t G, int64_t N) {
  switch (N) {
    case 16: return backward_impl(x, delta, A, B, C, h0, gy, gfinal, dx, ddelta, dA, dB, dC, dh0, b0, b1, L, H, P,
                                  G, 16);
    case 32: return backward_impl(x, delta, A, B, C, h0, gy, gfinal, dx, ddelta, dA, dB, dC, dh0, b0, b1, L, H, P,
                                  G, 32);
    case 64: return backward_impl(x, delta, A, B, C, h0, gy, gfinal, dx, ddelta, dA, dB, dC, dh0, b0, b1, L, H, P,
                                  G, 64);
    default: return backward_impl(x, delta, A, B, C, h0, gy, gfinal, dx, ddelta, dA, dB, dC, dh0, b0, b1, L, H, P,
                                  G, N);
  }
}

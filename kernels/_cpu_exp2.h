/* 2^x for the fused CPU kernels (kernels/_cpu_*.c). */
#ifndef RECSYS_CPU_EXP2_H
#define RECSYS_CPU_EXP2_H

#include <stdint.h>
#include <string.h>

#define LOG2E 1.4426950408889634f

/* 2^x to ~1e-7 relative error: x = k + f with k an integer and |f| ≤ 1/2, 2^f by its degree-6 Taylor polynomial
 * (remainder ≤ (ln2 / 2)^7 / 7! ≈ 1.2e-7), 2^k written into the exponent bits. Inlined and vectorised, unlike
 * libm's expf (a call per vector: a third of the selective scan's backward time). x is clamped to ±126, so decays below
 * 2^-126 ≈ 1e-38 read as 2^-126, not 0: a difference no fp32 sum of O(1) terms can see. */
static inline float exp2_approx(float x) {
  x = x < -126.f ? -126.f : (x > 126.f ? 126.f : x);
  const float k = __builtin_roundf(x), f = x - k;
  float p = 1.5403530393381609e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.618129107628477e-3f;
  p = p * f + 5.550410866482158e-2f;
  p = p * f + 2.402265069591007e-1f;
  p = p * f + 6.931471805599453e-1f;
  p = p * f + 1.f;
  const int32_t bits = ((int32_t)k + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

#endif

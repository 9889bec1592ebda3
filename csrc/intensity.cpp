// Fused intensity augmentation of the native data backend: blur, noise, gamma, patch swap and
// z-normalisation of every view of a batch in one OpenMP kernel, one view per task.
//
// Semantics: pcrlv2_fast.data.augment.apply_intensity per view (N, 1, X, Y, Z):
//   1. separable Gaussian blur with per-axis sigma (x, then y, then z): taps exp(-t^2 / (2 sigma^2)) for
//      |t| <= int(4 sigma + 0.5), normalised in double and rounded to float; scipy's 'reflect' border
//      (d c b a | a b c d); an axis with sigma <= 1e-15 is skipped;
//   2. x + std * z, z the view's standard normal field expanded from its 62-bit seed by the counter-based
//      generator of augment.normal_field (same integers, same paired Box-Muller formula: voxels p and
//      ceil(n / 2) + p share a hashed pair), generated in L1-sized chunks and applied at once;
//   3. sign(x) |x|^gamma;
//   4. the patch swaps in order, both patches read before either is written (patch a written last);
//   5. (x - mean) / std over the view, unbiased std, statistics in double; a constant view becomes zeros.
//
// Numerics: the blur sums run in float32 in tap order, log / exp / cos / sin are vectorisable polynomial
// approximations (float32, within 2 ulp of the correctly rounded value on their ranges here), the view's
// statistics are one pass of float64 sums, so outputs differ from the torch ops by float32 rounding only
// (~1e-6 after normalisation).
//
// Speed: on CPUs with AVX-512 the blur keeps each output vector's sum in registers over all taps (the inner,
// contiguous axis reads its reflected taps through in-register permutes for rows of up to 32 voxels);
// elsewhere portable loops (auto-vectorised per ISA clone) compute the same sums.

// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own undefined-vector idiom.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include "views.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace pcrlv2 {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PCRLV2_INTENSITY_X86 1
#include <immintrin.h>
#define PCRLV2_INTENSITY_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PCRLV2_INTENSITY_X86 0
#define PCRLV2_INTENSITY_CLONES
#endif

// ------------------------------------------------------------------------------------- noise field

constexpr uint32_t kHashMul0 = 0x7FEB352Du, kHashMul1 = 0x846CA68Bu, kSeedXor = 0x9E3779B9u;
constexpr float kTwoPi = 6.2831854820251465f;  // float32(2 pi)

inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= kHashMul0;
  h ^= h >> 15;
  h *= kHashMul1;
  return h ^ (h >> 16);
}

// (2 * top 23 bits + 1) / 2^24: exact in float32, in (0, 1).
inline float unit(uint32_t h) { return static_cast<float>(static_cast<int32_t>((h >> 9) * 2u + 1u)) * 0x1p-24f; }

inline float as_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t as_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// Natural log of a positive normal float: x = m 2^e with m in [sqrt(1/2), sqrt(2)), log(1 + f) by a degree-9
// polynomial in f = m - 1, e log 2 added in two parts (the classic single-precision reduction).
inline float poly_log(float x) {
  const uint32_t b = as_bits(x);
  int32_t e = static_cast<int32_t>((b >> 23) & 0xFFu) - 126;  // x = m 2^e, m in [0.5, 1)
  float m = as_float((b & 0x007FFFFFu) | 0x3F000000u);
  const bool small = m < 0.70710678f;
  e -= small ? 1 : 0;
  const float f = (small ? m + m : m) - 1.f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float y = p * f * z;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return (f + y) + 0.693359375f * fe;
}

// e^x for x in [-87, 88]: x = n log 2 + r, |r| <= log(2) / 2, e^r by a degree-7 polynomial, 2^n from bits.
inline float poly_exp(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.f;
  return y * as_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

// cos(t) and sin(t) for t in [0, 2 pi]: a = t - pi in [-pi, pi] (cos t = -cos a, sin t = -sin a), folded to
// [-pi / 2, pi / 2] (a' = +-pi - a: cos a = -cos a', sin a = sin a'), Taylor series to a^14 / a^15.
inline void poly_sincos(float t, float& c, float& s) {
  float a = t - 3.14159265358979f;
  const float mag = std::fabs(a);
  const bool far = mag > 1.57079632679490f;
  a = far ? std::copysign(3.14159265358979f, a) - a : a;
  const float z = a * a;
  float pc = -1.1470745597729725e-11f;  // -1/14!
  pc = pc * z + 2.0876756987868099e-9f;
  pc = pc * z - 2.7557319223985891e-7f;
  pc = pc * z + 2.4801587301587302e-5f;
  pc = pc * z - 1.3888888888888889e-3f;
  pc = pc * z + 4.1666666666666667e-2f;
  pc = pc * z - 0.5f;
  const float cos_a = pc * z + 1.f;
  float ps = 7.6471637318198165e-13f;  // 1/15!
  ps = ps * z - 1.6059043836821613e-10f;
  ps = ps * z + 2.5052108385441720e-8f;
  ps = ps * z - 2.7557319223985893e-6f;
  ps = ps * z + 1.9841269841269841e-4f;
  ps = ps * z - 8.3333333333333332e-3f;
  ps = ps * z + 1.6666666666666666e-1f;
  const float sin_a = a - a * z * ps;
  c = far ? cos_a : -cos_a;
  s = -sin_a;
}

// Pairs [p0, p0 + m) of the field of `seed`: cos_out[q] = r cos(2 pi u2), sin_out[q] = r sin(2 pi u2).
PCRLV2_INTENSITY_CLONES void normal_pairs(uint64_t seed, int64_t p0, int64_t m, float* __restrict cos_out,
                                          float* __restrict sin_out) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t k2 = k1 ^ kSeedXor;
#pragma omp simd
  for (int64_t q = 0; q < m; ++q) {
    const uint32_t a = mix32(static_cast<uint32_t>(p0 + q) ^ k0);
    const float u1 = unit(mix32(a ^ k1)), u2 = unit(mix32(a ^ k2));
    const float r = std::sqrt(-2.f * poly_log(u1));
    float c, s;
    poly_sincos(u2 * kTwoPi, c, s);
    cos_out[q] = r * c;
    sin_out[q] = r * s;
  }
}

// Pairs are generated this many at a time into stack buffers (L1) and consumed at once.
constexpr int64_t kPairChunk = 512;

// The whole field of `seed` (n voxels) into out.
void normal_field_impl(uint64_t seed, int64_t n, float* __restrict out) {
  const int64_t half = (n + 1) / 2;
  alignas(64) float sin_buf[kPairChunk];
  for (int64_t p0 = 0; p0 < half; p0 += kPairChunk) {
    const int64_t m = std::min(kPairChunk, half - p0);
    normal_pairs(seed, p0, m, out + p0, sin_buf);
    std::memcpy(out + half + p0, sin_buf, sizeof(float) * std::min(m, n - half - p0));
  }
}

// ---------------------------------------------------------------------------------------------- blur

inline int64_t reflect(int64_t i, int64_t n) {
  i %= 2 * n;
  if (i < 0) i += 2 * n;
  return i < n ? i : 2 * n - 1 - i;
}

// Normalised taps of a sigma (empty: skip the axis).
std::vector<float> gaussian_taps(double sigma) {
  if (!(sigma > 1e-15)) return {};
  const int64_t radius = static_cast<int64_t>(4.0 * sigma + 0.5);
  std::vector<double> w(2 * radius + 1);
  double total = 0;
  for (int64_t t = -radius; t <= radius; ++t) {
    w[t + radius] = std::exp(-0.5 * static_cast<double>(t * t) / (sigma * sigma));
    total += w[t + radius];
  }
  std::vector<float> taps(w.size());
  for (size_t k = 0; k < w.size(); ++k) taps[k] = static_cast<float>(w[k] / total);
  return taps;
}

// Source index of every position of an axis of length n padded by `radius` on both sides ('reflect').
std::vector<int32_t> reflect_table(int64_t n, int64_t radius) {
  std::vector<int32_t> t(n + 2 * radius);
  for (int64_t q = 0; q < n + 2 * radius; ++q) t[q] = static_cast<int32_t>(reflect(q - radius, n));
  return t;
}

// Blur along an outer axis: the view as (outer, n, inner) rows; out[o, i, :] = sum_t w_t in[o, refl[i + t], :]
// (whole rows per tap: independent vector multiply-adds, no dependency chain through an accumulator).
PCRLV2_INTENSITY_CLONES void blur_outer(const float* __restrict in, float* __restrict out, int64_t outer, int64_t n,
                                        int64_t inner, const std::vector<float>& taps,
                                        const std::vector<int32_t>& refl) {
  const int64_t len = static_cast<int64_t>(taps.size());
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t i = 0; i < n; ++i) {
      float* __restrict d = out + (o * n + i) * inner;
      auto row = [&](int64_t t) { return in + (o * n + refl[i + t]) * inner; };
      const float* __restrict s0 = row(0);
      const float w0 = taps[0];
      for (int64_t k = 0; k < inner; ++k) d[k] = w0 * s0[k];
      // Four taps per pass over the row: a quarter of the accumulator loads and stores.
      int64_t t = 1;
      for (; t + 4 <= len; t += 4) {
        const float* __restrict a = row(t);
        const float* __restrict b = row(t + 1);
        const float* __restrict c = row(t + 2);
        const float* __restrict e = row(t + 3);
        const float wa = taps[t], wb = taps[t + 1], wc = taps[t + 2], we = taps[t + 3];
        for (int64_t k = 0; k < inner; ++k) d[k] += ((wa * a[k] + wb * b[k]) + (wc * c[k] + we * e[k]));
      }
      for (; t < len; ++t) {
        const float w = taps[t];
        const float* __restrict src = row(t);
        for (int64_t k = 0; k < inner; ++k) d[k] += w * src[k];
      }
    }
  }
}

// Blur along the innermost axis (length n) of `rows` rows, through a reflected copy of each row.
PCRLV2_INTENSITY_CLONES void blur_inner(const float* __restrict in, float* __restrict out, int64_t rows, int64_t n,
                                        const std::vector<float>& taps, const std::vector<int32_t>& refl,
                                        float* __restrict padded) {
  const int64_t radius = static_cast<int64_t>(taps.size() / 2);
  const int64_t len = static_cast<int64_t>(taps.size());
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = in + r * n;
    for (int64_t k = 0; k < radius; ++k) {
      padded[k] = src[refl[k]];
      padded[n + radius + k] = src[refl[n + radius + k]];
    }
    std::memcpy(padded + radius, src, sizeof(float) * n);
    float* __restrict d = out + r * n;
    const float w0 = taps[0];
    for (int64_t k = 0; k < n; ++k) d[k] = w0 * padded[k];
    int64_t t = 1;
    for (; t + 4 <= len; t += 4) {
      const float wa = taps[t], wb = taps[t + 1], wc = taps[t + 2], we = taps[t + 3];
      const float* __restrict p = padded + t;
      for (int64_t k = 0; k < n; ++k) d[k] += ((wa * p[k] + wb * p[k + 1]) + (wc * p[k + 2] + we * p[k + 3]));
    }
    for (; t < len; ++t) {
      const float w = taps[t];
      const float* __restrict p = padded + t;
      for (int64_t k = 0; k < n; ++k) d[k] += w * p[k];
    }
  }
}

#if PCRLV2_INTENSITY_X86
#define PCRLV2_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))

inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1u);
}

// Short rows (inner <= 16 * NV, NV <= 2 vectors): four output rows at a time, 4 * NV independent register sums
// (one row alone would be a chain of dependent multiply-adds, one per tap).
template <int NV>
PCRLV2_AVX512 void blur_outer_short_avx512(const float* __restrict in, float* __restrict out, int64_t outer,
                                           int64_t n, int64_t inner, const float* w, int64_t len,
                                           const int32_t* refl) {
  const __mmask16 m0 = first_lanes(inner), m1 = first_lanes(inner > 16 ? inner - 16 : 0);
  for (int64_t o = 0; o < outer; ++o) {
    const float* plane = in + o * n * inner;
    float* __restrict d = out + o * n * inner;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      __m512 acc[4][NV];
      for (int r = 0; r < 4; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
      for (int64_t t = 0; t < len; ++t) {
        const __m512 wt = _mm512_set1_ps(w[t]);
        for (int r = 0; r < 4; ++r) {
          const float* p = plane + static_cast<int64_t>(refl[i + r + t]) * inner;
          acc[r][0] = _mm512_fmadd_ps(wt, _mm512_maskz_loadu_ps(m0, p), acc[r][0]);
          if (NV == 2) acc[r][NV - 1] = _mm512_fmadd_ps(wt, _mm512_maskz_loadu_ps(m1, p + 16), acc[r][NV - 1]);
        }
      }
      for (int r = 0; r < 4; ++r) {
        _mm512_mask_storeu_ps(d + (i + r) * inner, m0, acc[r][0]);
        if (NV == 2) _mm512_mask_storeu_ps(d + (i + r) * inner + 16, m1, acc[r][NV - 1]);
      }
    }
    for (; i < n; ++i) {
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      for (int64_t t = 0; t < len; ++t) {
        const __m512 wt = _mm512_set1_ps(w[t]);
        const float* p = plane + static_cast<int64_t>(refl[i + t]) * inner;
        a0 = _mm512_fmadd_ps(wt, _mm512_maskz_loadu_ps(m0, p), a0);
        if (NV == 2) a1 = _mm512_fmadd_ps(wt, _mm512_maskz_loadu_ps(m1, p + 16), a1);
      }
      _mm512_mask_storeu_ps(d + i * inner, m0, a0);
      if (NV == 2) _mm512_mask_storeu_ps(d + i * inner + 16, m1, a1);
    }
  }
}

// blur_outer with each output vector's sum kept in a register over all taps (one load and one multiply-add
// per tap and vector, one store): four vectors (64 floats) at a time, then masked vectors for the rest.
PCRLV2_AVX512 void blur_outer_avx512(const float* __restrict in, float* __restrict out, int64_t outer, int64_t n,
                                     int64_t inner, const std::vector<float>& taps,
                                     const std::vector<int32_t>& refl, std::vector<const float*>& rows) {
  const int64_t len = static_cast<int64_t>(taps.size());
  const float* w = taps.data();
  if (inner <= 16) return blur_outer_short_avx512<1>(in, out, outer, n, inner, w, len, refl.data());
  if (inner <= 32) return blur_outer_short_avx512<2>(in, out, outer, n, inner, w, len, refl.data());
  rows.resize(len);
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t t = 0; t < len; ++t) rows[t] = in + (o * n + refl[i + t]) * inner;
      float* __restrict d = out + (o * n + i) * inner;
      int64_t k = 0;
      for (; k + 128 <= inner; k += 128) {  // eight independent sums: the multiply-add latency is hidden
        __m512 acc[8];
        for (int v = 0; v < 8; ++v) acc[v] = _mm512_setzero_ps();
        for (int64_t t = 0; t < len; ++t) {
          const __m512 wt = _mm512_set1_ps(w[t]);
          const float* p = rows[t] + k;
          for (int v = 0; v < 8; ++v) acc[v] = _mm512_fmadd_ps(wt, _mm512_loadu_ps(p + 16 * v), acc[v]);
        }
        for (int v = 0; v < 8; ++v) _mm512_storeu_ps(d + k + 16 * v, acc[v]);
      }
      for (; k + 64 <= inner; k += 64) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
               a3 = _mm512_setzero_ps();
        for (int64_t t = 0; t < len; ++t) {
          const __m512 wt = _mm512_set1_ps(w[t]);
          const float* p = rows[t] + k;
          a0 = _mm512_fmadd_ps(wt, _mm512_loadu_ps(p), a0);
          a1 = _mm512_fmadd_ps(wt, _mm512_loadu_ps(p + 16), a1);
          a2 = _mm512_fmadd_ps(wt, _mm512_loadu_ps(p + 32), a2);
          a3 = _mm512_fmadd_ps(wt, _mm512_loadu_ps(p + 48), a3);
        }
        _mm512_storeu_ps(d + k, a0);
        _mm512_storeu_ps(d + k + 16, a1);
        _mm512_storeu_ps(d + k + 32, a2);
        _mm512_storeu_ps(d + k + 48, a3);
      }
      for (; k < inner; k += 16) {
        const __mmask16 m = first_lanes(inner - k);
        __m512 a = _mm512_setzero_ps();
        for (int64_t t = 0; t < len; ++t) a = _mm512_fmadd_ps(_mm512_set1_ps(w[t]), _mm512_maskz_loadu_ps(m, rows[t] + k), a);
        _mm512_mask_storeu_ps(d + k, m, a);
      }
    }
  }
}

// blur_inner for rows of n <= 32 voxels: the row sits in two registers and every tap's reflected window is one
// two-source permute of them (index vectors precomputed per view and axis), summed in a register.
PCRLV2_AVX512 void blur_inner_avx512(const float* __restrict in, float* __restrict out, int64_t rows, int64_t n,
                                     const std::vector<float>& taps, const std::vector<int32_t>& refl,
                                     std::vector<int32_t>& index) {
  const int64_t len = static_cast<int64_t>(taps.size());
  const int64_t vectors = (n + 15) / 16;
  index.assign(vectors * len * 16, 0);
  for (int64_t v = 0; v < vectors; ++v)
    for (int64_t t = 0; t < len; ++t)
      for (int64_t lane = 0; lane < 16 && 16 * v + lane < n; ++lane)
        index[(v * len + t) * 16 + lane] = refl[16 * v + lane + t];
  const __mmask16 m0 = first_lanes(n), m1 = first_lanes(n - 16 > 0 ? n - 16 : 0);
  const float* w = taps.data();
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = in + r * n;
    const __m512 lo = _mm512_maskz_loadu_ps(m0, src);
    const __m512 hi = _mm512_maskz_loadu_ps(m1, src + 16);
    float* __restrict d = out + r * n;
    for (int64_t v = 0; v < vectors; ++v) {
      const int32_t* idx = index.data() + v * len * 16;
      __m512 a = _mm512_setzero_ps();
      for (int64_t t = 0; t < len; ++t) {
        const __m512i it = _mm512_loadu_si512(idx + t * 16);
        a = _mm512_fmadd_ps(_mm512_set1_ps(w[t]), _mm512_permutex2var_ps(lo, it, hi), a);
      }
      _mm512_mask_storeu_ps(d + 16 * v, v == 0 ? m0 : m1, a);
    }
  }
}
#endif

// ------------------------------------------------------------------------------ noise, gamma, stats

// x <- sign(v) |v|^g with v = x + std * z; z the field values of these voxels.
PCRLV2_INTENSITY_CLONES void noise_gamma(float* __restrict x, const float* __restrict field, int64_t n, float std_,
                                         float g) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] + field[i] * std_;
    const float a = std::fabs(v);
    // |v| below 1e-30 gives |v|^g < 1e-22 for the gamma range here: written as 0 (keeps the log in range).
    const float p = a < 1e-30f ? 0.f : poly_exp(g * poly_log(a));
    x[i] = v < 0.f ? -p : p;
  }
}

// Noise from the field of `seed` (generated a chunk of pairs at a time) and gamma, in place over n voxels.
void noise_gamma_seeded(float* __restrict x, int64_t n, uint64_t seed, float std_, float g) {
  const int64_t half = (n + 1) / 2;
  alignas(64) float cos_buf[kPairChunk];
  alignas(64) float sin_buf[kPairChunk];
  for (int64_t p0 = 0; p0 < half; p0 += kPairChunk) {
    const int64_t m = std::min(kPairChunk, half - p0);
    normal_pairs(seed, p0, m, cos_buf, sin_buf);
    noise_gamma(x + p0, cos_buf, m, std_, g);
    noise_gamma(x + half + p0, sin_buf, std::min(m, n - half - p0), std_, g);
  }
}

// out = (x - m) * inv. The result is only read later (by the training step), so on AVX-512 CPUs it is written
// with non-temporal stores where out is 64-byte aligned: no read-for-ownership of the output's cache lines.
void scale_shift_portable(const float* __restrict x, float* __restrict out, int64_t n, float m, float inv) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - m) * inv;
}

#if PCRLV2_INTENSITY_X86
PCRLV2_AVX512 void scale_shift_avx512(const float* __restrict x, float* __restrict out, int64_t n, float m,
                                      float inv) {
  const __m512 vm = _mm512_set1_ps(m), vi = _mm512_set1_ps(inv);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(out + i, _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm), vi));
  for (; i < n; ++i) out[i] = (x[i] - m) * inv;
  _mm_sfence();
}
#endif

inline void scale_shift(const float* x, float* out, int64_t n, float m, float inv) {
#if PCRLV2_INTENSITY_X86
  if (use_wide_simd() && reinterpret_cast<uintptr_t>(out) % 64 == 0 && x != out) {
    scale_shift_avx512(x, out, n, m, inv);
    return;
  }
#endif
  scale_shift_portable(x, out, n, m, inv);
}

// (x - mean) / std over the view (unbiased std), a constant view -> zeros. One pass of float64 sums (sum and
// sum of squares, eight independent lanes) and float min / max; a view whose variance is below 1e-9 of its
// mean square (where the one-pass formula loses digits) gets a second, centred pass.
PCRLV2_INTENSITY_CLONES void z_normalize(const float* __restrict x, float* __restrict out, int64_t n) {
  constexpr int64_t L = 8;
  float lo[L], hi[L];
  double s1[L], s2[L];
  for (int64_t l = 0; l < L; ++l) {
    lo[l] = hi[l] = x[0];
    s1[l] = s2[l] = 0;
  }
  const int64_t body = n - n % L;
  for (int64_t i = 0; i < body; i += L) {
    for (int64_t l = 0; l < L; ++l) {
      const float v = x[i + l];
      lo[l] = std::min(lo[l], v);
      hi[l] = std::max(hi[l], v);
      const double d = v;
      s1[l] += d;
      s2[l] += d * d;
    }
  }
  double sum = 0, squares = 0;
  float mn = x[0], mx = x[0];
  for (int64_t i = body; i < n; ++i) {
    mn = std::min(mn, x[i]);
    mx = std::max(mx, x[i]);
    sum += x[i];
    squares += static_cast<double>(x[i]) * x[i];
  }
  for (int64_t l = 0; l < L; ++l) {
    mn = std::min(mn, lo[l]);
    mx = std::max(mx, hi[l]);
    sum += s1[l];
    squares += s2[l];
  }
  if (mn == mx) {
    std::fill(out, out + n, 0.f);
    return;
  }
  const double count = static_cast<double>(n);
  const double mean = sum / count;
  double ss = squares - sum * mean;
  if (!(ss > 1e-9 * squares)) {
    for (int64_t l = 0; l < L; ++l) s2[l] = 0;
    for (int64_t i = 0; i < body; i += L) {
      for (int64_t l = 0; l < L; ++l) {
        const double d = x[i + l] - mean;
        s2[l] += d * d;
      }
    }
    ss = 0;
    for (int64_t i = body; i < n; ++i) ss += (x[i] - mean) * (x[i] - mean);
    for (int64_t l = 0; l < L; ++l) ss += s2[l];
  }
  const float m = static_cast<float>(mean);
  const float inv = static_cast<float>(1.0 / std::sqrt(ss / (count - 1)));
  scale_shift(x, out, n, m, inv);
}

struct SwapSpec {
  const int64_t* pairs;  // (T, 2, 3) starts of this view, or null
  int64_t iterations;
  int64_t px, py, pz;
};

// Copy a patch row of n floats; the official patch rows (4 floats) as one fixed-size copy (a single vector
// move, not a library call: a view's 100 swaps copy 12,800 such rows).
inline void copy_row(float* dst, const float* src, int64_t n) {
  if (n == 4) {
    std::memcpy(dst, src, 16);
  } else {
    std::memcpy(dst, src, sizeof(float) * n);
  }
}

void swap_patches(float* x, int64_t Y, int64_t Z, const SwapSpec& s, float* first, float* second) {
  const int64_t plane = Y * Z;
  for (int64_t t = 0; t < s.iterations; ++t) {
    const int64_t* a = s.pairs + 6 * t;
    const int64_t* b = a + 3;
    for (int pass = 0; pass < 2; ++pass) {  // read a into first, b into second
      const int64_t* o = pass == 0 ? a : b;
      float* dst = pass == 0 ? first : second;
      for (int64_t i = 0; i < s.px; ++i)
        for (int64_t j = 0; j < s.py; ++j)
          copy_row(dst + (i * s.py + j) * s.pz, x + (o[0] + i) * plane + (o[1] + j) * Z + o[2], s.pz);
    }
    for (int pass = 0; pass < 2; ++pass) {  // b <- old a, then a <- old b
      const int64_t* o = pass == 0 ? b : a;
      const float* src = pass == 0 ? first : second;
      for (int64_t i = 0; i < s.px; ++i)
        for (int64_t j = 0; j < s.py; ++j)
          copy_row(x + (o[0] + i) * plane + (o[1] + j) * Z + o[2], src + (i * s.py + j) * s.pz, s.pz);
    }
  }
}

}  // namespace

// One view: blur (ping-pong between a and b, starting from src), noise + gamma, swaps, z-normalisation.
void intensity_view(const float* src, int64_t X, int64_t Y, int64_t Z, const IntensityParams& params, float* dst,
                    float* a, float* b, IntensityScratch& scratch) {
  const int64_t volume = X * Y * Z;
  const bool wide = use_wide_simd();
  const float* cur = src;
  float* const bufs[2] = {a, b};
  int next = 0;
  for (int axis = 0; axis < 3; ++axis) {
    const std::vector<float> taps = gaussian_taps(params.sigmas[axis]);
    if (taps.empty()) continue;
    const int64_t radius = static_cast<int64_t>(taps.size() / 2);
    const int64_t len = axis == 0 ? X : (axis == 1 ? Y : Z);
    const std::vector<int32_t> refl = reflect_table(len, radius);
    float* o = bufs[next];
#if PCRLV2_INTENSITY_X86
    if (wide && axis < 2) {
      blur_outer_avx512(cur, o, axis == 0 ? 1 : X, len, axis == 0 ? Y * Z : Z, taps, refl, scratch.rows);
    } else if (wide && Z <= 32) {
      blur_inner_avx512(cur, o, X * Y, Z, taps, refl, scratch.index);
    } else
#endif
    if (axis < 2) {
      blur_outer(cur, o, axis == 0 ? 1 : X, len, axis == 0 ? Y * Z : Z, taps, refl);
    } else {
      if (static_cast<int64_t>(scratch.padded.size()) < Z + 2 * radius) scratch.padded.resize(Z + 2 * radius);
      blur_inner(cur, o, X * Y, Z, taps, refl, scratch.padded.data());
    }
    cur = o;
    next ^= 1;
  }
  float* work = a;
  if (cur == src) {
    std::memcpy(work, cur, sizeof(float) * volume);
  } else {
    work = const_cast<float*>(cur);
  }
  noise_gamma_seeded(work, volume, static_cast<uint64_t>(params.noise_seed), static_cast<float>(params.noise_std),
                     static_cast<float>(params.gamma));
  if (params.swap != nullptr && params.iterations > 0) {
    const int64_t patch_volume = params.patch[0] * params.patch[1] * params.patch[2];
    if (static_cast<int64_t>(scratch.first.size()) < patch_volume) {
      scratch.first.resize(patch_volume);
      scratch.second.resize(patch_volume);
    }
    const SwapSpec spec{params.swap, params.iterations, params.patch[0], params.patch[1], params.patch[2]};
    swap_patches(work, Y, Z, spec, scratch.first.data(), scratch.second.data());
  }
  z_normalize(work, dst, volume);
}

// Writes standard normal fields of `seeds` (N,) int64 into out (N, ...) contiguous float32.
void normal_field_out(const at::Tensor& seeds, at::Tensor& out, int64_t num_threads) {
  TORCH_CHECK(seeds.dim() == 1 && seeds.scalar_type() == at::kLong && seeds.is_contiguous() && seeds.device().is_cpu(),
              "normal_field: seeds must be a contiguous int64 (N,) CPU tensor");
  TORCH_CHECK(out.dim() >= 1 && out.size(0) == seeds.size(0) && out.scalar_type() == at::kFloat &&
                  out.is_contiguous() && out.device().is_cpu(),
              "normal_field: out must be a contiguous float32 (N, ...) CPU tensor");
  const int64_t n = seeds.size(0);
  if (n == 0) return;
  const int64_t len = out.numel() / n;
  TORCH_CHECK(len < (int64_t{1} << 31), "normal_field: at most 2^31 - 1 voxels per field");
  const int64_t* s = seeds.const_data_ptr<int64_t>();
  float* dst = out.mutable_data_ptr<float>();
  const int threads = static_cast<int>(std::max<int64_t>(1, num_threads));
  pybind11::gil_scoped_release no_gil;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t b = 0; b < n; ++b) normal_field_impl(static_cast<uint64_t>(s[b]), len, dst + b * len);
}

// Writes the augmented views of x (N, 1, X, Y, Z) contiguous float32 into out (same shape, may be x).
// sigmas (N, 3) float64, noise_std / gamma (N,) float64, noise_seed (N,) int64, swap (N, T, 2, 3) int64 or an
// empty tensor (no swap), patch the swap patch size. The Python wrapper validates values; the checks here
// guard memory safety.
void intensity_out(const at::Tensor& x, const at::Tensor& sigmas, const at::Tensor& noise_std,
                   const at::Tensor& noise_seed, const at::Tensor& gamma, const at::Tensor& swap,
                   std::vector<int64_t> patch, at::Tensor& out, int64_t num_threads) {
  TORCH_CHECK(x.dim() == 5 && x.size(1) == 1 && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                  x.device().is_cpu(),
              "intensity: x must be a contiguous float32 (N, 1, X, Y, Z) CPU tensor");
  const int64_t n = x.size(0), X = x.size(2), Y = x.size(3), Z = x.size(4), volume = X * Y * Z;
  auto check_param = [n](const at::Tensor& t, at::ScalarType type, int64_t cols, const char* name) {
    TORCH_CHECK(t.scalar_type() == type && t.is_contiguous() && t.device().is_cpu() && t.size(0) == n &&
                    (cols == 0 ? t.dim() == 1 : (t.dim() == 2 && t.size(1) == cols)),
                "intensity: bad ", name, " tensor");
  };
  check_param(sigmas, at::kDouble, 3, "sigmas");
  check_param(noise_std, at::kDouble, 0, "noise_std");
  check_param(noise_seed, at::kLong, 0, "noise_seed");
  check_param(gamma, at::kDouble, 0, "gamma");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.device().is_cpu(),
              "intensity: out must be a contiguous float32 CPU tensor of x's shape");
  const bool with_swap = swap.numel() > 0;
  int64_t iterations = 0;
  if (with_swap) {
    TORCH_CHECK(swap.dim() == 4 && swap.size(0) == n && swap.size(2) == 2 && swap.size(3) == 3 &&
                    swap.scalar_type() == at::kLong && swap.is_contiguous() && swap.device().is_cpu(),
                "intensity: swap must be a contiguous int64 (N, T, 2, 3) CPU tensor");
    TORCH_CHECK(patch.size() == 3 && patch[0] >= 1 && patch[1] >= 1 && patch[2] >= 1 && patch[0] <= X &&
                    patch[1] <= Y && patch[2] <= Z,
                "intensity: bad swap patch size");
    iterations = swap.size(1);
    const int64_t* p = swap.const_data_ptr<int64_t>();
    const int64_t limit[3] = {X - patch[0], Y - patch[1], Z - patch[2]};
    for (int64_t k = 0; k < swap.numel(); ++k)
      TORCH_CHECK(p[k] >= 0 && p[k] <= limit[k % 3], "intensity: swap patch start outside the view");
  }
  TORCH_CHECK(volume < (int64_t{1} << 31), "intensity: at most 2^31 - 1 voxels per view");
  if (n == 0 || volume == 0) return;
  const float* src = x.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  const double* S = sigmas.const_data_ptr<double>();
  const double* nstd = noise_std.const_data_ptr<double>();
  const int64_t* seeds = noise_seed.const_data_ptr<int64_t>();
  const double* G = gamma.const_data_ptr<double>();
  const int64_t* pairs = with_swap ? swap.const_data_ptr<int64_t>() : nullptr;
  const int threads = static_cast<int>(std::max<int64_t>(1, num_threads));
  pybind11::gil_scoped_release no_gil;
#pragma omp parallel num_threads(threads)
  {
    // Thread-local and kept between calls (OpenMP reuses its threads): no page faults on every batch.
    thread_local std::vector<float> a, b;
    thread_local IntensityScratch scratch;
    if (static_cast<int64_t>(a.size()) < volume) {
      a.resize(volume);
      b.resize(volume);
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t v = 0; v < n; ++v) {
      const IntensityParams params{S + 3 * v,    nstd[v],    seeds[v], G[v],
                                   with_swap ? pairs + v * iterations * 6 : nullptr,
                                   iterations, {with_swap ? patch[0] : 0, with_swap ? patch[1] : 0,
                                                with_swap ? patch[2] : 0}};
      intensity_view(src + v * volume, X, Y, Z, params, dst + v * volume, a.data(), b.data(), scratch);
    }
  }
}

}  // namespace pcrlv2

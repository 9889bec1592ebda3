// Batched affine resampling (flip folded in) of the native data backend, one OpenMP kernel.
//
// Semantics: pcrlv2_fast.data.augment.affine after augment.flip, per sample: output voxel i = (i, j, k) reads
// the flipped view at its source index s. With theta the view's (3, 3) map in grid_sample's normalised
// coordinates (theta[a][b] = M[a][b] * half[b] / half[a], half = (n - 1) / 2, M the float64 (3, 4) map of
// pcrlv2_fast.data.native.affine_maps) and base_b = torch.linspace(-1, 1, n_b) in float32, the float32
// grid coordinate is g_a = (T_a2[k] + T_a1[j]) + T_a0[i] with T_ab[idx] = float(theta[a][b]) * base_b[idx]
// (plus the map's translation beyond the centring, zero for affine_maps), and s_a = (g_a + 1) * half_a: the
// reference's float32 arithmetic (augment.affine's affine_grid + grid_sample(align_corners=True) on the
// flipped view). A voxel whose s lies in [-0.5, n - 0.5) on every axis is the trilinear interpolation of the
// flipped view at s clamped to [0, n - 1] (grid_sample's border padding); any other voxel gets the minimum of
// the sample's input. Reading the flipped view at index c along axis a is reading the input at n_a - 1 - c.
//
// Numerics: all float32. The coordinates and the inside decision are the reference's own float32 values (up
// to affine_grid's summation order); the interpolation is three nested lerps v0 + w (v1 - v0), which differs
// from grid_sample's weighted sum of eight corners by float rounding (a few 1e-7 on [0, 1] views).
//
// Work unit: one (sample, output x) slab; OpenMP guided schedule over all slabs, the GIL released. On CPUs with
// AVX-512 a row of 16 voxels is computed at once and the two z-neighbours of every corner are fetched by one
// 64-bit gather (they are adjacent in memory); elsewhere a portable two-pass row loop (coordinates, then the
// eight reads) computes the same float32 values.

// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own undefined-vector idiom.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <ATen/core/Tensor.h>
#include <ATen/ops/linspace.h>
#include <torch/csrc/utils/pybind.h>

#include "views.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PCRLV2_AFFINE_X86 1
#include <immintrin.h>
#define PCRLV2_AFFINE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PCRLV2_AFFINE_X86 0
#define PCRLV2_AFFINE_CLONES
#endif

namespace pcrlv2 {
namespace {

PCRLV2_AFFINE_CLONES float sample_min(const float* __restrict v, int64_t n) {
  float m = std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < n; ++k) m = v[k] < m ? v[k] : m;
  return m;
}

using Axis = AffineAxis;

// A view's per-axis grid tables, laid out [a][x: X | y: Y | z: Z] (a = the grid component), and its flips.
struct ViewMap {
  const float* T;
  bool flip[3];
};

// Portable row loop: coordinates and weights of every voxel of the row (pass 1), then the reads (pass 2).
PCRLV2_AFFINE_CLONES void affine_slab_portable(const float* __restrict src, const ViewMap& view, const Axis* ax,
                                               int64_t i, int64_t X, int64_t Y, int64_t Z, float fill,
                                               float* __restrict dst, AffineScratch& row) {
  const int64_t L = X + Y + Z;
  const float* T = view.T;
  const float tx0 = T[i], tx1 = T[L + i], tx2 = T[2 * L + i];
  const float* __restrict tz0 = T + X + Y;
  const float* __restrict tz1 = T + L + X + Y;
  const float* __restrict tz2 = T + 2 * L + X + Y;
  const int32_t n[3] = {static_cast<int32_t>(X), static_cast<int32_t>(Y), static_cast<int32_t>(Z)};
  // Neighbour steps in the input: +stride, or -stride along a flipped axis; 0 along an axis of length 1.
  int32_t step[3];
  for (int a = 0; a < 3; ++a) step[a] = n[a] >= 2 ? (view.flip[a] ? -ax[a].stride : ax[a].stride) : 0;
  // The corner's input offset: c * stride, or (n - 1 - c) * stride along a flipped axis: origin + c * mult.
  int32_t origin[3], mult[3];
  for (int a = 0; a < 3; ++a) {
    origin[a] = view.flip[a] ? (n[a] - 1) * ax[a].stride : 0;
    mult[a] = view.flip[a] ? -ax[a].stride : ax[a].stride;
  }
  int32_t* __restrict off = row.offset.data();
  int32_t* __restrict in = row.inside.data();
  float* __restrict wx = row.wx.data();
  float* __restrict wy = row.wy.data();
  float* __restrict wz = row.wz.data();
  const Axis a0 = ax[0], a1 = ax[1], a2 = ax[2];
  for (int64_t j = 0; j < Y; ++j) {
    const float uy0 = T[X + j], uy1 = T[L + X + j], uy2 = T[2 * L + X + j];
#pragma omp simd
    for (int64_t k = 0; k < Z; ++k) {
      const float s0 = (((tz0[k] + uy0) + tx0) + 1.f) * a0.half;
      const float s1 = (((tz1[k] + uy1) + tx1) + 1.f) * a1.half;
      const float s2 = (((tz2[k] + uy2) + tx2) + 1.f) * a2.half;
      in[k] = static_cast<int32_t>(s0 >= a0.lower) & static_cast<int32_t>(s0 < a0.upper) &
              static_cast<int32_t>(s1 >= a1.lower) & static_cast<int32_t>(s1 < a1.upper) &
              static_cast<int32_t>(s2 >= a2.lower) & static_cast<int32_t>(s2 < a2.upper);
      // s clamped to [0, hi], corner c = min(floor(s), last_corner), weight s - c.
      const float c0 = std::min(std::max(s0, 0.f), a0.hi), c1 = std::min(std::max(s1, 0.f), a1.hi),
                  c2 = std::min(std::max(s2, 0.f), a2.hi);
      const int32_t i0 = std::min(static_cast<int32_t>(c0), a0.last_corner);
      const int32_t i1 = std::min(static_cast<int32_t>(c1), a1.last_corner);
      const int32_t i2 = std::min(static_cast<int32_t>(c2), a2.last_corner);
      wx[k] = c0 - static_cast<float>(i0);
      wy[k] = c1 - static_cast<float>(i1);
      wz[k] = c2 - static_cast<float>(i2);
      off[k] = (origin[0] + i0 * mult[0]) + (origin[1] + i1 * mult[1]) + (origin[2] + i2 * mult[2]);
    }
    float* __restrict d = dst + j * Z;
    const int32_t sx = step[0], sy = step[1], sz = step[2];
    for (int64_t k = 0; k < Z; ++k) {
      const float* p = src + off[k];
      const float z = wz[k], y = wy[k], x = wx[k];
      const float c00 = p[0] + z * (p[sz] - p[0]);
      const float c01 = p[sy] + z * (p[sy + sz] - p[sy]);
      const float c10 = p[sx] + z * (p[sx + sz] - p[sx]);
      const float c11 = p[sx + sy] + z * (p[sx + sy + sz] - p[sx + sy]);
      const float c0 = c00 + y * (c01 - c00), c1 = c10 + y * (c11 - c10);
      d[k] = in[k] ? c0 + x * (c1 - c0) : fill;
    }
  }
}

#if PCRLV2_AFFINE_X86
#define PCRLV2_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))

// One axis of 16 voxels: s, the inside mask, the corner's input offset and the weight (as `corner`).
// One axis of 16 voxels: the inside mask, the weight and the (float, integer-valued) low corner of s clamped
// to [0, hi], as `corner` in the portable loop; the input offset is accumulated by the caller in float (exact:
// offsets stay below 2^24 elements), which saves the integer conversions and multiplies.
struct Lanes {
  __m512 corner, weight;
  __mmask16 inside;
};

PCRLV2_AVX512 inline Lanes corner16(__m512 g, const Axis& ax) {
  const __m512 s = _mm512_mul_ps(_mm512_add_ps(g, _mm512_set1_ps(1.f)), _mm512_set1_ps(ax.half));
  const __mmask16 inside = _mm512_cmp_ps_mask(s, _mm512_set1_ps(ax.lower), _CMP_GE_OQ) &
                           _mm512_cmp_ps_mask(s, _mm512_set1_ps(ax.upper), _CMP_LT_OQ);
  const __m512 sc = _mm512_min_ps(_mm512_max_ps(s, _mm512_setzero_ps()), _mm512_set1_ps(ax.hi));
  const __m512 c = _mm512_min_ps(_mm512_roundscale_ps(sc, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC),
                                 _mm512_set1_ps(static_cast<float>(ax.last_corner)));
  return {c, _mm512_sub_ps(sc, c), inside};
}

// Rows of Z >= 2 voxels (the z pair of a corner is then two adjacent floats, loaded as one 64-bit element).
PCRLV2_AVX512 void affine_slab_avx512(const float* __restrict src, const ViewMap& view, const Axis* ax, int64_t i,
                                      int64_t X, int64_t Y, int64_t Z, float fill, float* __restrict dst) {
  const int64_t L = X + Y + Z;
  const float* T = view.T;
  const __m512 tx0 = _mm512_set1_ps(T[i]), tx1 = _mm512_set1_ps(T[L + i]), tx2 = _mm512_set1_ps(T[2 * L + i]);
  const float* tz0 = T + X + Y;
  const float* tz1 = T + L + X + Y;
  const float* tz2 = T + 2 * L + X + Y;
  const int64_t n[3] = {X, Y, Z};
  // Input offset of the low corner: origin + sum_a c_a * mult_a, with c_a the flipped view's corner; along a
  // flipped axis the input index is n - 1 - c (the z pair then starts one lower, at n - 2 - c).
  float origin = 0.f;
  __m512 mult[3];
  for (int a = 0; a < 3; ++a) {
    const float stride = static_cast<float>(ax[a].stride);
    if (view.flip[a]) origin += static_cast<float>(n[a] - (a == 2 ? 2 : 1)) * stride;
    mult[a] = _mm512_set1_ps(view.flip[a] ? -stride : stride);
  }
  const __m512 vorigin = _mm512_set1_ps(origin);
  const int32_t sx = X >= 2 ? (view.flip[0] ? -ax[0].stride : ax[0].stride) : 0;
  const int32_t sy = Y >= 2 ? (view.flip[1] ? -ax[1].stride : ax[1].stride) : 0;
  // The z pair is loaded at the lower input index of the two: along a flipped z it holds (v1, v0).
  const bool zflip = view.flip[2];
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512i sel0 = zflip ? odd : even, sel1 = zflip ? even : odd;
  const __m512 vfill = _mm512_set1_ps(fill);
  const double* base = reinterpret_cast<const double*>(src);  // gathers of two floats, byte scale 4
  for (int64_t j = 0; j < Y; ++j) {
    const __m512 uy0 = _mm512_set1_ps(T[X + j]), uy1 = _mm512_set1_ps(T[L + X + j]),
                 uy2 = _mm512_set1_ps(T[2 * L + X + j]);
    float* d = dst + j * Z;
    for (int64_t k = 0; k < Z; k += 16) {
      const __mmask16 m = Z - k >= 16 ? static_cast<__mmask16>(0xFFFF)
                                      : static_cast<__mmask16>((1u << (Z - k)) - 1u);
      const __m512 g0 = _mm512_add_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(m, tz0 + k), uy0), tx0);
      const __m512 g1 = _mm512_add_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(m, tz1 + k), uy1), tx1);
      const __m512 g2 = _mm512_add_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(m, tz2 + k), uy2), tx2);
      const Lanes lx = corner16(g0, ax[0]);
      const Lanes ly = corner16(g1, ax[1]);
      const Lanes lz = corner16(g2, ax[2]);
      const __m512 offset = _mm512_fmadd_ps(
          lx.corner, mult[0], _mm512_fmadd_ps(ly.corner, mult[1], _mm512_fmadd_ps(lz.corner, mult[2], vorigin)));
      const __m512i p00 = _mm512_cvtps_epi32(offset);
      const __m512i corners[4] = {p00, _mm512_add_epi32(p00, _mm512_set1_epi32(sy)),
                                  _mm512_add_epi32(p00, _mm512_set1_epi32(sx)),
                                  _mm512_add_epi32(p00, _mm512_set1_epi32(sx + sy))};
      __m512 zl[4];
      const __mmask8 m_lo = static_cast<__mmask8>(m), m_hi = static_cast<__mmask8>(m >> 8);
      for (int c = 0; c < 4; ++c) {
        const __m256i idx_lo = _mm512_castsi512_si256(corners[c]);
        const __m256i idx_hi = _mm512_extracti64x4_epi64(corners[c], 1);
        const __m512 a = _mm512_castpd_ps(_mm512_mask_i32gather_pd(_mm512_setzero_pd(), m_lo, idx_lo, base, 4));
        const __m512 b = _mm512_castpd_ps(_mm512_mask_i32gather_pd(_mm512_setzero_pd(), m_hi, idx_hi, base, 4));
        const __m512 v0 = _mm512_permutex2var_ps(a, sel0, b), v1 = _mm512_permutex2var_ps(a, sel1, b);
        zl[c] = _mm512_fmadd_ps(lz.weight, _mm512_sub_ps(v1, v0), v0);
      }
      const __m512 c0 = _mm512_fmadd_ps(ly.weight, _mm512_sub_ps(zl[1], zl[0]), zl[0]);
      const __m512 c1 = _mm512_fmadd_ps(ly.weight, _mm512_sub_ps(zl[3], zl[2]), zl[2]);
      const __m512 v = _mm512_fmadd_ps(lx.weight, _mm512_sub_ps(c1, c0), c0);
      const __mmask16 inside = lx.inside & ly.inside & lz.inside;
      _mm512_mask_storeu_ps(d + k, m, _mm512_mask_blend_ps(inside, vfill, v));
    }
  }
}

// A static initialiser may run before libgcc's CPU probe: initialise it explicitly first.
const bool kHasAvx512 = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}();
#endif

// Per-view float32 grid tables: T[a][b][idx] = float(theta[a][b]) * base_b[idx] (each product rounded to float
// on its own: a separate, non-inlined loop, no multiply-add contraction), the translation beyond the centring
// (tau_a, zero for affine_maps' maps) added to the x table.
__attribute__((noinline)) void grid_tables(const double* M, const double* half, const float* const* bases,
                                           const int64_t* sizes, float* T) {
  for (int a = 0; a < 3; ++a) {
    double centred = M[4 * a + 3] - (sizes[a] - 1) / 2.0;
    for (int b = 0; b < 3; ++b) centred += M[4 * a + b] * (sizes[b] - 1) / 2.0;
    const float tau = half[a] == 0.0 ? 0.f : static_cast<float>(centred / half[a]);
    for (int b = 0; b < 3; ++b) {
      const float theta = half[a] == 0.0 ? 0.f : static_cast<float>(M[4 * a + b] * half[b] / half[a]);
      for (int64_t idx = 0; idx < sizes[b]; ++idx) {
        const float t = theta * bases[b][idx];
        *T++ = (b == 0 && tau != 0.f) ? t + tau : t;
      }
    }
  }
}

}  // namespace

// Whether the AVX-512 paths may be used (where the CPU has them); tests switch them off to check the portable
// paths on the same machine.
std::atomic<bool> g_wide_simd{true};

bool set_wide_simd(bool enabled) { return g_wide_simd.exchange(enabled); }

bool use_wide_simd() {
#if PCRLV2_AFFINE_X86
  return kHasAvx512 && g_wide_simd.load();
#else
  return false;
#endif
}

bool has_wide_simd() {
#if PCRLV2_AFFINE_X86
  return kHasAvx512;
#else
  return false;
#endif
}

namespace {

// One slab of one view: the AVX-512 row kernel where it applies, else the portable one.
void affine_slab(const float* src, const ViewMap& view, const Axis* ax, int64_t i, int64_t X, int64_t Y, int64_t Z,
                 float fill, float* dst, AffineScratch& scratch) {
#if PCRLV2_AFFINE_X86
  if (Z >= 2 && use_wide_simd()) {
    affine_slab_avx512(src, view, ax, i, X, Y, Z, fill, dst);
    return;
  }
#endif
  if (static_cast<int64_t>(scratch.offset.size()) < Z) {
    scratch.offset.resize(Z);
    scratch.inside.resize(Z);
    scratch.wx.resize(Z);
    scratch.wy.resize(Z);
    scratch.wz.resize(Z);
  }
  affine_slab_portable(src, view, ax, i, X, Y, Z, fill, dst, scratch);
}

}  // namespace

AffineGeometry::AffineGeometry(int64_t X, int64_t Y, int64_t Z) : sizes{X, Y, Z} {
  const int64_t strides[3] = {Y * Z, Z, 1};
  for (int a = 0; a < 3; ++a) {
    base_tensors[a] = at::linspace(-1, 1, sizes[a], at::TensorOptions().dtype(at::kFloat)).contiguous();
    bases[a] = base_tensors[a].const_data_ptr<float>();
    half[a] = static_cast<double>(sizes[a] - 1) / 2;
    const int32_t stride = static_cast<int32_t>(strides[a]);
    ax[a] = sizes[a] == 1 ? Axis{0.f, -1.f, 1.f, 0.f, 0, stride}
                          : Axis{static_cast<float>(half[a]), -0.5f, static_cast<float>(sizes[a]) - 0.5f,
                                 static_cast<float>(sizes[a] - 1), static_cast<int32_t>(sizes[a] - 2), stride};
  }
}

namespace {

// A view's grid tables (written to `tables`, 3 * (X + Y + Z) floats), its flips and its fill value.
ViewMap prepare_view(const float* src, const AffineGeometry& geometry, const double* map, const int64_t* flips,
                     float* tables, float& fill) {
  grid_tables(map, geometry.half, geometry.bases, geometry.sizes, tables);
  fill = sample_min(src, geometry.sizes[0] * geometry.sizes[1] * geometry.sizes[2]);
  return ViewMap{tables, {flips[0] != 0, flips[1] != 0, flips[2] != 0}};
}

}  // namespace

void affine_view(const float* src, const AffineGeometry& geometry, const double* map, const int64_t* flips,
                 float* dst, AffineScratch& scratch) {
  const int64_t X = geometry.sizes[0], Y = geometry.sizes[1], Z = geometry.sizes[2];
  if (static_cast<int64_t>(scratch.tables.size()) < 3 * (X + Y + Z)) scratch.tables.resize(3 * (X + Y + Z));
  float fill;
  const ViewMap view = prepare_view(src, geometry, map, flips, scratch.tables.data(), fill);
  for (int64_t i = 0; i < X; ++i) affine_slab(src, view, geometry.ax, i, X, Y, Z, fill, dst + i * Y * Z, scratch);
}

// Writes flip + affine of the (N, 1, X, Y, Z) float32 batch x into out (same shape, contiguous, not x).
// maps: (N, 3, 4) float64 view maps; flips: (N, 3) int64 (non-zero: flip that axis first). Arguments are
// validated by the Python wrapper; the checks here only guard memory safety.
void affine_out(const at::Tensor& x, const at::Tensor& maps, const at::Tensor& flips, at::Tensor& out,
                int64_t num_threads) {
  TORCH_CHECK(x.dim() == 5 && x.size(1) == 1 && x.scalar_type() == at::kFloat && x.is_contiguous() &&
                  x.device().is_cpu(),
              "affine: x must be a contiguous float32 (N, 1, X, Y, Z) CPU tensor");
  TORCH_CHECK(maps.dim() == 3 && maps.size(0) == x.size(0) && maps.size(1) == 3 && maps.size(2) == 4 &&
                  maps.scalar_type() == at::kDouble && maps.is_contiguous() && maps.device().is_cpu(),
              "affine: maps must be a contiguous float64 (N, 3, 4) CPU tensor");
  TORCH_CHECK(flips.dim() == 2 && flips.size(0) == x.size(0) && flips.size(1) == 3 &&
                  flips.scalar_type() == at::kLong && flips.is_contiguous() && flips.device().is_cpu(),
              "affine: flips must be a contiguous int64 (N, 3) CPU tensor");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.device().is_cpu(),
              "affine: out must be a contiguous float32 CPU tensor of x's shape");
  const int64_t n = x.size(0), X = x.size(2), Y = x.size(3), Z = x.size(4);
  const int64_t volume = X * Y * Z;
  if (n == 0 || volume == 0) return;
  TORCH_CHECK(out.data_ptr() != x.data_ptr(), "affine: out must not be x");
  TORCH_CHECK(volume < (int64_t{1} << 31), "affine: at most 2^31 - 1 voxels per view");
  const AffineGeometry geometry(X, Y, Z);
  const float* src = x.const_data_ptr<float>();
  const double* M = maps.const_data_ptr<double>();
  const int64_t* F = flips.const_data_ptr<int64_t>();
  float* dst = out.mutable_data_ptr<float>();
  const int threads = static_cast<int>(std::max<int64_t>(1, num_threads));
  pybind11::gil_scoped_release no_gil;
  // Few views (fewer than threads): split them into (view, x) slabs; else a view per task.
  if (n >= threads) {
#pragma omp parallel num_threads(threads)
    {
      AffineScratch scratch;
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < n; ++b) affine_view(src + b * volume, geometry, M + 12 * b, F + 3 * b, dst + b * volume,
                                                  scratch);
    }
    return;
  }
  const int64_t L = X + Y + Z;
  std::vector<float> fill(n), tables(n * 3 * L);
  std::vector<ViewMap> views(n);
  const int64_t n_slabs = n * X;
#pragma omp parallel num_threads(threads)
  {
    AffineScratch scratch;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n; ++b)
      views[b] = prepare_view(src + b * volume, geometry, M + 12 * b, F + 3 * b, tables.data() + b * 3 * L, fill[b]);
#pragma omp for schedule(guided)
    for (int64_t s = 0; s < n_slabs; ++s) {
      const int64_t b = s / X, i = s % X;
      affine_slab(src + b * volume, views[b], geometry.ax, i, X, Y, Z, fill[b], dst + s * Y * Z, scratch);
    }
  }
}

}  // namespace pcrlv2

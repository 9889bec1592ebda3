// Batched affine resampling (flip folded in) of the native data backend, one OpenMP kernel.
//
// Semantics: pcrlv2_fast.data.augment.affine after augment.flip, per sample. For output voxel i (x, y, z
// indices) the view's source index is s = M[:, :3] @ i + M[:, 3], with M the sample's (3, 4) float64 map
// built in Python (pcrlv2_fast.data.native.affine_maps: c + inverse @ (i - c), c = (n - 1) / 2, as
// augment.affine). An output voxel whose source index lies in [-0.5, n - 0.5) on every axis is the trilinear
// interpolation (index clamped to [0, n - 1], grid_sample's border padding) of the flipped input, i.e. of the
// input at n_a - 1 - s_a along flipped axes a; any other voxel gets the minimum of the sample's input.
//
// Numerics: the interpolation point and weights are computed in double per voxel. The inside decision is
// the reference's float32 one (the normalised grid coordinate g = sum_b theta[a][b] * linspace(-1, 1)[i_b]
// in float32, then (g + 1) * half in float32 compared with -0.5 and n - 0.5, as batched.affine_batch
// evaluates it): a voxel whose exact source lies within float32 rounding of the band edge would otherwise
// flip between the interpolated value and the fill (about one voxel per sixteen 64x64x32 views).
//
// Work unit: one (sample, output x) slab; OpenMP guided schedule over all slabs, the GIL released.

#include <ATen/core/Tensor.h>
#include <ATen/ops/linspace.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace pcrlv2 {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PCRLV2_AFFINE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PCRLV2_AFFINE_CLONES
#endif

PCRLV2_AFFINE_CLONES float sample_min(const float* __restrict v, int64_t n) {
  float m = std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < n; ++k) m = v[k] < m ? v[k] : m;
  return m;
}

// Per-sample float32 tables of the inside test: for voxel axis a and input axis b, T[a][b][idx] =
// float(theta[a][b]) * linspace(-1, 1, n_b)[idx] rounded to float, theta[a][b] = M[a][b] * half[b] / half[a]
// (batched._affine_theta's normalised matrix). Laid out as [a][x: X | y: Y | z: Z].
struct InsideAxis {
  bool always;  // n_a == 1: half = 0, no test (batched._inside_bounds gives -inf, inf)
  float half, upper;
};

// One output x-slab (Y x Z) of one sample: src the sample's (X, Y, Z) input, M its row-major (3, 4) view map,
// flip its three flip flags, T its inside tables.
PCRLV2_AFFINE_CLONES void affine_slab(const float* __restrict src, const double* M, const int64_t* flip,
                                      const float* __restrict T, const InsideAxis* ax, int64_t i, int64_t X,
                                      int64_t Y, int64_t Z, float fill, float* __restrict dst) {
  const double mx = static_cast<double>(X - 1), my = static_cast<double>(Y - 1), mz = static_cast<double>(Z - 1);
  const int64_t plane = Y * Z, L = X + Y + Z;
  const double di = static_cast<double>(i);
  const float tx0 = T[i], tx1 = T[L + i], tx2 = T[2 * L + i];
  const float* __restrict ty0 = T + X;
  const float* __restrict ty1 = T + L + X;
  const float* __restrict ty2 = T + 2 * L + X;
  const float* __restrict tz0 = T + X + Y;
  const float* __restrict tz1 = T + L + X + Y;
  const float* __restrict tz2 = T + 2 * L + X + Y;
  const InsideAxis a0 = ax[0], a1 = ax[1], a2 = ax[2];
  for (int64_t j = 0; j < Y; ++j) {
    const double dj = static_cast<double>(j);
    const double bx = M[0] * di + M[1] * dj + M[3];
    const double by = M[4] * di + M[5] * dj + M[7];
    const double bz = M[8] * di + M[9] * dj + M[11];
    const float uy0 = ty0[j], uy1 = ty1[j], uy2 = ty2[j];
    float* __restrict d = dst + j * Z;
    for (int64_t k = 0; k < Z; ++k) {
      // The reference's float32 inside test: (tz + ty) + tx, then (g + 1) * half.
      const float g0 = (tz0[k] + uy0) + tx0, g1 = (tz1[k] + uy1) + tx1, g2 = (tz2[k] + uy2) + tx2;
      const float s0 = (g0 + 1.f) * a0.half, s1 = (g1 + 1.f) * a1.half, s2 = (g2 + 1.f) * a2.half;
      const bool inside = (a0.always || (s0 >= -0.5f && s0 < a0.upper)) &&
                          (a1.always || (s1 >= -0.5f && s1 < a1.upper)) &&
                          (a2.always || (s2 >= -0.5f && s2 < a2.upper));
      if (!inside) {
        d[k] = fill;
        continue;
      }
      const double dk = static_cast<double>(k);
      double sx = bx + M[2] * dk, sy = by + M[6] * dk, sz = bz + M[10] * dk;
      sx = flip[0] ? mx - sx : sx;
      sy = flip[1] ? my - sy : sy;
      sz = flip[2] ? mz - sz : sz;
      sx = sx > 0.0 ? (sx < mx ? sx : mx) : 0.0;
      sy = sy > 0.0 ? (sy < my ? sy : my) : 0.0;
      sz = sz > 0.0 ? (sz < mz ? sz : mz) : 0.0;
      const int64_t x0 = static_cast<int64_t>(sx), y0 = static_cast<int64_t>(sy), z0 = static_cast<int64_t>(sz);
      const double wx = sx - static_cast<double>(x0), wy = sy - static_cast<double>(y0),
                   wz = sz - static_cast<double>(z0);
      const int64_t dx = x0 < X - 1 ? plane : 0, dy = y0 < Y - 1 ? Z : 0, dz = z0 < Z - 1 ? 1 : 0;
      const float* p = src + x0 * plane + y0 * Z + z0;
      const double c00 = p[0] + wz * (static_cast<double>(p[dz]) - p[0]);
      const double c01 = p[dy] + wz * (static_cast<double>(p[dy + dz]) - p[dy]);
      const double c10 = p[dx] + wz * (static_cast<double>(p[dx + dz]) - p[dx]);
      const double c11 = p[dx + dy] + wz * (static_cast<double>(p[dx + dy + dz]) - p[dx + dy]);
      const double c0 = c00 + wy * (c01 - c00), c1 = c10 + wy * (c11 - c10);
      d[k] = static_cast<float>(c0 + wx * (c1 - c0));
    }
  }
}

// The products of the inside tables, each rounded to float on its own (a separate, non-inlined loop: no
// multiply-add contraction with the sums of the slab loop).
__attribute__((noinline)) void inside_tables(const double* M, const double* half, const float* const* bases,
                                             const int64_t* sizes, float* T) {
  for (int a = 0; a < 3; ++a) {
    for (int b = 0; b < 3; ++b) {
      const float theta = half[a] == 0.0 ? 0.f : static_cast<float>(M[4 * a + b] * half[b] / half[a]);
      for (int64_t idx = 0; idx < sizes[b]; ++idx) *T++ = theta * bases[b][idx];
    }
  }
}

}  // namespace

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
  const int64_t sizes[3] = {X, Y, Z};
  // torch's own float32 linspace(-1, 1, n): the grid bases of affine_grid / batched.affine_batch.
  at::Tensor base_t[3];
  const float* bases[3];
  double half[3];
  InsideAxis ax[3];
  for (int a = 0; a < 3; ++a) {
    base_t[a] = at::linspace(-1, 1, sizes[a], x.options()).contiguous();
    bases[a] = base_t[a].const_data_ptr<float>();
    half[a] = static_cast<double>(sizes[a] - 1) / 2;
    ax[a] = {sizes[a] == 1, static_cast<float>(half[a]), static_cast<float>(sizes[a]) - 0.5f};
  }
  const float* src = x.const_data_ptr<float>();
  const double* M = maps.const_data_ptr<double>();
  const int64_t* F = flips.const_data_ptr<int64_t>();
  float* dst = out.mutable_data_ptr<float>();
  const int threads = static_cast<int>(std::max<int64_t>(1, num_threads));
  pybind11::gil_scoped_release no_gil;
  const int64_t L = X + Y + Z;
  std::vector<float> fill(n), tables(n * 3 * L);
  const int64_t n_slabs = n * X;
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n; ++b) {
      fill[b] = sample_min(src + b * volume, volume);
      inside_tables(M + 12 * b, half, bases, sizes, tables.data() + b * 3 * L);
    }
#pragma omp for schedule(guided)
    for (int64_t s = 0; s < n_slabs; ++s) {
      const int64_t b = s / X, i = s % X;
      affine_slab(src + b * volume, M + 12 * b, F + 3 * b, tables.data() + b * 3 * L, ax, i, X, Y, Z, fill[b],
                  dst + s * Y * Z);
    }
  }
}

}  // namespace pcrlv2

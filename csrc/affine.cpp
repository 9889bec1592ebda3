// Batched affine resampling (flip folded in) of the native data backend, one OpenMP kernel.
//
// Semantics: pcrlv2_fast.data.augment.affine after augment.flip, per sample. For output voxel i (x, y, z
// indices) the view's source index is s = M[:, :3] @ i + M[:, 3], with M the sample's (3, 4) float64 map
// built in Python (pcrlv2_fast.data.native.affine_maps: c + inverse @ (i - c), c = (n - 1) / 2, as
// augment.affine). An output voxel whose source index lies in [-0.5, n - 0.5) on every axis is the trilinear
// interpolation (index clamped to [0, n - 1], grid_sample's border padding) of the flipped input, i.e. of the
// input at n_a - 1 - s_a along flipped axes a; any other voxel gets the minimum of the sample's input.
//
// Numerics: the interpolation point is computed in double per voxel, the weights rounded to float and the
// interpolation done in float (as grid_sample's float32 path). The inside decision is
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
#define PCRLV2_AFFINE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
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
  float half, lower, upper;  // inside: lower <= (g + 1) * half < upper; n_a == 1: no test (finite bounds that
                             // always hold: half = 0, as batched._inside_bounds' -inf, inf)
};

// Per-thread scratch of one output row: flat offset of the low corner and the three weights per voxel.
struct RowScratch {
  std::vector<int32_t> offset;
  std::vector<float> wx, wy, wz;
  std::vector<int32_t> inside;
  explicit RowScratch(int64_t n) : offset(n), wx(n), wy(n), wz(n), inside(n) {}
};

// One output x-slab (Y x Z) of one sample: src the sample's (X, Y, Z) input, M its row-major (3, 4) map of the
// flipped input (flips folded in), T its inside tables. Two passes per output row: coordinates, weights and
// the inside decision (arithmetic only), then the eight reads and the interpolation.
PCRLV2_AFFINE_CLONES void affine_slab(const float* __restrict src, const double* M, const float* __restrict T,
                                      const InsideAxis* ax, int64_t i, int64_t X, int64_t Y, int64_t Z, float fill,
                                      float* __restrict dst, RowScratch& row) {
  const int64_t plane = Y * Z, L = X + Y + Z;
  const int64_t sx_step = X >= 2 ? plane : 0, sy_step = Y >= 2 ? Z : 0, sz_step = Z >= 2 ? 1 : 0;
  const double di = static_cast<double>(i);
  const float tx0 = T[i], tx1 = T[L + i], tx2 = T[2 * L + i];
  const float* __restrict tz0 = T + X + Y;
  const float* __restrict tz1 = T + L + X + Y;
  const float* __restrict tz2 = T + 2 * L + X + Y;
  const InsideAxis a0 = ax[0], a1 = ax[1], a2 = ax[2];
  int32_t* __restrict off = row.offset.data();
  float* __restrict wx = row.wx.data();
  float* __restrict wy = row.wy.data();
  float* __restrict wz = row.wz.data();
  int32_t* __restrict in = row.inside.data();
  const double hx = static_cast<double>(X - 1), hy = static_cast<double>(Y - 1), hz = static_cast<double>(Z - 1);
  const int32_t lx = static_cast<int32_t>(std::max<int64_t>(X - 2, 0)), ly = static_cast<int32_t>(std::max<int64_t>(Y - 2, 0)),
                lz = static_cast<int32_t>(std::max<int64_t>(Z - 2, 0));
  const int32_t plane32 = static_cast<int32_t>(plane), Z32 = static_cast<int32_t>(Z);
  const double mx = M[2], my = M[6], mz = M[10];  // steps of the source index along output z
  // Per axis: the source index is clamped to [0, n - 1] and the low corner is min(floor(s), max(n - 2, 0)), so
  // the upper neighbour exists (weight 1 at s = n - 1); an axis of length 1 has corner 0 and weight 0.
  for (int64_t j = 0; j < Y; ++j) {
    const double dj = static_cast<double>(j);
    const double bx = M[0] * di + M[1] * dj + M[3];
    const double by = M[4] * di + M[5] * dj + M[7];
    const double bz = M[8] * di + M[9] * dj + M[11];
    const float uy0 = T[X + j], uy1 = T[L + X + j], uy2 = T[2 * L + X + j];
    for (int64_t k = 0; k < Z; ++k) {
      // The reference's float32 inside test: (tz + ty) + tx, then (g + 1) * half.
      const float g0 = (tz0[k] + uy0) + tx0, g1 = (tz1[k] + uy1) + tx1, g2 = (tz2[k] + uy2) + tx2;
      const float s0 = (g0 + 1.f) * a0.half, s1 = (g1 + 1.f) * a1.half, s2 = (g2 + 1.f) * a2.half;
      in[k] = static_cast<int32_t>(s0 >= a0.lower) & static_cast<int32_t>(s0 < a0.upper) &
              static_cast<int32_t>(s1 >= a1.lower) & static_cast<int32_t>(s1 < a1.upper) &
              static_cast<int32_t>(s2 >= a2.lower) & static_cast<int32_t>(s2 < a2.upper);
    }
#pragma omp simd
    for (int64_t k = 0; k < Z; ++k) {
      const double dk = static_cast<double>(k);
      const double sx = std::min(std::max(bx + mx * dk, 0.0), hx);
      const double sy = std::min(std::max(by + my * dk, 0.0), hy);
      const double sz = std::min(std::max(bz + mz * dk, 0.0), hz);
      const int32_t cx = std::min(static_cast<int32_t>(sx), lx);
      const int32_t cy = std::min(static_cast<int32_t>(sy), ly);
      const int32_t cz = std::min(static_cast<int32_t>(sz), lz);
      wx[k] = static_cast<float>(sx - static_cast<double>(cx));
      wy[k] = static_cast<float>(sy - static_cast<double>(cy));
      wz[k] = static_cast<float>(sz - static_cast<double>(cz));
      off[k] = cx * plane32 + cy * Z32 + cz;
    }
    float* __restrict d = dst + j * Z;
    for (int64_t k = 0; k < Z; ++k) {
      const float* p = src + off[k];
      const float z = wz[k], y = wy[k], x = wx[k];
      const float c00 = p[0] + z * (p[sz_step] - p[0]);
      const float c01 = p[sy_step] + z * (p[sy_step + sz_step] - p[sy_step]);
      const float c10 = p[sx_step] + z * (p[sx_step + sz_step] - p[sx_step]);
      const float c11 = p[sx_step + sy_step] + z * (p[sx_step + sy_step + sz_step] - p[sx_step + sy_step]);
      const float c0 = c00 + y * (c01 - c00), c1 = c10 + y * (c11 - c10);
      const float v = c0 + x * (c1 - c0);
      d[k] = in[k] ? v : fill;
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
  TORCH_CHECK(volume < (int64_t{1} << 31), "affine: at most 2^31 - 1 voxels per view");
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
    ax[a] = sizes[a] == 1 ? InsideAxis{0.f, -1.f, 1.f}
                          : InsideAxis{static_cast<float>(half[a]), -0.5f, static_cast<float>(sizes[a]) - 0.5f};
  }
  const float* src = x.const_data_ptr<float>();
  const double* M = maps.const_data_ptr<double>();
  const int64_t* F = flips.const_data_ptr<int64_t>();
  float* dst = out.mutable_data_ptr<float>();
  const int threads = static_cast<int>(std::max<int64_t>(1, num_threads));
  pybind11::gil_scoped_release no_gil;
  const int64_t L = X + Y + Z;
  std::vector<float> fill(n), tables(n * 3 * L);
  // Maps of the flipped inputs: reading the flipped view at s_a is reading the input at (n_a - 1) - s_a.
  std::vector<double> folded(12 * n);
  for (int64_t b = 0; b < n; ++b) {
    for (int a = 0; a < 3; ++a) {
      const bool flip = F[3 * b + a] != 0;
      for (int c = 0; c < 4; ++c) {
        const double m = M[12 * b + 4 * a + c];
        folded[12 * b + 4 * a + c] = flip ? (c == 3 ? static_cast<double>(sizes[a] - 1) - m : -m) : m;
      }
    }
  }
  const int64_t n_slabs = n * X;
#pragma omp parallel num_threads(threads)
  {
    RowScratch row(Z);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n; ++b) {
      fill[b] = sample_min(src + b * volume, volume);
      inside_tables(M + 12 * b, half, bases, sizes, tables.data() + b * 3 * L);
    }
#pragma omp for schedule(guided)
    for (int64_t s = 0; s < n_slabs; ++s) {
      const int64_t b = s / X, i = s % X;
      affine_slab(src + b * volume, folded.data() + 12 * b, tables.data() + b * 3 * L, ax, i, X, Y, Z, fill[b],
                  dst + s * Y * Z, row);
    }
  }
}

}  // namespace pcrlv2

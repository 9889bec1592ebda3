// The fused view pipeline of the native data backend: crop + resize, flip + affine, and the intensity chain of
// every view of a batch, one view at a time per thread, so a view's intermediate volumes stay in the core's
// cache and only the results are written to memory.
//
// Semantics per view v (see pcrlv2_fast.data.native.views): crop_resize(volumes[volume_index[v]], boxes[v],
// out shape, windows[volume_index[v]]) -> affine(., maps[v], flips[v]) -> (kept in spatial_out[v] for the
// first spatial_out.size(0) views) -> intensity(., sigmas[v], noise_std[v], noise_seed[v], gamma[v], swap[v])
// -> out[v]. Each stage is the per-view function of its kernel file (csrc/views.h), so the results equal the
// three batch kernels' bit for bit.

#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "views.h"

namespace pcrlv2 {

void views_out(const std::vector<at::Tensor>& volumes, const at::Tensor& windows, const at::Tensor& volume_index,
               const at::Tensor& boxes, const at::Tensor& maps, const at::Tensor& flips, const at::Tensor& sigmas,
               const at::Tensor& noise_std, const at::Tensor& noise_seed, const at::Tensor& gamma,
               const at::Tensor& swap, std::vector<int64_t> patch, at::Tensor& spatial_out, at::Tensor& out,
               const at::Tensor& order, int64_t num_threads) {
  TORCH_CHECK(out.dim() == 5 && out.size(1) == 1 && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.device().is_cpu(),
              "views: out must be a contiguous float32 (N, 1, X, Y, Z) CPU tensor");
  const int64_t n = out.size(0), X = out.size(2), Y = out.size(3), Z = out.size(4), volume = X * Y * Z;
  TORCH_CHECK(volume < (int64_t{1} << 31), "views: at most 2^31 - 1 voxels per view");
  const int64_t V = static_cast<int64_t>(volumes.size());
  for (int64_t k = 0; k < V; ++k) {
    const at::Tensor& vol = volumes[k];
    TORCH_CHECK(vol.dim() == 3 && vol.device().is_cpu() &&
                    (vol.scalar_type() == at::kShort || vol.scalar_type() == at::kHalf ||
                     vol.scalar_type() == at::kFloat),
                "views: volume ", k, " must be a 3D int16, float16 or float32 CPU tensor");
    for (int d = 0; d < 3; ++d) TORCH_CHECK(vol.stride(d) >= 0, "views: negative volume strides");
  }
  auto check = [n](const at::Tensor& t, at::ScalarType type, std::vector<int64_t> shape, const char* name) {
    std::vector<int64_t> full{n};
    full.insert(full.end(), shape.begin(), shape.end());
    TORCH_CHECK(t.scalar_type() == type && t.is_contiguous() && t.device().is_cpu() && t.sizes().vec() == full,
                "views: bad ", name, " tensor");
  };
  TORCH_CHECK(windows.scalar_type() == at::kDouble && windows.is_contiguous() && windows.dim() == 2 &&
                  windows.size(0) == V && windows.size(1) == 2,
              "views: windows must be a contiguous float64 (V, 2) tensor");
  check(volume_index, at::kLong, {}, "volume_index");
  check(boxes, at::kLong, {6}, "boxes");
  check(maps, at::kDouble, {3, 4}, "maps");
  check(flips, at::kLong, {3}, "flips");
  check(sigmas, at::kDouble, {3}, "sigmas");
  check(noise_std, at::kDouble, {}, "noise_std");
  check(noise_seed, at::kLong, {}, "noise_seed");
  check(gamma, at::kDouble, {}, "gamma");
  const double* W = windows.const_data_ptr<double>();
  const int64_t* vi = volume_index.const_data_ptr<int64_t>();
  const int64_t* bx = boxes.const_data_ptr<int64_t>();
  for (int64_t v = 0; v < n; ++v) {
    TORCH_CHECK(vi[v] >= 0 && vi[v] < V, "views: volume index of view ", v, " out of range");
    TORCH_CHECK(W[2 * vi[v] + 1] > W[2 * vi[v]], "views: window hi must be greater than lo");
    const at::Tensor& vol = volumes[vi[v]];
    for (int d = 0; d < 3; ++d) {
      const int64_t start = bx[6 * v + d], size = bx[6 * v + 3 + d];
      TORCH_CHECK(start >= 0 && size >= 1 && start + size <= vol.size(d) && size <= INT32_MAX,
                  "views: box of view ", v, " lies outside its volume");
    }
  }
  const bool with_swap = swap.numel() > 0;
  int64_t iterations = 0;
  if (with_swap) {
    TORCH_CHECK(swap.dim() == 4 && swap.size(0) == n && swap.size(2) == 2 && swap.size(3) == 3 &&
                    swap.scalar_type() == at::kLong && swap.is_contiguous() && swap.device().is_cpu(),
                "views: swap must be a contiguous int64 (N, T, 2, 3) CPU tensor");
    TORCH_CHECK(patch.size() == 3 && patch[0] >= 1 && patch[1] >= 1 && patch[2] >= 1 && patch[0] <= X &&
                    patch[1] <= Y && patch[2] <= Z,
                "views: bad swap patch size");
    iterations = swap.size(1);
    const int64_t* p = swap.const_data_ptr<int64_t>();
    const int64_t limit[3] = {X - patch[0], Y - patch[1], Z - patch[2]};
    for (int64_t k = 0; k < swap.numel(); ++k)
      TORCH_CHECK(p[k] >= 0 && p[k] <= limit[k % 3], "views: swap patch start outside the view");
  }
  const int64_t kept = spatial_out.numel() == 0 ? 0 : spatial_out.size(0);
  if (kept > 0) {
    TORCH_CHECK(spatial_out.dim() == 5 && kept <= n && spatial_out.size(1) == 1 && spatial_out.size(2) == X &&
                    spatial_out.size(3) == Y && spatial_out.size(4) == Z &&
                    spatial_out.scalar_type() == at::kFloat && spatial_out.is_contiguous() &&
                    spatial_out.device().is_cpu(),
                "views: spatial_out must be a contiguous float32 (K <= N, 1, X, Y, Z) CPU tensor");
  }
  // The processing order (a permutation of the views, or empty: 0..N-1). Views whose boxes overlap (the two
  // global views of a sample) placed next to each other read their shared source from cache.
  std::vector<int64_t> sequence(n);
  if (order.numel() == 0) {
    for (int64_t v = 0; v < n; ++v) sequence[v] = v;
  } else {
    TORCH_CHECK(order.scalar_type() == at::kLong && order.is_contiguous() && order.dim() == 1 && order.size(0) == n,
                "views: order must be a contiguous int64 (N,) permutation");
    const int64_t* o = order.const_data_ptr<int64_t>();
    std::vector<char> seen(n, 0);
    for (int64_t q = 0; q < n; ++q) {
      TORCH_CHECK(o[q] >= 0 && o[q] < n && !seen[o[q]], "views: order must be a permutation of 0..N-1");
      seen[o[q]] = 1;
      sequence[q] = o[q];
    }
  }
  if (n == 0 || volume == 0) return;
  const AffineGeometry geometry(X, Y, Z);
  const double* M = maps.const_data_ptr<double>();
  const int64_t* F = flips.const_data_ptr<int64_t>();
  const double* S = sigmas.const_data_ptr<double>();
  const double* nstd = noise_std.const_data_ptr<double>();
  const int64_t* seeds = noise_seed.const_data_ptr<int64_t>();
  const double* G = gamma.const_data_ptr<double>();
  const int64_t* pairs = with_swap ? swap.const_data_ptr<int64_t>() : nullptr;
  float* dst = out.mutable_data_ptr<float>();
  float* kept_dst = kept > 0 ? spatial_out.mutable_data_ptr<float>() : nullptr;
  const int threads = static_cast<int>(std::max<int64_t>(1, num_threads));
  pybind11::gil_scoped_release no_gil;
#pragma omp parallel num_threads(threads)
  {
    // Three view-sized volumes per thread: the crop (a), the spatial result (b, unless it is kept), and the
    // intensity chain's ping-pong (a again, c). Thread-local and kept between calls (OpenMP reuses its
    // threads): fresh buffers would cost a page fault per 4 KiB on every batch.
    thread_local std::vector<float> a, b, c;
    thread_local CropScratch crop_scratch;
    thread_local AffineScratch affine_scratch;
    thread_local IntensityScratch intensity_scratch;
    if (static_cast<int64_t>(a.size()) < volume) {
      a.resize(volume);
      b.resize(volume);
      c.resize(volume);
    }
    // Two consecutive views of the sequence per task: a sample's pair of global views stays on one thread.
#pragma omp for schedule(dynamic, 2)
    for (int64_t q = 0; q < n; ++q) {
      const int64_t v = sequence[q];
      const int64_t k = vi[v];
      crop_resize_view(volumes[k], bx + 6 * v, W[2 * k], W[2 * k + 1], X, Y, Z, a.data(), crop_scratch);
      float* spatial = v < kept ? kept_dst + v * volume : b.data();
      affine_view(a.data(), geometry, M + 12 * v, F + 3 * v, spatial, affine_scratch);
      const IntensityParams params{S + 3 * v, nstd[v], seeds[v], G[v], with_swap ? pairs + v * iterations * 6 : nullptr,
                                   iterations, {with_swap ? patch[0] : 0, with_swap ? patch[1] : 0,
                                                with_swap ? patch[2] : 0}};
      intensity_view(spatial, X, Y, Z, params, dst + v * volume, a.data(), c.data(), intensity_scratch);
    }
  }
}

}  // namespace pcrlv2

// Per-view entry points of the native kernels, shared by their batch wrappers and by the fused view pipeline
// (csrc/pipeline.cpp). Every function here works on one view on the calling thread, with caller-owned scratch.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace pcrlv2 {

// Whether the AVX-512 paths are used: the CPU has them and they are not switched off (csrc/affine.cpp).
bool use_wide_simd();

// ---- crop_resize.cpp: cut box (x0, y0, z0, sx, sy, sz) out of `volume` (3D int16 / float16 / float32 CPU
// tensor), window it with (lo, hi), resize to (ox, oy, oz) into out (float32, contiguous).
struct CropScratch {
  std::vector<float> plane, rows, orow;
};
void crop_resize_view(const at::Tensor& volume, const int64_t* box, double lo, double hi, int64_t ox, int64_t oy,
                      int64_t oz, float* out, CropScratch& scratch);

// ---- affine.cpp: flip + affine of one (X, Y, Z) view with its (3, 4) float64 map and (3,) int64 flips. The
// geometry (float32 grid bases, inside bands, clamps, strides) is shared by all views of one shape.
struct AffineAxis {
  float half, lower, upper, hi;  // s = (g + 1) * half; inside: lower <= s < upper; clamp [0, hi]
  int32_t last_corner, stride;   // largest low corner; input element stride
};
struct AffineGeometry {
  at::Tensor base_tensors[3];  // torch's float32 linspace(-1, 1, n) per axis
  const float* bases[3];
  int64_t sizes[3];
  double half[3];
  AffineAxis ax[3];
  AffineGeometry(int64_t X, int64_t Y, int64_t Z);
};
struct AffineScratch {
  std::vector<float> tables, wx, wy, wz;
  std::vector<int32_t> offset, inside;
};
void affine_view(const float* src, const AffineGeometry& geometry, const double* map, const int64_t* flips,
                 float* dst, AffineScratch& scratch);

// ---- intensity.cpp: blur, noise, gamma, swap, z-normalisation of one (X, Y, Z) view from src into dst (may be
// src). `a` and `b`: scratch volumes of the view's size (neither may be src or dst).
struct IntensityParams {
  const double* sigmas;  // 3
  double noise_std;
  int64_t noise_seed;
  double gamma;
  const int64_t* swap;  // (iterations, 2, 3) starts, or null
  int64_t iterations;
  int64_t patch[3];
};
struct IntensityScratch {
  std::vector<float> padded, first, second;
  std::vector<const float*> rows;
  std::vector<int32_t> index;
};
void intensity_view(const float* src, int64_t X, int64_t Y, int64_t Z, const IntensityParams& params, float* dst,
                    float* a, float* b, IntensityScratch& scratch);

}  // namespace pcrlv2

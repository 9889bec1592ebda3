// crop_resize: cut N boxes out of one 3D volume, window them and resize each trilinearly.
//
// Semantics (pcrlv2_fast/reference/crop_resize.py): per box, every source voxel v becomes
// clip((v - lo) / (hi - lo), 0, 1), then F.interpolate(mode="trilinear", align_corners=False) resizes the
// crop to out_size. The source is read in place (int16 / float16 / float32, typically a read-only
// np.memmap of a .npy cache file), so a crop touches only the pages of its own box.
//
// Trilinear interpolation is separable. Work is split into (box, output x) slabs, the OpenMP unit:
//   1. x: blend the two source x-planes of the slab into P[y][z] (windowing each voxel on the way),
//      only for the y rows some output row needs (a downsample by > 2 skips rows);
//   2. y: per output row, blend two rows of P into R[z];
//   3. z: gather two entries of R per output voxel.
// Steps 1 and 2 run over contiguous z with loop-invariant weights, so they vectorise; step 3 reads a
// buffer that sits in L1 (AVX2 gathers where the CPU has them). Index/weight tables are computed once per box, in float exactly as torch's
// upsample_trilinear3d does, so the only differences to the reference are float rounding of the
// (differently nested) weighted sums: a few ulp, far below the 1e-5 tolerance.

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include "views.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

// The per-slab work is compiled three times (GCC function multi-versioning, resolved once at load time): for
// x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA, 8 floats a vector) and the baseline (SSE2), so one build runs
// anywhere.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define PCRLV2_X86 1
#define PCRLV2_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PCRLV2_X86 0
#define PCRLV2_CLONES
#endif
#define PCRLV2_INLINE inline __attribute__((always_inline))

// One axis of the resize: output index -> two source offsets (relative to the box start) and weights.
// int32 offsets: what an AVX2 gather takes (box sizes are checked to fit).
struct AxisTable {
  std::vector<int32_t> i0, i1;
  std::vector<float> w0, w1;
};

// torch's align_corners=False source index: scale = in / out computed in float (no scale_factor given),
// src = max(scale * (i + 0.5) - 0.5, 0), i0 = floor(src), i1 = i0 + 1 clamped to the last voxel.
AxisTable axis_table(int64_t in, int64_t out) {
  AxisTable t;
  t.i0.resize(out);
  t.i1.resize(out);
  t.w0.resize(out);
  t.w1.resize(out);
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t i = 0; i < out; ++i) {
    float src = scale * (static_cast<float>(i) + 0.5f) - 0.5f;
    src = src < 0.f ? 0.f : src;
    const int64_t lo = std::min(static_cast<int64_t>(src), in - 1);
    const float w1 = std::min(std::max(src - static_cast<float>(lo), 0.f), 1.f);
    t.i0[i] = static_cast<int32_t>(lo);
    t.i1[i] = static_cast<int32_t>(lo < in - 1 ? lo + 1 : lo);
    t.w1[i] = w1;
    t.w0[i] = 1.f - w1;
  }
  return t;
}

// The z step on AVX-512 CPUs without gathers: output vector v (16 voxels) reads source entries
// [base, base + 32 * regs) of the row, loaded as `regs` (2 or 4) vectors, and picks each lane's two neighbours
// with two-register permutes (a blend between the pairs when regs == 4). Empty when some vector spans more
// than 64 entries (then the gathers are used).
struct ZPlan {
  std::vector<int32_t> base, idx0, idx1;  // idx: 16 per vector, relative to base
  std::vector<float> w0, w1;              // 16 per vector (0 beyond oz)
  int regs = 0;
};

struct BoxTables {
  AxisTable x, y, z;
  ZPlan zplan;
  std::vector<int64_t> rows;  // the source y rows (relative) that any output row reads, ascending
};

template <typename T>
PCRLV2_INLINE float to_float(T v) {
  return static_cast<float>(v);
}

// IEEE half -> float without branches (c10::Half's portable conversion does not vectorise): shift the
// exponent and mantissa into place and rescale by 2^112, which also turns half subnormals into the right
// normal floats; Inf/NaN (exponent 31) get the float exponent 255.
template <>
PCRLV2_INLINE float to_float(c10::Half v) {
  const uint32_t h = v.x;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t body = (h & 0x7fffu) << 13;
  float mag;
  std::memcpy(&mag, &body, sizeof(mag));
  mag *= 0x1p112f;
  uint32_t bits;
  std::memcpy(&bits, &mag, sizeof(bits));
  bits = (h & 0x7c00u) == 0x7c00u ? (bits | 0x7f800000u) : bits;
  bits |= sign;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Window: (v - lo) / (hi - lo) as v * scale + offset, clipped to [0, 1]. The reciprocal form differs from
// the reference's division by at most an ulp or two of the result and keeps the loop division-free.
// Plain ternaries (std::min/max stay branches) become vector max/min under -ffinite-math-only: NaN and
// Inf voxels give unspecified values here (the reference spreads NaN); cached volumes are finite.
template <typename T>
PCRLV2_INLINE float window(T v, float scale, float offset) {
  float w = to_float(v) * scale + offset;
  w = w > 0.f ? w : 0.f;
  return w < 1.f ? w : 1.f;
}

// The window of a crop. For int16 volumes with an integer window (the cache's HU volumes) the clip is done
// on the integers, clamp(v, lo, hi), and the linear map (c - lo) / (hi - lo) is applied to the interpolated
// output instead of to every source voxel: interpolation weights sum to one along each axis, so this is the
// same value up to float rounding (~3e-8), with a third fewer operations per source voxel.
struct Window {
  float scale, offset;   // v * scale + offset = (v - lo) / (hi - lo)
  bool raw = false;      // interpolate clamp(v, ilo, ihi) and map the output
  int16_t ilo = 0, ihi = 0;
};

Window make_window(double lo, double hi, bool int16_input) {
  const double range = hi - lo;
  Window w{static_cast<float>(1.0 / range), static_cast<float>(-lo / range)};
  if (int16_input && lo == std::floor(lo) && hi == std::floor(hi) && lo >= -32768.0 && hi <= 32767.0) {
    w.raw = true;
    w.ilo = static_cast<int16_t>(lo);
    w.ihi = static_cast<int16_t>(hi);
  }
  return w;
}

// Contiguous rows of int16 in raw mode: the clamps run on 16-bit lanes.
PCRLV2_INLINE void blend_rows_raw(const int16_t* __restrict a, const int16_t* __restrict b, int64_t n, float wa,
                                  float wb, int16_t lo, int16_t hi, float* __restrict dst) {
  if (wb == 0.f) {
    for (int64_t z = 0; z < n; ++z) {
      const int16_t ca = a[z] < lo ? lo : (a[z] > hi ? hi : a[z]);
      dst[z] = static_cast<float>(ca);
    }
  } else {
    for (int64_t z = 0; z < n; ++z) {
      const int16_t ca = a[z] < lo ? lo : (a[z] > hi ? hi : a[z]);
      const int16_t cb = b[z] < lo ? lo : (b[z] > hi ? hi : b[z]);
      dst[z] = wa * static_cast<float>(ca) + wb * static_cast<float>(cb);
    }
  }
}

// One row of P: the x-blend of two windowed source rows a and b. wb == 0 (the output plane sits on a
// source plane, e.g. along an axis that is not resized) reads a alone.
template <typename T>
PCRLV2_INLINE void blend_rows(const T* __restrict a, const T* __restrict b, int64_t stride_z, int64_t n, float wa,
                              float wb, const Window& win, float* __restrict dst) {
  if constexpr (std::is_same_v<T, int16_t>) {
    if (win.raw && stride_z == 1) return blend_rows_raw(a, b, n, wa, wb, win.ilo, win.ihi, dst);
  }
  const float scale = win.scale, offset = win.offset;
  if (stride_z == 1 && wb == 0.f) {  // then wa == 1
    for (int64_t z = 0; z < n; ++z) dst[z] = window(a[z], scale, offset);
  } else if (stride_z == 1) {  // the common C-order case: contiguous, vectorised
    for (int64_t z = 0; z < n; ++z) {
      dst[z] = wa * window(a[z], scale, offset) + wb * window(b[z], scale, offset);
    }
  } else {
    for (int64_t z = 0; z < n; ++z) {
      dst[z] = wa * window(a[z * stride_z], scale, offset) + wb * window(b[z * stride_z], scale, offset);
    }
  }
}

// Source rows are short (sz voxels: 16-192 bytes for the official crops) and a plane stride apart, so the
// hardware prefetchers barely help, and a cold crop (a random box of a memory-mapped volume) would stall
// on every row. Prefetching rows a few iterations ahead keeps several misses in flight.
constexpr int64_t kPrefetchRows = 8;

PCRLV2_INLINE void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
  __builtin_prefetch(c + bytes - 1, 0, 3);
}

// Step 3, the z gather: out[k] = w0[k] * row[i0[k]] + w1[k] * row[i1[k]]. Scalar code spends ~9 uops per
// output voxel on it, the largest single cost of a crop; AVX2 gathers make it faster where present
// (benchmarks/README.md, design measurements).
PCRLV2_INLINE void z_resample_scalar(const float* __restrict row, const AxisTable& t, int64_t oz,
                                     float* __restrict out) {
  const int32_t* __restrict i0 = t.i0.data();
  const int32_t* __restrict i1 = t.i1.data();
  const float* __restrict w0 = t.w0.data();
  const float* __restrict w1 = t.w1.data();
  for (int64_t k = 0; k < oz; ++k) out[k] = w0[k] * row[i0[k]] + w1[k] * row[i1[k]];
}

#if PCRLV2_X86
__attribute__((target("avx2,fma"))) void z_resample_avx2(const float* __restrict row, const AxisTable& t, int64_t oz,
                                                         float* __restrict out) {
  int64_t k = 0;
  for (; k + 8 <= oz; k += 8) {
    const __m256 a = _mm256_i32gather_ps(row, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&t.i0[k])), 4);
    const __m256 b = _mm256_i32gather_ps(row, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&t.i1[k])), 4);
    const __m256 wb = _mm256_mul_ps(_mm256_loadu_ps(&t.w1[k]), b);
    _mm256_storeu_ps(out + k, _mm256_fmadd_ps(_mm256_loadu_ps(&t.w0[k]), a, wb));
  }
  for (; k < oz; ++k) out[k] = t.w0[k] * row[t.i0[k]] + t.w1[k] * row[t.i1[k]];
}

// A static initialiser may run before libgcc's CPU probe: initialise it explicitly first.
const bool kHasAvx2 = [] {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}();
#endif

inline void z_resample(const float* row, const AxisTable& t, int64_t oz, float* out) {
#if PCRLV2_X86
  if (kHasAvx2) {
    z_resample_avx2(row, t, oz, out);
    return;
  }
#endif
  z_resample_scalar(row, t, oz, out);
}

ZPlan z_plan(const AxisTable& t, int64_t oz) {
  ZPlan plan;
  const int64_t vectors = (oz + 15) / 16;
  int32_t widest = 0;
  for (int64_t v = 0; v < vectors; ++v) {
    const int32_t base = t.i0[16 * v];
    plan.base.push_back(base);
    for (int64_t lane = 0; lane < 16; ++lane) {
      const int64_t k = 16 * v + lane;
      const bool valid = k < oz;
      plan.idx0.push_back(valid ? t.i0[k] - base : 0);
      plan.idx1.push_back(valid ? t.i1[k] - base : 0);
      plan.w0.push_back(valid ? t.w0[k] : 0.f);
      plan.w1.push_back(valid ? t.w1[k] : 0.f);
      if (valid) widest = std::max(widest, t.i1[k] - base + 1);
    }
  }
  plan.regs = widest <= 32 ? 2 : (widest <= 64 ? 4 : 0);
  if (plan.regs == 0) plan = ZPlan{};
  return plan;
}

#if PCRLV2_X86
#define PCRLV2_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))

// z step with the plan: the row must be readable 32 * regs floats past each vector's base (the scratch
// buffers carry kRowPad floats of padding).
PCRLV2_AVX512 void z_resample_plan(const float* __restrict row, const ZPlan& plan, int64_t oz,
                                   float* __restrict out) {
  const int64_t vectors = static_cast<int64_t>(plan.base.size());
  const __m512i thirty_two = _mm512_set1_epi32(32);
  for (int64_t v = 0; v < vectors; ++v) {
    const float* p = row + plan.base[v];
    const __m512i i0 = _mm512_loadu_si512(plan.idx0.data() + 16 * v);
    const __m512i i1 = _mm512_loadu_si512(plan.idx1.data() + 16 * v);
    const __m512 r0 = _mm512_loadu_ps(p), r1 = _mm512_loadu_ps(p + 16);
    __m512 a = _mm512_permutex2var_ps(r0, i0, r1), b = _mm512_permutex2var_ps(r0, i1, r1);
    if (plan.regs == 4) {
      const __m512 r2 = _mm512_loadu_ps(p + 32), r3 = _mm512_loadu_ps(p + 48);
      a = _mm512_mask_mov_ps(a, _mm512_cmpge_epi32_mask(i0, thirty_two), _mm512_permutex2var_ps(r2, i0, r3));
      b = _mm512_mask_mov_ps(b, _mm512_cmpge_epi32_mask(i1, thirty_two), _mm512_permutex2var_ps(r2, i1, r3));
    }
    const __m512 value = _mm512_fmadd_ps(_mm512_loadu_ps(plan.w0.data() + 16 * v), a,
                                         _mm512_mul_ps(_mm512_loadu_ps(plan.w1.data() + 16 * v), b));
    const int64_t left = oz - 16 * v;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
    _mm512_mask_storeu_ps(out + 16 * v, m, value);
  }
}
#endif

// Padding (floats) after the crop's scratch rows: the permute z step reads up to 64 floats past a base.
constexpr int64_t kRowPad = 64;

inline void z_step(const float* row, const BoxTables& t, int64_t oz, float* out) {
#if PCRLV2_X86
  if (t.zplan.regs != 0) {
    z_resample_plan(row, t.zplan, oz, out);
    return;
  }
#endif
  z_resample(row, t.z, oz, out);
}

// One output x-slab (oy x oz) of one box. pa/pb: the box's two source x-planes (at the box's y0, z0) with
// weights wa/wb. Scratch: P (sy x sz), R (oy x sz), orow (oz), all per thread.
template <typename T, typename O>
PCRLV2_CLONES void resize_slab(const T* pa, const T* pb, float wa, float wb, const int64_t* vstride,
                               const BoxTables& t, int64_t sz, int64_t oy, int64_t oz, const Window& win,
                               float* P, float* R, float* orow, O* dst) {
  // 1. x: P[r] for every needed source row r.
  const int64_t n_rows = static_cast<int64_t>(t.rows.size());
  const int64_t row_bytes = ((sz - 1) * vstride[2] + 1) * static_cast<int64_t>(sizeof(T));
  const bool two_planes = wb != 0.f;
  for (int64_t k = 0; k < n_rows + kPrefetchRows; ++k) {
    if (k < n_rows) {
      prefetch_row(pa + t.rows[k] * vstride[1], row_bytes);
      if (two_planes) prefetch_row(pb + t.rows[k] * vstride[1], row_bytes);
    }
    if (k >= kPrefetchRows) {
      const int64_t r = t.rows[k - kPrefetchRows];
      blend_rows(pa + r * vstride[1], pb + r * vstride[1], vstride[2], sz, wa, wb, win, P + r * sz);
    }
  }
  // 2. y: every output row's blend of two rows of P into R (oy x sz), all rows before any z gather: a gather
  // that reads a row just stored waits for the stores to retire (store forwarding does not serve gathers).
  const float* rows_of[1024];
  const float** rowp = oy <= 1024 ? rows_of : nullptr;
  std::vector<const float*> spill;
  if (rowp == nullptr) {
    spill.resize(oy);
    rowp = spill.data();
  }
  for (int64_t j = 0; j < oy; ++j) {
    const float* __restrict ra = P + t.y.i0[j] * sz;
    const float* __restrict rb = P + t.y.i1[j] * sz;
    const float va = t.y.w0[j], vb = t.y.w1[j];
    if (vb == 0.f) {  // the output row sits on a source row
      rowp[j] = ra;
      continue;
    }
    float* __restrict r = R + j * sz;
    for (int64_t z = 0; z < sz; ++z) r[z] = va * ra[z] + vb * rb[z];
    rowp[j] = r;
  }
  // 3. z, one output row at a time (raw mode: then the window's linear map).
  const bool raw = std::is_same_v<T, int16_t> && win.raw && vstride[2] == 1;
  const float scale = win.scale, offset = win.offset;
  for (int64_t j = 0; j < oy; ++j) {
    O* __restrict d = dst + j * oz;
    if constexpr (std::is_same_v<O, float>) {
      z_step(rowp[j], t, oz, d);
      if (raw) {
        for (int64_t k = 0; k < oz; ++k) d[k] = d[k] * scale + offset;
      }
    } else {
      // bfloat16: round to nearest even, as torch's .to(torch.bfloat16) of the float32 result.
      z_step(rowp[j], t, oz, orow);
      if (raw) {
        for (int64_t k = 0; k < oz; ++k) orow[k] = orow[k] * scale + offset;
      }
      for (int64_t k = 0; k < oz; ++k) d[k] = static_cast<O>(orow[k]);
    }
  }
}

BoxTables box_tables(const int64_t* bx, int64_t ox, int64_t oy, int64_t oz) {
  BoxTables t;
  t.x = axis_table(bx[3], ox);
  t.y = axis_table(bx[4], oy);
  t.z = axis_table(bx[5], oz);
  std::vector<char> used(bx[4], 0);
  for (int64_t j = 0; j < oy; ++j) {
    used[t.y.i0[j]] = 1;
    if (t.y.w1[j] != 0.f) used[t.y.i1[j]] = 1;
  }
  for (int64_t r = 0; r < bx[4]; ++r) {
    if (used[r]) t.rows.push_back(r);
  }
  if (pcrlv2::use_wide_simd()) t.zplan = z_plan(t.z, oz);
  return t;
}

template <typename T, typename O>
void crop_resize_impl(const T* vol, const int64_t* vstride, const int64_t* boxes, int64_t n_boxes, O* out,
                      int64_t ox, int64_t oy, int64_t oz, double lo, double hi, int num_threads) {
  // Per-box tables first (cheap, serial), so the parallel loop only reads them.
  std::vector<BoxTables> tables(n_boxes);
  int64_t max_plane = 1, max_sz = 1;
  for (int64_t b = 0; b < n_boxes; ++b) {
    const int64_t* bx = boxes + 6 * b;
    tables[b] = box_tables(bx, ox, oy, oz);
    max_plane = std::max(max_plane, bx[4] * bx[5]);
    max_sz = std::max(max_sz, bx[5]);
  }
  const Window win = make_window(lo, hi, std::is_same_v<T, int16_t>);
  const int64_t n_slabs = n_boxes * ox;

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> plane(max_plane + kRowPad), row(max_sz * oy + kRowPad), orow(oz);
    // guided: big contiguous chunks first (neighbouring slabs share source planes), small ones at the end
    // to even out boxes of different sizes.
#pragma omp for schedule(guided)
    for (int64_t s = 0; s < n_slabs; ++s) {
      const int64_t b = s / ox, i = s % ox;
      const int64_t* bx = boxes + 6 * b;
      const BoxTables& t = tables[b];
      const T* base = vol + bx[0] * vstride[0] + bx[1] * vstride[1] + bx[2] * vstride[2];
      resize_slab(base + t.x.i0[i] * vstride[0], base + t.x.i1[i] * vstride[0], t.x.w0[i], t.x.w1[i], vstride, t,
                  bx[5], oy, oz, win, plane.data(), row.data(), orow.data(), out + s * oy * oz);
    }
  }
}

// One box on the calling thread (the fused view pipeline's crop).
template <typename T>
void crop_box(const T* vol, const int64_t* vstride, const int64_t* bx, float* out, int64_t ox, int64_t oy,
              int64_t oz, double lo, double hi, pcrlv2::CropScratch& scratch) {
  const BoxTables t = box_tables(bx, ox, oy, oz);
  const Window win = make_window(lo, hi, std::is_same_v<T, int16_t>);
  if (static_cast<int64_t>(scratch.plane.size()) < bx[4] * bx[5] + kRowPad) scratch.plane.resize(bx[4] * bx[5] + kRowPad);
  if (static_cast<int64_t>(scratch.rows.size()) < bx[5] * oy + kRowPad) scratch.rows.resize(bx[5] * oy + kRowPad);
  if (static_cast<int64_t>(scratch.orow.size()) < oz) scratch.orow.resize(oz);
  const T* base = vol + bx[0] * vstride[0] + bx[1] * vstride[1] + bx[2] * vstride[2];
  for (int64_t i = 0; i < ox; ++i) {
    resize_slab(base + t.x.i0[i] * vstride[0], base + t.x.i1[i] * vstride[0], t.x.w0[i], t.x.w1[i], vstride, t,
                bx[5], oy, oz, win, scratch.plane.data(), scratch.rows.data(), scratch.orow.data(),
                out + i * oy * oz);
  }
}

template <typename O>
void dispatch_input(const at::Tensor& volume, const int64_t* vstride, const int64_t* boxes, int64_t n, O* out,
                    int64_t ox, int64_t oy, int64_t oz, double lo, double hi, int threads) {
  switch (volume.scalar_type()) {
    case at::kShort:
      crop_resize_impl(volume.const_data_ptr<int16_t>(), vstride, boxes, n, out, ox, oy, oz, lo, hi, threads);
      break;
    case at::kHalf:
      crop_resize_impl(volume.const_data_ptr<c10::Half>(), vstride, boxes, n, out, ox, oy, oz, lo, hi, threads);
      break;
    case at::kFloat:
      crop_resize_impl(volume.const_data_ptr<float>(), vstride, boxes, n, out, ox, oy, oz, lo, hi, threads);
      break;
    default:
      TORCH_CHECK(false, "crop_resize: volume dtype must be int16, float16 or float32, got ", volume.scalar_type());
  }
}

// Writes the crops into `out` (N, 1, ox, oy, oz), contiguous float32 or bfloat16. Arguments are validated
// by the Python wrapper (pcrlv2_fast.data.native); the checks here only guard memory safety.
void crop_resize_out(const at::Tensor& volume, const at::Tensor& boxes, at::Tensor& out, double lo, double hi,
                     int64_t num_threads) {
  TORCH_CHECK(volume.dim() == 3 && volume.device().is_cpu(), "crop_resize: volume must be a 3D CPU tensor");
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 6 && boxes.scalar_type() == at::kLong && boxes.is_contiguous(),
              "crop_resize: boxes must be a contiguous int64 (N, 6) tensor");
  TORCH_CHECK(out.dim() == 5 && out.size(0) == boxes.size(0) && out.size(1) == 1 && out.is_contiguous(),
              "crop_resize: out must be a contiguous (N, 1, ox, oy, oz) tensor");
  TORCH_CHECK(hi > lo, "crop_resize: window hi must be greater than lo");
  const int64_t n = boxes.size(0), ox = out.size(2), oy = out.size(3), oz = out.size(4);
  const int64_t* bx = boxes.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < n; ++b) {
    for (int d = 0; d < 3; ++d) {
      TORCH_CHECK(bx[6 * b + d] >= 0 && bx[6 * b + 3 + d] >= 1 && bx[6 * b + d] + bx[6 * b + 3 + d] <= volume.size(d),
                  "crop_resize: box ", b, " lies outside the volume");
      TORCH_CHECK(bx[6 * b + 3 + d] <= INT32_MAX, "crop_resize: box ", b, " is too large");
    }
  }
  for (int d = 0; d < 3; ++d) TORCH_CHECK(volume.stride(d) >= 0, "crop_resize: negative volume strides");
  if (n == 0 || ox == 0 || oy == 0 || oz == 0) return;
  const int64_t vstride[3] = {volume.stride(0), volume.stride(1), volume.stride(2)};
  const int threads = static_cast<int>(std::max<int64_t>(1, num_threads));
  // The kernel touches no Python objects: let other Python threads (DataLoader workers) run meanwhile.
  pybind11::gil_scoped_release no_gil;
  if (out.scalar_type() == at::kFloat) {
    dispatch_input(volume, vstride, bx, n, out.mutable_data_ptr<float>(), ox, oy, oz, lo, hi, threads);
  } else {
    TORCH_CHECK(out.scalar_type() == at::kBFloat16, "crop_resize: out must be float32 or bfloat16");
    dispatch_input(volume, vstride, bx, n, out.mutable_data_ptr<c10::BFloat16>(), ox, oy, oz, lo, hi, threads);
  }
}

}  // namespace

namespace pcrlv2 {
void crop_resize_view(const at::Tensor& volume, const int64_t* box, double lo, double hi, int64_t ox, int64_t oy,
                      int64_t oz, float* out, CropScratch& scratch) {
  const int64_t vstride[3] = {volume.stride(0), volume.stride(1), volume.stride(2)};
  switch (volume.scalar_type()) {
    case at::kShort:
      crop_box(volume.const_data_ptr<int16_t>(), vstride, box, out, ox, oy, oz, lo, hi, scratch);
      break;
    case at::kHalf:
      crop_box(volume.const_data_ptr<c10::Half>(), vstride, box, out, ox, oy, oz, lo, hi, scratch);
      break;
    case at::kFloat:
      crop_box(volume.const_data_ptr<float>(), vstride, box, out, ox, oy, oz, lo, hi, scratch);
      break;
    default:
      TORCH_CHECK(false, "crop_resize: volume dtype must be int16, float16 or float32, got ", volume.scalar_type());
  }
}
}  // namespace pcrlv2

namespace pcrlv2 {
// csrc/affine.cpp
bool set_wide_simd(bool enabled);
bool has_wide_simd();
void affine_out(const at::Tensor& x, const at::Tensor& maps, const at::Tensor& flips, at::Tensor& out,
                int64_t num_threads);
// csrc/intensity.cpp
void normal_field_out(const at::Tensor& seeds, at::Tensor& out, int64_t num_threads);
void intensity_out(const at::Tensor& x, const at::Tensor& sigmas, const at::Tensor& noise_std,
                   const at::Tensor& noise_seed, const at::Tensor& gamma, const at::Tensor& swap,
                   std::vector<int64_t> patch, at::Tensor& out, int64_t num_threads);
// csrc/pipeline.cpp
void views_out(const std::vector<at::Tensor>& volumes, const at::Tensor& windows, const at::Tensor& volume_index,
               const at::Tensor& boxes, const at::Tensor& maps, const at::Tensor& flips, const at::Tensor& sigmas,
               const at::Tensor& noise_std, const at::Tensor& noise_seed, const at::Tensor& gamma,
               const at::Tensor& swap, std::vector<int64_t> patch, at::Tensor& spatial_out, at::Tensor& out,
               const at::Tensor& order, int64_t num_threads);
}  // namespace pcrlv2

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pcrlv2_fast native CPU kernels (OpenMP)";
  m.def("crop_resize_out", &crop_resize_out, "Cut, window and trilinearly resize boxes of a volume into out",
        pybind11::arg("volume"), pybind11::arg("boxes"), pybind11::arg("out"), pybind11::arg("lo"),
        pybind11::arg("hi"), pybind11::arg("num_threads"));
  m.def("set_wide_simd", &pcrlv2::set_wide_simd,
        "Allow (True) or forbid the AVX-512 code paths; returns the previous setting", pybind11::arg("enabled"));
  m.def("has_wide_simd", &pcrlv2::has_wide_simd, "Whether this CPU has the AVX-512 code paths");
  m.def("affine_out", &pcrlv2::affine_out, "Flip + affine resampling of a float32 batch into out (csrc/affine.cpp)",
        pybind11::arg("x"), pybind11::arg("maps"), pybind11::arg("flips"), pybind11::arg("out"), pybind11::arg("num_threads"));
  m.def("normal_field_out", &pcrlv2::normal_field_out,
        "Counter-based standard normal fields of int64 seeds into out (csrc/intensity.cpp)", pybind11::arg("seeds"),
        pybind11::arg("out"), pybind11::arg("num_threads"));
  m.def("views_out", &pcrlv2::views_out,
        "Crop + resize, flip + affine and the intensity chain of every view, fused per view (csrc/pipeline.cpp)",
        pybind11::arg("volumes"), pybind11::arg("windows"), pybind11::arg("volume_index"), pybind11::arg("boxes"),
        pybind11::arg("maps"), pybind11::arg("flips"), pybind11::arg("sigmas"), pybind11::arg("noise_std"),
        pybind11::arg("noise_seed"), pybind11::arg("gamma"), pybind11::arg("swap"), pybind11::arg("patch"),
        pybind11::arg("spatial_out"), pybind11::arg("out"), pybind11::arg("order"), pybind11::arg("num_threads"));
  m.def("intensity_out", &pcrlv2::intensity_out,
        "Fused blur, noise, gamma, patch swap and z-normalisation of a float32 batch (csrc/intensity.cpp)",
        pybind11::arg("x"), pybind11::arg("sigmas"), pybind11::arg("noise_std"), pybind11::arg("noise_seed"),
        pybind11::arg("gamma"), pybind11::arg("swap"), pybind11::arg("patch"), pybind11::arg("out"),
        pybind11::arg("num_threads"));
}

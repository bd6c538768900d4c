// What the CPU kernels of qgalore_fx (adam8bit_cpu.cpp, writeback_cpu.cpp) share: argument checks and the
// block absmax. Header-only; fastpath.NativeKernel rebuilds a kernel when this file changes.

#pragma once

#include <immintrin.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstring>

namespace qgalore_cpu {

// A contiguous CPU tensor of ``dtype`` with ``numel`` elements (any number where numel < 0), or an error naming it.
inline void check(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous(), name,
              " must be a contiguous CPU tensor of ", dtype, ", got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(numel < 0 || t.numel() == numel, name, " must have ", numel, " elements, got ", t.numel());
}

// max |values| over n (a multiple of 8) floats, as torch's amax of the magnitudes gives it (NaN propagates): the
// bit patterns of non-negative floats order as integers as the floats do, and every NaN's lies above +inf's.
inline float abs_max(const float* values, int64_t n) {
  const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i acc = _mm256_setzero_si256();
  for (int64_t j = 0; j < n; j += 8) {
    acc = _mm256_max_epi32(acc, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + j)),
                                                 magnitude));
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  int32_t best = lanes[0];
  for (int i = 1; i < 8; ++i) best = lanes[i] > best ? lanes[i] : best;
  float out;
  std::memcpy(&out, &best, sizeof out);
  return out;
}

}  // namespace qgalore_cpu

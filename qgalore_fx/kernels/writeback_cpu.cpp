// The INT8 write-back of qgalore_fx.kernels.writeback (``_new_weight`` then ``_requantize``) for CPU tensors, in
// AVX2: one pass over each block instead of two compiled kernels, and the stochastic-rounding noise
// (quant.sr_noise, a 32-bit integer hash) in 32-bit lanes where inductor computes it in 64-bit ones.
//
// Op for op and in the same order as the torch functions, so the codes and scales agree bit for bit
// (tests/test_writeback.py checks it). Per block b of ``block_size`` elements:
//
//     W = float(codes) * scales[b];  W = W * decay - delta * step        (delta: ΔW's rows, overwritten with W)
//     scale = min(max|W| / 127, MAX_SCALE);  v = W / (scale > 0 ? scale : 1)
//     q = round_half_even(v), or floor(v) + (u < v - floor(v)) with u = sr_noise(offset + element index)
//     where ok: codes = clamp(q, -127, 127), scales[b] = scale
//
// No fused multiply-adds (-ffp-contract=off, and none written): every product is rounded, as torch rounds it.
// Division is IEEE-exact in both; floor and round-half-even are exact.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include "cpu_kernels.h"

#include <cstdint>
#include <cstring>

namespace {

using qgalore_cpu::abs_max;
using qgalore_cpu::check;

constexpr uint32_t kMix32 = 0x45D9F3B;  // quant._MIX32

// quant._mix32 on 8 lanes of 32-bit values.
inline __m256i mix32(__m256i x) {
  const __m256i mix = _mm256_set1_epi32(static_cast<int32_t>(kMix32));
  x = _mm256_mullo_epi32(_mm256_xor_si256(x, _mm256_srli_epi32(x, 16)), mix);
  x = _mm256_mullo_epi32(_mm256_xor_si256(x, _mm256_srli_epi32(x, 16)), mix);
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

inline uint32_t mix32_scalar(uint32_t x) {
  x = (x ^ (x >> 16)) * kMix32;
  x = (x ^ (x >> 16)) * kMix32;
  return x ^ (x >> 16);
}

// quant.sr_noise for the 8 counters c, c + 1, ..., c + 7.
inline __m256 noise(int64_t c, uint32_t k0, uint32_t k1) {
  const __m256 unit = _mm256_set1_ps(1.0f / (1 << 24));
  const uint32_t low = static_cast<uint32_t>(c);
  if (low <= 0xFFFFFFFFu - 7u) {  // one high word for all 8
    const uint32_t hi = static_cast<uint32_t>(c >> 32) ^ k1;
    const __m256i lo = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(low)),
                                        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i x = mix32(_mm256_xor_si256(lo, _mm256_set1_epi32(static_cast<int32_t>(k0))));
    x = mix32(_mm256_xor_si256(x, _mm256_set1_epi32(static_cast<int32_t>(hi))));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(x, 8)), unit);
  }
  alignas(32) float u[8];
  for (int i = 0; i < 8; ++i) {
    const int64_t ci = c + i;
    uint32_t x = mix32_scalar(static_cast<uint32_t>(ci) ^ k0);
    x = mix32_scalar(x ^ (static_cast<uint32_t>(ci >> 32) ^ k1));
    u[i] = static_cast<float>(x >> 8) * (1.0f / (1 << 24));
  }
  return _mm256_load_ps(u);
}

struct Pass {
  int8_t* C; float* S; float* W;
  int64_t block_size; bool ok; bool stochastic;
  float decay, step, max_scale;
  uint32_t k0, k1; int64_t offset;
};

void run_blocks(const Pass s, int64_t first, int64_t last) {
  const int64_t bs = s.block_size;
  const __m256 decay = _mm256_set1_ps(s.decay), step = _mm256_set1_ps(s.step), qmax = _mm256_set1_ps(127.0f),
               qmin = _mm256_set1_ps(-127.0f), one = _mm256_set1_ps(1.0f);
  for (int64_t b = first; b < last; ++b) {
    const int64_t base = b * bs;
    float* w = s.W + base;
    int8_t* codes = s.C + base;
    const __m256 old_scale = _mm256_set1_ps(s.S[b]);
    for (int64_t j = 0; j < bs; j += 8) {
      const __m128i c8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + j));
      const __m256 x = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c8)), old_scale);
      _mm256_storeu_ps(w + j, _mm256_sub_ps(_mm256_mul_ps(x, decay), _mm256_mul_ps(_mm256_loadu_ps(w + j), step)));
    }
    if (!s.ok) continue;  // codes and scale stay as they were
    float scale = abs_max(w, bs) / 127.0f;
    scale = scale > s.max_scale ? s.max_scale : scale;  // torch.clamp(max=): NaN stays NaN
    const __m256 div = _mm256_set1_ps(scale > 0 ? scale : 1.0f);
    for (int64_t j = 0; j < bs; j += 8) {
      const __m256 v = _mm256_div_ps(_mm256_loadu_ps(w + j), div);
      __m256 q;
      if (s.stochastic) {
        q = _mm256_floor_ps(v);
        const __m256 up = _mm256_cmp_ps(noise(s.offset + base + j, s.k0, s.k1), _mm256_sub_ps(v, q), _CMP_LT_OQ);
        q = _mm256_add_ps(q, _mm256_and_ps(up, one));
      } else {
        q = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // half to even
      }
      q = _mm256_min_ps(_mm256_max_ps(q, qmin), qmax);
      const __m256i q32 = _mm256_cvttps_epi32(q);
      const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q32), _mm256_extracti128_si256(q32, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + j), _mm_packs_epi16(q16, q16));
    }
    s.S[b] = scale;
  }
}

}  // namespace

// codes int8 and delta fp32 [blocks, block_size] (block_size a multiple of 8), scales fp32 [blocks]; decay, step
// one fp32 each, max_scale quant.MAX_SCALE[8]; key int64 [k0, k1, offset] (quant.noise_key) or empty for
// nearest rounding; ok one bool. codes, scales and delta (the new fp32 weight) are written in place.
void writeback_blocks_(at::Tensor codes, at::Tensor scales, at::Tensor delta, const at::Tensor& decay,
                       const at::Tensor& step, double max_scale, const at::Tensor& key, const at::Tensor& ok) {
  TORCH_CHECK(codes.dim() == 2 && codes.size(1) % 8 == 0, "codes must be [blocks, block_size], block_size a multiple of 8");
  const int64_t blocks = codes.size(0), numel = codes.numel();
  check(codes, at::kChar, numel, "codes");
  check(delta, at::kFloat, numel, "delta");
  check(scales, at::kFloat, blocks, "scales");
  check(decay, at::kFloat, 1, "decay");
  check(step, at::kFloat, 1, "step");
  check(ok, at::kBool, 1, "ok");
  const bool stochastic = key.numel() > 0;
  if (stochastic) check(key, at::kLong, 3, "key");
  const int64_t* k = stochastic ? key.data_ptr<int64_t>() : nullptr;
  const Pass pass{codes.data_ptr<int8_t>(), scales.data_ptr<float>(), delta.data_ptr<float>(), codes.size(1),
                  *ok.data_ptr<bool>(), stochastic, *decay.data_ptr<float>(), *step.data_ptr<float>(),
                  static_cast<float>(max_scale), stochastic ? static_cast<uint32_t>(k[0]) : 0u,
                  stochastic ? static_cast<uint32_t>(k[1]) : 0u, stochastic ? k[2] : 0};
  // blocks are independent: any split over threads gives the same bits
  at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / codes.size(1)),
                   [pass](int64_t first, int64_t last) { run_blocks(pass, first, last); });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("writeback_blocks_", &writeback_blocks_, "the INT8 write-back over whole blocks (in place)");
}

// The fused 8-bit Adam step of qgalore_fx.kernels.adam8bit (``_fused_moments``) for CPU tensors, in AVX2.
//
// It computes what the torch.compile'd ``_fused_moments`` computes, op for op and in the same order, so the two
// agree bit for bit (tests/test_adam8bit.py checks it). It exists because inductor (torch 2.13) turns that
// function's eight table lookups per element into scalar loads around its vector code, where the hardware gathers
// below load eight at once (BENCHMARKS.md, "the 8-bit Adam step in C++", has the measured step).
//
// Per block b of ``block_size`` elements, with g = ok ? grad : 0:
//
//     m = qmap_m[m_codes] * absmax_m[b];  m = m * b1 + g * (1 - b1)
//     v = qmap_v[v_codes] * absmax_v[b];  v = v * b2 + g * (1 - b2) * g
//     n = ok ? (m / c1) / (sqrt(v) / c2 + eps) : 0       (written to ``n``, or applied: p = p * decay - n * lr)
//     where ok: absmax_m[b] = max|m|, absmax_v[b] = max|v|; m_codes = the nearest code of m / max|m| (compact
//     lookup table + midpoint); v_codes = the code of v / max|v| rounded stochastically between its two neighbours
//     in the map (the draw a hash of the element's index and the step); a positive v never takes the zero code.
//
// No fused multiply-adds (-ffp-contract=off, and none written): every product is rounded, as the compiled code
// rounds it. Division and square root are IEEE-exact in both.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include "cpu_kernels.h"

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using qgalore_cpu::abs_max;
using qgalore_cpu::check;

constexpr int kCompactExp0 = 103;  // adam8bit._COMPACT_EXP0
constexpr int kCompactExps = 25;   // adam8bit._COMPACT_EXPS
constexpr int kLutShift = 14;      // adam8bit._LUT_SHIFT
constexpr int kMantBits = 23 - kLutShift;
constexpr uint32_t kMix32 = 0x45D9F3B;  // quant._MIX32 (adam8bit._uniform's mix)

// adam8bit._fused_codes for 8 values x in [-1, 1]: the nearest code (int32).
inline __m256i nearest_codes(__m256 x, const int32_t* lut, const float* mid) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256i e = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(0xFF)),
                               _mm256_set1_epi32(kCompactExp0));
  e = _mm256_min_epi32(_mm256_max_epi32(e, _mm256_setzero_si256()), _mm256_set1_epi32(kCompactExps - 1));
  const __m256i row = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_srli_epi32(bits, 31), _mm256_set1_epi32(kCompactExps)), e);
  const __m256i cell = _mm256_or_si256(_mm256_slli_epi32(row, kMantBits),
                                       _mm256_and_si256(_mm256_srli_epi32(bits, kLutShift),
                                                        _mm256_set1_epi32((1 << kMantBits) - 1)));
  const __m256i g = _mm256_i32gather_epi32(lut, cell, 4);
  const __m256 above = _mm256_cmp_ps(x, _mm256_i32gather_ps(mid, g, 4), _CMP_GT_OQ);
  return _mm256_sub_epi32(g, _mm256_castps_si256(above));  // true is -1
}

// adam8bit._uniform for the 8 element indices ``index`` (its int64 products keep only their low 32 bits, which is
// what 32-bit products are).
inline __m256 uniform(__m256i index, __m256i salt0, __m256i salt1) {
  const __m256i mix = _mm256_set1_epi32(static_cast<int32_t>(kMix32));
  __m256i x = _mm256_add_epi32(index, salt0);
  x = _mm256_mullo_epi32(_mm256_xor_si256(x, _mm256_srli_epi32(x, 16)), mix);
  x = _mm256_mullo_epi32(_mm256_xor_si256(x, _mm256_srli_epi32(x, 16)), mix);
  x = _mm256_add_epi32(_mm256_xor_si256(x, _mm256_srli_epi32(x, 16)), salt1);
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(x, 8)), _mm256_set1_ps(1.0f / (1 << 24)));
}

inline __m256i load_codes(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

inline void store_codes(uint8_t* p, __m256i codes) {  // codes in [0, 255]
  const __m128i lo = _mm256_castsi256_si128(codes), hi = _mm256_extracti128_si256(codes, 1);
  const __m128i words = _mm_packus_epi32(lo, hi);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(words, words));
}

// Everything one thread needs, by value.
struct Step {
  const float* G; float* P; float* N; uint8_t* MC; uint8_t* VC; float* AM; float* AV;
  const float* QM; const float* QV; const int32_t* LM; const int32_t* LV; const float* MM; const float* MV;
  int64_t block_size; bool ok; bool adamw;
  float b1, omb1, b2, omb2, inv_c1, c2, eps, lr, decay;
  int64_t salt0, salt1;
};

void run_blocks(const Step s, int64_t first, int64_t last) {
  const int64_t bs = s.block_size;
  std::vector<float> m_buf(bs), v_buf(bs);
  float* ms = m_buf.data();
  float* vs = v_buf.data();
  const __m256 b1 = _mm256_set1_ps(s.b1), omb1 = _mm256_set1_ps(s.omb1), b2 = _mm256_set1_ps(s.b2),
               omb2 = _mm256_set1_ps(s.omb2), inv_c1 = _mm256_set1_ps(s.inv_c1), c2 = _mm256_set1_ps(s.c2),
               eps = _mm256_set1_ps(s.eps), lr = _mm256_set1_ps(s.lr), decay = _mm256_set1_ps(s.decay),
               zero = _mm256_setzero_ps();
  const __m256i salt0 = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(s.salt0))),
                salt1 = _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(s.salt1))),
                lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), one = _mm256_set1_epi32(1);
  for (int64_t b = first; b < last; ++b) {
    const int64_t base = b * bs;
    const __m256 am = _mm256_set1_ps(s.AM[b]), av = _mm256_set1_ps(s.AV[b]);
    for (int64_t j = 0; j < bs; j += 8) {
      const __m256 g = s.ok ? _mm256_loadu_ps(s.G + base + j) : zero;
      __m256 m = _mm256_mul_ps(_mm256_i32gather_ps(s.QM, load_codes(s.MC + base + j), 4), am);
      __m256 v = _mm256_mul_ps(_mm256_i32gather_ps(s.QV, load_codes(s.VC + base + j), 4), av);
      m = _mm256_add_ps(_mm256_mul_ps(m, b1), _mm256_mul_ps(g, omb1));
      v = _mm256_add_ps(_mm256_mul_ps(v, b2), _mm256_mul_ps(_mm256_mul_ps(g, omb2), g));
      _mm256_storeu_ps(ms + j, m);
      _mm256_storeu_ps(vs + j, v);
      const __m256 dir = s.ok ? _mm256_div_ps(_mm256_mul_ps(m, inv_c1),
                                              _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), c2), eps))
                              : zero;
      if (s.adamw) {
        float* p = s.P + base + j;
        _mm256_storeu_ps(p, _mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(p), decay), _mm256_mul_ps(dir, lr)));
      } else {
        _mm256_storeu_ps(s.N + base + j, dir);
      }
    }
    if (!s.ok) continue;  // codes and absmax stay as they were
    const float new_am = abs_max(ms, bs), new_av = abs_max(vs, bs);
    const __m256 div_m = _mm256_set1_ps(new_am > 0 ? new_am : 1.0f), div_v = _mm256_set1_ps(new_av > 0 ? new_av : 1.0f);
    for (int64_t j = 0; j < bs; j += 8) {
      store_codes(s.MC + base + j, nearest_codes(_mm256_div_ps(_mm256_loadu_ps(ms + j), div_m), s.LM, s.MM));
      const __m256 v = _mm256_loadu_ps(vs + j);
      const __m256 x = _mm256_div_ps(v, div_v);
      const __m256i nearest = nearest_codes(x, s.LV, s.MV);
      const __m256 above = _mm256_cmp_ps(_mm256_i32gather_ps(s.QV, nearest, 4), x, _CMP_GT_OQ);
      __m256i lo = _mm256_add_epi32(nearest, _mm256_castps_si256(above));  // true is -1
      lo = _mm256_min_epi32(_mm256_max_epi32(lo, _mm256_setzero_si256()), _mm256_set1_epi32(254));
      const __m256 q_lo = _mm256_i32gather_ps(s.QV, lo, 4);
      const __m256 q_hi = _mm256_i32gather_ps(s.QV, _mm256_add_epi32(lo, one), 4);
      const __m256i index = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(base + j)), lane);
      const __m256 up = _mm256_cmp_ps(uniform(index, salt0, salt1),
                                      _mm256_div_ps(_mm256_sub_ps(x, q_lo), _mm256_sub_ps(q_hi, q_lo)), _CMP_LT_OQ);
      __m256i code = _mm256_sub_epi32(lo, _mm256_castps_si256(up));
      // adam8bit._floor_positive_codes: a positive v never takes the zero code
      const __m256i floor = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(v, zero, _CMP_GT_OQ)),
                                             _mm256_cmpeq_epi32(code, _mm256_setzero_si256()));
      code = _mm256_sub_epi32(code, floor);  // 0 -> 1 where floored
      store_codes(s.VC + base + j, code);
    }
    s.AM[b] = new_am;
    s.AV[b] = new_av;
  }
}

}  // namespace

// ``p`` (AdamW) or ``n`` (the direction) is written, the other one is empty; grad, p, n, m_codes, v_codes are
// [blocks, block_size] (block_size a multiple of 8), absmax_m / absmax_v [blocks]; ok one bool, coef the 7 fp32
// coefficients of adam8bit._fused_coefficients, lr / decay one fp32 each (AdamW only), salt int64 [offset, step salt].
void adam8bit_blocks_(at::Tensor p, at::Tensor n, const at::Tensor& grad, at::Tensor m_codes, at::Tensor v_codes,
                      at::Tensor absmax_m, at::Tensor absmax_v, const at::Tensor& ok, const at::Tensor& coef,
                      const at::Tensor& lr, const at::Tensor& decay, const at::Tensor& qmap_m,
                      const at::Tensor& lut_m, const at::Tensor& mid_m, const at::Tensor& qmap_v,
                      const at::Tensor& lut_v, const at::Tensor& mid_v, const at::Tensor& salt) {
  TORCH_CHECK(grad.dim() == 2 && grad.size(1) % 8 == 0, "grad must be [blocks, block_size], block_size a multiple of 8");
  const int64_t blocks = grad.size(0), numel = grad.numel();
  const bool adamw = p.numel() > 0;
  check(grad, at::kFloat, numel, "grad");
  check(adamw ? p : n, at::kFloat, numel, adamw ? "p" : "n");
  check(m_codes, at::kByte, numel, "m_codes");
  check(v_codes, at::kByte, numel, "v_codes");
  check(absmax_m, at::kFloat, blocks, "absmax_m");
  check(absmax_v, at::kFloat, blocks, "absmax_v");
  check(ok, at::kBool, 1, "ok");
  check(coef, at::kFloat, 7, "coef");
  for (const auto* t : {&qmap_m, &qmap_v, &mid_m, &mid_v}) check(*t, at::kFloat, 256, "a map");
  check(lut_m, at::kInt, (2 * kCompactExps) << kMantBits, "lut_m");
  check(lut_v, at::kInt, (2 * kCompactExps) << kMantBits, "lut_v");
  check(salt, at::kLong, 2, "salt");
  if (adamw) {
    check(lr, at::kFloat, 1, "lr");
    check(decay, at::kFloat, 1, "decay");
  }
  const float* c = coef.data_ptr<float>();
  const Step step{grad.data_ptr<float>(), adamw ? p.data_ptr<float>() : nullptr, adamw ? nullptr : n.data_ptr<float>(),
                  m_codes.data_ptr<uint8_t>(), v_codes.data_ptr<uint8_t>(), absmax_m.data_ptr<float>(),
                  absmax_v.data_ptr<float>(), qmap_m.data_ptr<float>(), qmap_v.data_ptr<float>(),
                  lut_m.data_ptr<int32_t>(), lut_v.data_ptr<int32_t>(), mid_m.data_ptr<float>(), mid_v.data_ptr<float>(),
                  grad.size(1), *ok.data_ptr<bool>(), adamw, c[0], c[1], c[2], c[3], c[4], c[5], c[6],
                  adamw ? *lr.data_ptr<float>() : 0.0f, adamw ? *decay.data_ptr<float>() : 1.0f,
                  salt.data_ptr<int64_t>()[0], salt.data_ptr<int64_t>()[1]};
  // blocks are independent: any split over threads gives the same bits
  at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / grad.size(1)),
                   [step](int64_t first, int64_t last) { run_blocks(step, first, last); });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adam8bit_blocks_", &adam8bit_blocks_, "the fused 8-bit Adam / AdamW step over whole blocks (in place)");
}

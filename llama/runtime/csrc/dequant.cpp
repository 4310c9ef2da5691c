// Stored int4 rows dequantized into the compute dtype for a prefill's block product
// (llama/weights/quant_blocks.py), in one pass: the same operations and roundings as its PyTorch
// form int4_into, w = (v - 8) * s + z, each step rounded to the output dtype (bfloat16: the product,
// then the sum, each to nearest even, as PyTorch's bfloat16 arithmetic rounds; float32: the product
// is exact, the sum rounded), so both give the same weights bit for bit. That form reads and writes
// the block five times over (unpack, widen, subtract, scale, shift); this reads 5 bits a weight once.
#include <vector>

#include "common.h"

namespace {

// Rows [r0, r1) of q (N, K / 2) uint8 with scales, zeros (N, K / group) bfloat16 into out (N, K).
template <bool BF16>
void rows_generic(const uint8_t* q, const uint16_t* sc, const uint16_t* ze, int64_t K, int64_t group, void* out,
                  int64_t r0, int64_t r1) {
  const int64_t G = K / group, half = group / 2;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const float s = bf16_to_float(sc[r * G + g]), z = bf16_to_float(ze[r * G + g]);
      const uint8_t* b = q + r * K / 2 + g * half;
      const int64_t at = r * K + g * group;
      for (int64_t j = 0; j < half; ++j) {
        const float lo = static_cast<float>((b[j] & 15) - 8) * s, hi = static_cast<float>((b[j] >> 4) - 8) * s;
        if constexpr (BF16) {
          uint16_t* o = static_cast<uint16_t*>(out) + at;
          o[2 * j] = float_to_bf16(bf16_to_float(float_to_bf16(lo)) + z);
          o[2 * j + 1] = float_to_bf16(bf16_to_float(float_to_bf16(hi)) + z);
        } else {
          float* o = static_cast<float*>(out) + at;
          o[2 * j] = lo + z, o[2 * j + 1] = hi + z;
        }
      }
    }
}

// The vector form takes a group's 16 bytes at a time, their nibbles interleaved back into column
// order (low nibble first) as 32 bytes; the float32 -> bfloat16 rounding is float_to_bf16's, lane-wise.
// (An AVX-512 form wrote its bfloat16 results about a fifth faster; the block's product, which
// follows, takes over ten times as long, so one vector form serves both.)
__attribute__((target("avx2,fma"))) inline __m256i round_bf16_256(__m256 f) {
  const __m256i bits = _mm256_castps_si256(f);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  // NaN: |bits| > 0x7f800000 as signed int32 (|bits| < 2^31)
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
}

template <bool BF16>
__attribute__((target("avx2,fma"))) void rows_avx2(const uint8_t* q, const uint16_t* sc, const uint16_t* ze, int64_t K,
                                                   int64_t group, void* out, int64_t r0, int64_t r1) {
  const int64_t G = K / group;
  const __m128i low = _mm_set1_epi8(15);
  const __m256 eight = _mm256_set1_ps(8.f);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const __m256 s = _mm256_set1_ps(bf16_to_float(sc[r * G + g])), z = _mm256_set1_ps(bf16_to_float(ze[r * G + g]));
      for (int64_t c = 0; c < group; c += 32) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (r * K + g * group + c) / 2));
        const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
        const __m128i v[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};
        for (int h = 0; h < 4; ++h) {  // 8 columns at a time
          const int64_t at = r * K + g * group + c + 8 * h;
          const __m128i bytes = h & 1 ? _mm_srli_si128(v[h / 2], 8) : v[h / 2];
          const __m256 p = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), eight), s);
          if constexpr (BF16) {
            const __m256 t = _mm256_castsi256_ps(_mm256_slli_epi32(round_bf16_256(p), 16));
            const __m256i w = round_bf16_256(_mm256_add_ps(t, z));  // 8 int32 lanes holding 16-bit values
            const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + at), packed);
          } else {
            _mm256_storeu_ps(static_cast<float*>(out) + at, _mm256_add_ps(p, z));
          }
        }
      }
    }
}

}  // namespace

namespace llama_dequant {

// out (N, K) float32 or bfloat16 = the stored int4 weight (q, scales, zeros) of N rows, threads over rows.
void int4_into(int64_t q, int64_t scales, int64_t zeros, int64_t N, int64_t K, int64_t group, int64_t out, bool bf16,
               int64_t isa) {
  const int which = group % 32 ? GENERIC : resolve(isa, 16);  // the vector form takes 32 columns a step
  const uint8_t* qp = ptr<const uint8_t>(q);
  const uint16_t *sp = ptr<const uint16_t>(scales), *zp = ptr<const uint16_t>(zeros);
  void* op = ptr<void>(out);
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    if (which >= AVX2) bf16 ? rows_avx2<true>(qp, sp, zp, K, group, op, r0, r1) : rows_avx2<false>(qp, sp, zp, K, group, op, r0, r1);
    else bf16 ? rows_generic<true>(qp, sp, zp, K, group, op, r0, r1) : rows_generic<false>(qp, sp, zp, K, group, op, r0, r1);
  });
}

}  // namespace llama_dequant

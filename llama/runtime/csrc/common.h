// What the products of gemv.cpp (float32 activations) and q8.cpp (int8 activations) share: the
// instruction sets and their detection, bfloat16 reading and rounding, the int4 groups' scale and zero-point
// preparation, and the split of the output columns among threads.
#pragma once
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace {

// AVX512: F + BW; VNNI: those and AVX-512 VNNI (only the int8-activation kernels use it); BF16: those
// and AVX-512 BF16 (only the bfloat16 product with bfloat16 activations uses it, bf16.cpp)
enum Isa { AUTO = 0, GENERIC = 1, AVX2 = 2, AVX512 = 3, VNNI = 4, BF16 = 5 };
constexpr int64_t MAX_ROWS = 4;  // activation rows per pass over the weights
constexpr int64_t NB = 4;        // weight rows per inner step (independent accumulators)

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as PyTorch's bfloat16 conversion
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

int best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
    if (!__builtin_cpu_supports("avx512vnni")) return AVX512;
    return __builtin_cpu_supports("avx512bf16") ? BF16 : VNNI;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
  return GENERIC;
}

// ------------------------------------------------------------------ AVX2 + FMA helpers

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Each weight row's group scales as float32 into `sbuf` (G,), and the part of its product that the
// zero points and the -8 offset make, sum over groups of (zeros - 8 scales) * (the group's sum of x),
// into corr[r]: the inner loop then only multiplies the 4-bit values.
__attribute__((target("avx2,fma"))) void int4_prep_avx2(const uint16_t* sc, const uint16_t* ze, const float* xs,
                                                        int64_t R, int64_t G, float* sbuf, float* corr) {
  __m256 cv[MAX_ROWS];
  for (int64_t r = 0; r < R; ++r) cv[r] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    __m256 sv = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g))), 16));
    __m256 zv = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ze + g))), 16));
    _mm256_storeu_ps(sbuf + g, sv);
    __m256 zc = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), sv, zv);
    for (int64_t r = 0; r < R; ++r) cv[r] = _mm256_fmadd_ps(zc, _mm256_loadu_ps(xs + r * G + g), cv[r]);
  }
  for (int64_t r = 0; r < R; ++r) corr[r] = hsum256(cv[r]);
  for (; g < G; ++g) {
    float s = bf16_to_float(sc[g]), z = bf16_to_float(ze[g]);
    sbuf[g] = s;
    for (int64_t r = 0; r < R; ++r) corr[r] += (z - 8.f * s) * xs[r * G + g];
  }
}

// ------------------------------------------------------------------ AVX-512 helpers

__attribute__((target("avx512f,avx512bw"))) void int4_prep_avx512(const uint16_t* sc, const uint16_t* ze,
                                                                  const float* xs, int64_t R, int64_t G, float* sbuf,
                                                                  float* corr) {
  __m512 cv[MAX_ROWS];
  for (int64_t r = 0; r < R; ++r) cv[r] = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 16 <= G; g += 16) {
    __m512 sv = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + g))), 16));
    __m512 zv = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ze + g))), 16));
    _mm512_storeu_ps(sbuf + g, sv);
    __m512 zc = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), sv, zv);
    for (int64_t r = 0; r < R; ++r) cv[r] = _mm512_fmadd_ps(zc, _mm512_loadu_ps(xs + r * G + g), cv[r]);
  }
  for (int64_t r = 0; r < R; ++r) corr[r] = _mm512_reduce_add_ps(cv[r]);
  for (; g < G; ++g) {
    float s = bf16_to_float(sc[g]), z = bf16_to_float(ze[g]);
    sbuf[g] = s;
    for (int64_t r = 0; r < R; ++r) corr[r] += (z - 8.f * s) * xs[r * G + g];
  }
}

// ------------------------------------------------------------------ dispatch

// The instruction set a product runs at: `isa` (AUTO: the best the CPU has, at most `widest`, the
// widest the product has code for), narrowed where `width` is not a multiple of its vectors.
int resolve(int64_t isa, int64_t width, int widest = AVX512) {
  int chosen = isa == AUTO ? best_isa() : static_cast<int>(isa);
  if (chosen > best_isa()) throw std::invalid_argument("this CPU lacks the instruction set asked for");
  chosen = std::min(chosen, widest);
  if (chosen == AVX512 && width % 16) chosen = AVX2;
  if (chosen == AVX2 && width % 8) chosen = GENERIC;
  return chosen;
}

// Runs body(first row, rows, n0, n1) over chunks of MAX_ROWS rows, the weight rows split among threads.
template <typename F>
void over_rows_and_columns(int64_t rows, int64_t N, const F& body) {
  for (int64_t r0 = 0; r0 < rows; r0 += MAX_ROWS) {
    int64_t R = std::min(MAX_ROWS, rows - r0);
    at::parallel_for(0, (N + NB - 1) / NB, 16, [&](int64_t b0, int64_t b1) {
      body(r0, R, b0 * NB, std::min(N, b1 * NB));
    });
  }
}

#define BY_ROWS(fn, R, ...)                    \
  switch (R) {                                 \
    case 1: fn<1>(__VA_ARGS__); break;         \
    case 2: fn<2>(__VA_ARGS__); break;         \
    case 3: fn<3>(__VA_ARGS__); break;         \
    default: fn<4>(__VA_ARGS__); break;        \
  }

template <typename T>
T* ptr(int64_t address) { return reinterpret_cast<T*>(static_cast<uintptr_t>(address)); }

}  // namespace

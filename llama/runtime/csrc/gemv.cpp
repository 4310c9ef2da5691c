// Products of a few float32 activation rows with int8 or int4 weights (bfloat16 ones: bf16.cpp), reading each weight
// byte once per call (the weights of a decode step stream from memory, so the bytes read, not the
// arithmetic, bound them). Built on first use by llama/runtime/native.py; the instruction set is
// chosen at run time from what the CPU has (AVX-512, AVX2 + FMA, or plain C++), and can be forced.
//
// Weights are in the forms llama/weights/quant_formats.py stores:
//   int8: q (N, K) int8, scales (N,) float32:          W[n, k] = q[n, k] * scales[n]
//   int4: q (N, K / 2) uint8, column 2j in the low nibble of byte j and 2j + 1 in the high one;
//         scales, zeros (N, K / group) bfloat16:    W[n, k] = (v - 8) * scales[n, k / group] + zeros[n, k / group]
// out (rows, N) float32 = x (rows, K) float32 @ W^T. Threads split the output columns (weight rows).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <vector>

#include "common.h"

namespace {

// ------------------------------------------------------------------ plain C++ (any CPU)

void int8_generic(const float* x, int64_t R, int64_t K, const int8_t* q, const float* s, float* out, int64_t N,
                  int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t r = 0; r < R; ++r) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += x[r * K + k] * static_cast<float>(q[n * K + k]);
      out[r * N + n] = acc * s[n];
    }
}

// xe, xo: (R, K / 2) the even and odd columns of x; xs: (R, G) each group's sum of x
void int4_generic(const float* xe, const float* xo, const float* xs, int64_t R, int64_t K, const uint8_t* q,
                  const uint16_t* sc, const uint16_t* ze, int64_t group, float* out, int64_t N, int64_t n0,
                  int64_t n1) {
  const int64_t half = K / 2, G = K / group, gb = group / 2;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t r = 0; r < R; ++r) {
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        float dot = 0.f;
        for (int64_t j = g * gb; j < (g + 1) * gb; ++j) {
          uint8_t b = q[n * half + j];
          dot += static_cast<float>(b & 15) * xe[r * half + j] + static_cast<float>(b >> 4) * xo[r * half + j];
        }
        float s = bf16_to_float(sc[n * G + g]), z = bf16_to_float(ze[n * G + g]);
        acc += s * dot + (z - 8.f * s) * xs[r * G + g];  // sum (v - 8) s x + z x
      }
      out[r * N + n] = acc;
    }
}

// ------------------------------------------------------------------ AVX2 + FMA

template <int R>
__attribute__((target("avx2,fma"))) void int8_avx2(const float* x, int64_t K, const int8_t* q, const float* s,
                                                   float* out, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    __m256 acc[NB][R];
    for (int i = 0; i < NB; ++i)
      for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
      __m256 xv[R];
      for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(x + r * K + k);
      for (int i = 0; i < NB; ++i) {
        __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + (n + i) * K + k));
        __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        for (int r = 0; r < R; ++r) acc[i][r] = _mm256_fmadd_ps(w, xv[r], acc[i][r]);
      }
    }
    for (int i = 0; i < NB; ++i)
      for (int r = 0; r < R; ++r) out[r * N + n + i] = hsum256(acc[i][r]) * s[n + i];
  }
  if (n < n1) int8_generic(x, R, K, q, s, out, N, n, n1);
}

template <int R>
__attribute__((target("avx2,fma"))) void int4_avx2(const float* xe, const float* xo, const float* xs, int64_t K,
                                                   const uint8_t* q, const uint16_t* sc, const uint16_t* ze,
                                                   int64_t group, float* out, int64_t N, int64_t n0, int64_t n1) {
  const int64_t half = K / 2, G = K / group, gb = group / 2;
  const __m256i low = _mm256_set1_epi32(15);
  std::vector<float> sbuf(NB * G);
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    __m256 acc[NB][R];
    float corr[NB][MAX_ROWS];
    for (int i = 0; i < NB; ++i) {
      int4_prep_avx2(sc + (n + i) * G, ze + (n + i) * G, xs, R, G, sbuf.data() + i * G, corr[i]);
      for (int r = 0; r < R; ++r) acc[i][r] = _mm256_setzero_ps();
    }
    for (int64_t g = 0; g < G; ++g) {
      __m256 dot[NB][R];
      for (int64_t j = g * gb; j < (g + 1) * gb; j += 8) {
        __m256 ev[R], ov[R];
        for (int r = 0; r < R; ++r) {
          ev[r] = _mm256_loadu_ps(xe + r * half + j);
          ov[r] = _mm256_loadu_ps(xo + r * half + j);
        }
        for (int i = 0; i < NB; ++i) {
          __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + (n + i) * half + j)));
          __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, low));
          __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
          for (int r = 0; r < R; ++r)
            dot[i][r] = _mm256_fmadd_ps(hi, ov[r], j == g * gb ? _mm256_mul_ps(lo, ev[r]) : _mm256_fmadd_ps(lo, ev[r], dot[i][r]));
        }
      }
      for (int i = 0; i < NB; ++i) {
        __m256 sv = _mm256_broadcast_ss(sbuf.data() + i * G + g);
        for (int r = 0; r < R; ++r) acc[i][r] = _mm256_fmadd_ps(dot[i][r], sv, acc[i][r]);
      }
    }
    for (int i = 0; i < NB; ++i)
      for (int r = 0; r < R; ++r) out[r * N + n + i] = hsum256(acc[i][r]) + corr[i][r];
  }
  if (n < n1) int4_generic(xe, xo, xs, R, K, q, sc, ze, group, out, N, n, n1);
}

// ------------------------------------------------------------------ AVX-512

template <int R>
__attribute__((target("avx512f,avx512bw"))) void int8_avx512(const float* x, int64_t K, const int8_t* q,
                                                             const float* s, float* out, int64_t N, int64_t n0,
                                                             int64_t n1) {
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    __m512 acc[NB][R];
    for (int i = 0; i < NB; ++i)
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      __m512 xv[R];
      for (int r = 0; r < R; ++r) xv[r] = _mm512_loadu_ps(x + r * K + k);
      for (int i = 0; i < NB; ++i) {
        __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (n + i) * K + k));
        __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
        for (int r = 0; r < R; ++r) acc[i][r] = _mm512_fmadd_ps(w, xv[r], acc[i][r]);
      }
    }
    for (int i = 0; i < NB; ++i)
      for (int r = 0; r < R; ++r) out[r * N + n + i] = _mm512_reduce_add_ps(acc[i][r]) * s[n + i];
  }
  if (n < n1) int8_generic(x, R, K, q, s, out, N, n, n1);
}

template <int R>
__attribute__((target("avx512f,avx512bw"))) void int4_avx512(const float* xe, const float* xo, const float* xs,
                                                             int64_t K, const uint8_t* q, const uint16_t* sc,
                                                             const uint16_t* ze, int64_t group, float* out, int64_t N,
                                                             int64_t n0, int64_t n1) {
  const int64_t half = K / 2, G = K / group, gb = group / 2;
  const __m512i low = _mm512_set1_epi32(15);
  std::vector<float> sbuf(NB * G);
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    __m512 acc[NB][R];
    float corr[NB][MAX_ROWS];
    for (int i = 0; i < NB; ++i) {
      int4_prep_avx512(sc + (n + i) * G, ze + (n + i) * G, xs, R, G, sbuf.data() + i * G, corr[i]);
      for (int r = 0; r < R; ++r) acc[i][r] = _mm512_setzero_ps();
    }
    for (int64_t g = 0; g < G; ++g) {
      __m512 dot[NB][R];
      for (int64_t j = g * gb; j < (g + 1) * gb; j += 16) {
        __m512 ev[R], ov[R];
        for (int r = 0; r < R; ++r) {
          ev[r] = _mm512_loadu_ps(xe + r * half + j);
          ov[r] = _mm512_loadu_ps(xo + r * half + j);
        }
        for (int i = 0; i < NB; ++i) {
          __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (n + i) * half + j)));
          __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, low));
          __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
          for (int r = 0; r < R; ++r)
            dot[i][r] = _mm512_fmadd_ps(hi, ov[r], j == g * gb ? _mm512_mul_ps(lo, ev[r]) : _mm512_fmadd_ps(lo, ev[r], dot[i][r]));
        }
      }
      for (int i = 0; i < NB; ++i) {
        __m512 sv = _mm512_set1_ps(sbuf[i * G + g]);
        for (int r = 0; r < R; ++r) acc[i][r] = _mm512_fmadd_ps(dot[i][r], sv, acc[i][r]);
      }
    }
    for (int i = 0; i < NB; ++i)
      for (int r = 0; r < R; ++r) out[r * N + n + i] = _mm512_reduce_add_ps(acc[i][r]) + corr[i][r];
  }
  if (n < n1) int4_generic(xe, xo, xs, R, K, q, sc, ze, group, out, N, n, n1);
}

// ------------------------------------------------------------------ dispatch

// The entry points take the addresses of contiguous tensors whose dtypes and shapes the caller
// (llama/runtime/native.py) has checked: without ATen's tensor headers the build takes seconds.
void int8_mm(int64_t x, int64_t rows, int64_t K, int64_t q, int64_t scales, int64_t out, int64_t N, int64_t isa) {
  const int which = resolve(isa, K);
  const float* xp = ptr<const float>(x);
  const int8_t* qp = ptr<const int8_t>(q);
  const float* sp = ptr<const float>(scales);
  float* op = ptr<float>(out);
  over_rows_and_columns(rows, N, [&](int64_t r0, int64_t R, int64_t n0, int64_t n1) {
    const float* xr = xp + r0 * K;
    float* orow = op + r0 * N;
    if (which == AVX512) { BY_ROWS(int8_avx512, R, xr, K, qp, sp, orow, N, n0, n1) }
    else if (which == AVX2) { BY_ROWS(int8_avx2, R, xr, K, qp, sp, orow, N, n0, n1) }
    else int8_generic(xr, R, K, qp, sp, orow, N, n0, n1);
  });
}

// xe, xo: (rows, K / 2) float32, the even and odd columns of x (a byte holds one of each);
// xs: (rows, K / group) float32, each group's sum of x
void int4_mm(int64_t xe, int64_t xo, int64_t xs, int64_t rows, int64_t K, int64_t q, int64_t scales, int64_t zeros,
             int64_t group, int64_t out, int64_t N, int64_t isa) {
  const int64_t G = K / group;
  const int which = resolve(isa, group / 2);
  const float *ep = ptr<const float>(xe), *opd = ptr<const float>(xo), *sp = ptr<const float>(xs);
  const uint8_t* qp = ptr<const uint8_t>(q);
  const uint16_t* scp = ptr<const uint16_t>(scales);
  const uint16_t* zp = ptr<const uint16_t>(zeros);
  float* op = ptr<float>(out);
  over_rows_and_columns(rows, N, [&](int64_t r0, int64_t R, int64_t n0, int64_t n1) {
    const float *e = ep + r0 * K / 2, *o = opd + r0 * K / 2, *s = sp + r0 * G;
    float* orow = op + r0 * N;
    if (which == AVX512) { BY_ROWS(int4_avx512, R, e, o, s, K, qp, scp, zp, group, orow, N, n0, n1) }
    else if (which == AVX2) { BY_ROWS(int4_avx2, R, e, o, s, K, qp, scp, zp, group, orow, N, n0, n1) }
    else int4_generic(e, o, s, R, K, qp, scp, zp, group, orow, N, n0, n1);
  });
}

}  // namespace

namespace llama_q8 {  // q8.cpp: the same products with the activations rounded to int8 per block, over
                      // one or more weights that multiply the same activations (lists of their tensors)
void int8a_mm(int64_t x, int64_t rows, int64_t K, const std::vector<int64_t>& qs, const std::vector<int64_t>& scales,
              const std::vector<int64_t>& outs, const std::vector<int64_t>& Ns, int64_t isa, bool x_bf16, bool out_bf16);
void int4a_mm(int64_t x, int64_t rows, int64_t K, const std::vector<int64_t>& qs, const std::vector<int64_t>& scales,
              const std::vector<int64_t>& zeros, int64_t group, const std::vector<int64_t>& outs,
              const std::vector<int64_t>& Ns, int64_t isa, bool x_bf16, bool out_bf16);
}  // namespace llama_q8

namespace llama_dequant {  // dequant.cpp: stored int4 rows into float32 or bfloat16 for a prefill's block product
void int4_into(int64_t q, int64_t scales, int64_t zeros, int64_t N, int64_t K, int64_t group, int64_t out, bool bf16,
               int64_t isa);
}  // namespace llama_dequant

namespace llama_bf16 {  // bf16.cpp: bfloat16 weights, float32 or bfloat16 activations and results
void bf16_mm(int64_t x, int64_t rows, int64_t K, int64_t w, int64_t out, int64_t N, int64_t isa, bool x_bf16,
             bool out_bf16);
}  // namespace llama_bf16

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_mm", &int8_mm, "out (rows, N) = x (rows, K) @ (q int8 (N, K) * scales (N,))^T, float32");
  m.def("int4_mm", &int4_mm, "out (rows, N) = x @ W^T, W the stored int4 form, x given as its even and odd columns");
  m.def("bf16_mm", &llama_bf16::bf16_mm,
        "out (rows, N) = x (rows, K) @ w^T, w bfloat16 (N, K); x and out float32, or bfloat16 where flagged");
  m.def("int8a_mm", &llama_q8::int8a_mm,
        "out_i (rows, N_i) = x (rows, K) @ (q_i * scales_i)^T for each weight i, x rounded to int8 per block of 32");
  m.def("int4a_mm", &llama_q8::int4a_mm,
        "out_i (rows, N_i) = x (rows, K) @ W_i^T for each stored int4 weight i, x rounded as int8a_mm's");
  m.def("int4_into", &llama_dequant::int4_into,
        "out (N, K) float32 or bfloat16 = the stored int4 weight, rounded as quant_blocks.int4_into's PyTorch form");
  m.def("best_isa", &best_isa,
        "the widest instruction set this CPU has: 1 plain C++, 2 AVX2 + FMA, 3 AVX-512 F/BW, 4 and VNNI, 5 and BF16");
}

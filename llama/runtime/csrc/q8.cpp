// Products of a few activation rows QUANTIZED TO INT8 with int8 or int4 weights, by integer dot
// products, as llama.cpp's Q8_0 x Q8_0 / Q4_0 products do: each activation row is rounded once per
// product, in blocks of 32 columns, to int8 values q = round_half_even(x / d), d = max|x| / 127 of
// the block (d = 0, q = 0 for an all-zero block); then each weight row's product is summed in int32
// per block and in float32 across blocks. The result is that of the weights times the rounded
// activations (not the float32 ones): a numeric departure from weight-only quantization, which is
// why llama/runtime/native.py and the policy name it apart ("native_a8").
//
// Weights in the stored forms (llama/weights/quant_formats.py), read as they are:
//   int8: q (N, K) int8, scales (N,) float32:  sum_k x_k W[n, k] ~ scales[n] sum_b d_b sum_{k in b} xq_k q[n, k]
//   int4: q (N, K / 2) uint8 (column 2j low nibble, 2j + 1 high), scales, zeros (N, K / group) bfloat16:
//         W = (v - 8) s + z, so the product is sum_g s_g sum_{b in g} d_b sum v xq + sum_g (z_g - 8 s_g) xs_g,
//         xs_g the sum of the rounded activations of group g; the nibbles v in [0, 15] are unsigned,
//         the activations signed: exactly the operands of VNNI's vpdpbusd and of maddubs.
// int8 x int8 multiplies |w| (unsigned) by x with w's sign: products within 127 * 127, which
// maddubs's saturating 16-bit pair sums hold exactly (2 * 127 * 127 < 32767).
#include <cmath>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t QB = 32;   // activation block
constexpr int64_t PAD = 64;  // the activation buffers are padded with zeros to whole 64-byte vectors

inline int64_t padded(int64_t n) { return (n + PAD - 1) / PAD * PAD; }

// The activation rows rounded to int8 per block, and what the kernels read of them.
struct Act {
  int64_t R, K, Kp, nb;     // rows, columns, padded columns, blocks
  std::vector<int8_t> q;    // (R, Kp) int8, zero past K                      (int8 weights)
  std::vector<int8_t> e, o; // (R, Kp / 2) the even and odd columns             (int4 weights)
  std::vector<float> d;     // (R, nb) block scales
  std::vector<float> lane;  // (R, Kp / 4): the scale of the block of each 4 int8 columns (int8),
                            // or of each 4 bytes of int4 weights, 8 columns (int4)
  std::vector<float> xs;    // (R, G) each int4 group's sum of the rounded activations
};

// A block of n <= 32 values of a row: its scale into d, its values into q; returns their sum.
int32_t quantize_block(const float* x, int64_t n, int8_t* q, float* d) {
  float amax = 0.f;
  for (int64_t k = 0; k < n; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float s = amax / 127.f;  // divided as the reference divides: the same rounding
  *d = s;
  int32_t sum = 0;
  for (int64_t k = 0; k < n; ++k) {
    q[k] = s == 0.f ? 0 : static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint(x[k] / s))));
    sum += q[k];
  }
  return sum;
}

// The same for a whole block of 32 (AVX2: _mm256_round_ps to nearest rounds as nearbyint, ties to
// even; |x / s| <= 127 up to a rounding, which rounds to 127: no clamp needed).
__attribute__((target("avx2,fma"))) int32_t quantize_block_avx2(const float* x, int8_t* q, float* d) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4], m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(x + 8 * i), m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float s = _mm_cvtss_f32(h) / 127.f;
  *d = s;
  if (s == 0.f) {
    std::memset(q, 0, QB);
    return 0;
  }
  const __m256 sv = _mm256_set1_ps(s);
  __m256i iv[4];
  __m256 total = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    const __m256 r = _mm256_round_ps(_mm256_div_ps(v[i], sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    total = _mm256_add_ps(total, r);  // integers below 2^24: exact
    iv[i] = _mm256_cvtps_epi32(r);
  }
  // the packs interleave the two 128-bit halves: the permute puts the 32 bytes back in order
  const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  return static_cast<int32_t>(hsum256(total));
}

// int4 = false: q, d, lane (4 columns per lane); true: also e, o, lane of 8 columns, xs per group.
// `vector`: whole blocks through quantize_block_avx2 (the same values as quantize_block's).
Act quantize(const float* x, int64_t R, int64_t K, bool int4, int64_t group, bool vector) {
  Act a;
  a.R = R, a.K = K, a.Kp = int4 ? 2 * padded(K / 2) : padded(K), a.nb = (K + QB - 1) / QB;
  a.q.assign(R * a.Kp, 0);
  a.d.assign(R * a.nb, 0.f);
  const int64_t per_lane = int4 ? 8 : 4, half = a.Kp / 2, G = int4 ? K / group : 0;
  a.lane.assign(R * a.Kp / 4, 0.f);
  if (int4) a.e.assign(R * half, 0), a.o.assign(R * half, 0), a.xs.assign(R * G, 0.f);
  for (int64_t r = 0; r < R; ++r) {
    int8_t* q = a.q.data() + r * a.Kp;
    float* d = a.d.data() + r * a.nb;
    for (int64_t b = 0; b < a.nb; ++b) {
      const int64_t k0 = b * QB, n = std::min(QB, K - k0);
      const int32_t sum = vector && n == QB ? quantize_block_avx2(x + r * K + k0, q + k0, d + b)
                                            : quantize_block(x + r * K + k0, n, q + k0, d + b);
      if (int4) a.xs[r * G + k0 / group] += d[b] * static_cast<float>(sum);
    }
    for (int64_t l = 0; l * per_lane < K; ++l) a.lane[r * a.Kp / 4 + l] = d[l * per_lane / QB];
    for (int64_t j = 0; int4 && j < K / 2; ++j) a.e[r * half + j] = q[2 * j], a.o[r * half + j] = q[2 * j + 1];
  }
  return a;
}

// ------------------------------------------------------------------ plain C++ (any CPU)

// Columns [k0, K) of weight row w (int8) times row r: its blocks' int32 sums times their scales.
float int8a_columns(const Act& a, int64_t r, const int8_t* w, int64_t k0) {
  float acc = 0.f;
  const int8_t* x = a.q.data() + r * a.Kp;
  for (int64_t b = k0 / QB; b < a.nb; ++b) {
    int32_t s = 0;
    for (int64_t k = std::max(k0, b * QB); k < std::min(a.K, (b + 1) * QB); ++k) s += int32_t(x[k]) * w[k];
    acc += a.d[r * a.nb + b] * static_cast<float>(s);
  }
  return acc;
}

void int8a_generic(const Act& a, const int8_t* q, const float* s, float* out, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t r = 0; r < a.R; ++r) out[r * N + n] = int8a_columns(a, r, q + n * a.K, 0) * s[n];
}

// Bytes [j0, K / 2) of int4 weight row w times row r, without the zero points (corr), `sc` the
// row's group scales as float32.
float int4a_bytes(const Act& a, int64_t r, const uint8_t* w, const float* sc, int64_t group, int64_t j0) {
  const int64_t half = a.Kp / 2;
  const int8_t *e = a.e.data() + r * half, *o = a.o.data() + r * half;
  float acc = 0.f;
  for (int64_t b = j0 * 2 / QB; b < a.nb; ++b) {
    int32_t s = 0;
    for (int64_t j = b * QB / 2; j < (b + 1) * QB / 2; ++j) s += int32_t(w[j] & 15) * e[j] + int32_t(w[j] >> 4) * o[j];
    acc += a.d[r * a.nb + b] * sc[b * QB / group] * static_cast<float>(s);
  }
  return acc;
}

// The row's group scales as float32 into sbuf (G,) and sum_g (z_g - 8 s_g) xs_g into corr (R,).
void int4a_prep_generic(const Act& a, const uint16_t* sc, const uint16_t* ze, int64_t G, float* sbuf, float* corr) {
  for (int64_t r = 0; r < a.R; ++r) corr[r] = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    const float s = bf16_to_float(sc[g]), z = bf16_to_float(ze[g]);
    sbuf[g] = s;
    for (int64_t r = 0; r < a.R; ++r) corr[r] += (z - 8.f * s) * a.xs[r * G + g];
  }
}

void int4a_generic(const Act& a, const uint8_t* q, const uint16_t* sc, const uint16_t* ze, int64_t group, float* out,
                   int64_t N, int64_t n0, int64_t n1) {
  const int64_t G = a.K / group;
  std::vector<float> sbuf(G);
  float corr[MAX_ROWS];
  for (int64_t n = n0; n < n1; ++n) {
    int4a_prep_generic(a, sc + n * G, ze + n * G, G, sbuf.data(), corr);
    for (int64_t r = 0; r < a.R; ++r) out[r * N + n] = int4a_bytes(a, r, q + n * a.K / 2, sbuf.data(), group, 0) + corr[r];
  }
}

// ------------------------------------------------------------------ AVX2
// Every kernel reads the weights one row after the other, U vectors of a row at a time into U
// independent sums: rows follow each other in memory, so the weights are one stream, which the
// hardware's prefetchers keep ahead of the arithmetic (rows taken a few at a time, interleaved,
// are short streams they pick up late: half the bytes per second). The rounded activations
// (a few kilobytes) stay in the first-level cache for all the rows.
constexpr int U = 4;

// int8 x int8: one block (32 columns) per vector, |w| times x with w's sign (maddubs), pairs summed (madd).
template <int R>
__attribute__((target("avx2,fma"))) void int8a_avx2(const Act& a, const int8_t* q, const float* s, float* out,
                                                    int64_t N, int64_t n0, int64_t n1) {
  const int64_t K = a.K, full = K / QB * QB;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = q + n * K;
    __m256 acc[U][R];
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < R; ++r) acc[u][r] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < full; k0 += QB * U)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {  // unrolled: the sums stay in registers
        const int64_t k = k0 + QB * u;
        if (k >= full) continue;
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
        const __m256i aw = _mm256_abs_epi8(w);
        for (int r = 0; r < R; ++r) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + r * a.Kp + k));
          const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w)), ones);
          acc[u][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(a.d.data() + r * a.nb + k / QB), acc[u][r]);
        }
      }
    for (int r = 0; r < R; ++r) {
      const float tail = full < K ? int8a_columns(a, r, row, full) : 0.f;
      const __m256 t = _mm256_add_ps(_mm256_add_ps(acc[0][r], acc[1][r]), _mm256_add_ps(acc[2][r], acc[3][r]));
      out[r * N + n] = (hsum256(t) + tail) * s[n];
    }
  }
}

// int4 x int8: 32 bytes (64 columns) per vector; each int32 lane of the pair sums covers 8 columns,
// so a group of `group` columns is group / 8 lanes, and lane l's scale is that of group
// (column + 8 l) / group, picked from the row's float32 scales by a permute.
template <int R>
__attribute__((target("avx2,fma"))) void int4a_avx2(const Act& a, const uint8_t* q, const uint16_t* sc,
                                                    const uint16_t* ze, int64_t group, float* out, int64_t N,
                                                    int64_t n0, int64_t n1) {
  const int64_t K = a.K, half = K / 2, hp = a.Kp / 2, G = K / group, full = half / 32 * 32;
  const int shift = __builtin_ctzll(group);  // group sizes are powers of two
  const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  const __m256i lane8 = _mm256_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56);
  // a vector starts at a multiple of 64 columns: within its group at 0, 64, 128 or 192
  __m256i idx[4];
  for (int i = 0; i < 4; ++i) idx[i] = _mm256_srli_epi32(_mm256_add_epi32(_mm256_set1_epi32(64 * i), lane8), shift);
  std::vector<float> sbuf(G + 8);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = q + n * half;
    float corr[MAX_ROWS];
    int4_prep_avx2(sc + n * G, ze + n * G, a.xs.data(), R, G, sbuf.data(), corr);
    __m256 acc[U][R];
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < R; ++r) acc[u][r] = _mm256_setzero_ps();
    for (int64_t j0 = 0; j0 < full; j0 += 32 * U)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const int64_t j = j0 + 32 * u, col = 2 * j, g0 = col >> shift;
        if (j >= full) continue;
        const __m256 sv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(sbuf.data() + g0), idx[(col - (g0 << shift)) >> 6]);
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + j));
        const __m256i lo = _mm256_and_si256(w, low), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
        for (int r = 0; r < R; ++r) {
          const __m256i ev = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.e.data() + r * hp + j));
          const __m256i ov = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.o.data() + r * hp + j));
          const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, ev), _mm256_maddubs_epi16(hi, ov));
          const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
          const __m256 dv = _mm256_loadu_ps(a.lane.data() + r * a.Kp / 4 + j / 4);
          acc[u][r] = _mm256_fmadd_ps(p, _mm256_mul_ps(sv, dv), acc[u][r]);
        }
      }
    for (int r = 0; r < R; ++r) {
      const float tail = full < half ? int4a_bytes(a, r, row, sbuf.data(), group, full) : 0.f;
      const __m256 t = _mm256_add_ps(_mm256_add_ps(acc[0][r], acc[1][r]), _mm256_add_ps(acc[2][r], acc[3][r]));
      out[r * N + n] = hsum256(t) + tail + corr[r];
    }
  }
}

// ------------------------------------------------------------------ AVX-512 (BW; VNNI where present)
// Both instantiations are compiled for VNNI, but the V = false one holds no VNNI instruction:
// only intrinsics, no loop the compiler could vectorize into one. The tail of a row is read
// through a mask (the activations past K are zeros).

template <bool V>
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline __m512i dot_u8s8(__m512i u, __m512i s) {
  if constexpr (V) return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s);
  return _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1));
}

__attribute__((target("avx512f,avx512bw"), always_inline)) inline __mmask64 first(int64_t n) {
  return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1;
}

// int8 x int8: 64 columns (two blocks) per vector.
template <int R, bool V>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void int8a_avx512(const Act& a, const int8_t* q,
                                                                        const float* s, float* out, int64_t N,
                                                                        int64_t n0, int64_t n1) {
  const int64_t K = a.K;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* row = q + n * K;
    __m512 acc[U][R];
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < R; ++r) acc[u][r] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += 64 * U)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const int64_t k = k0 + 64 * u;
        if (k >= K) continue;
        const __m512i w = _mm512_maskz_loadu_epi8(first(K - k), row + k);
        const __m512i aw = _mm512_abs_epi8(w);
        const __mmask64 neg = _mm512_movepi8_mask(w);
        for (int r = 0; r < R; ++r) {
          const __m512i xv = _mm512_loadu_si512(a.q.data() + r * a.Kp + k);
          const __m512i p = dot_u8s8<V>(aw, _mm512_mask_sub_epi8(xv, neg, zero, xv));
          const __m512 dv = _mm512_loadu_ps(a.lane.data() + r * a.Kp / 4 + k / 4);
          acc[u][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), dv, acc[u][r]);
        }
      }
    for (int r = 0; r < R; ++r) {
      const __m512 t = _mm512_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]), _mm512_add_ps(acc[2][r], acc[3][r]));
      out[r * N + n] = _mm512_reduce_add_ps(t) * s[n];
    }
  }
}

// int4 x int8: 64 bytes (128 columns) per vector, 16 lanes of 8 columns; as int4a_avx2.
template <int R, bool V>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void int4a_avx512(const Act& a, const uint8_t* q,
                                                                        const uint16_t* sc, const uint16_t* ze,
                                                                        int64_t group, float* out, int64_t N,
                                                                        int64_t n0, int64_t n1) {
  const int64_t K = a.K, half = K / 2, hp = a.Kp / 2, G = K / group;
  const int shift = __builtin_ctzll(group);
  const __m512i low = _mm512_set1_epi8(15);
  const __m512i lane8 = _mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120);
  // a vector starts at a multiple of 128 columns: within its group at 0, or (groups of 256) at 128
  const __m512i idx[2] = {_mm512_srli_epi32(lane8, shift),
                          _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32(128), lane8), shift)};
  std::vector<float> sbuf(G + 16);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = q + n * half;
    float corr[MAX_ROWS];
    int4_prep_avx512(sc + n * G, ze + n * G, a.xs.data(), R, G, sbuf.data(), corr);
    __m512 acc[U][R];
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < R; ++r) acc[u][r] = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < half; j0 += 64 * U)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const int64_t j = j0 + 64 * u, col = 2 * j, g0 = col >> shift;
        if (j >= half) continue;
        const __m512 sv = _mm512_permutexvar_ps(idx[(col - (g0 << shift)) >> 7], _mm512_loadu_ps(sbuf.data() + g0));
        const __m512i w = _mm512_maskz_loadu_epi8(first(half - j), row + j);
        const __m512i lo = _mm512_and_si512(w, low), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
        for (int r = 0; r < R; ++r) {
          const __m512i ev = _mm512_loadu_si512(a.e.data() + r * hp + j), ov = _mm512_loadu_si512(a.o.data() + r * hp + j);
          __m512i p;
          if constexpr (V) p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, ev), hi, ov);
          else p = _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(lo, ev), _mm512_maddubs_epi16(hi, ov)),
                                     _mm512_set1_epi16(1));
          const __m512 dv = _mm512_loadu_ps(a.lane.data() + r * a.Kp / 4 + j / 4);
          acc[u][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(sv, dv), acc[u][r]);
        }
      }
    for (int r = 0; r < R; ++r) {
      const __m512 t = _mm512_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]), _mm512_add_ps(acc[2][r], acc[3][r]));
      out[r * N + n] = _mm512_reduce_add_ps(t) + corr[r];
    }
  }
}

#define BY_ROWS_V(fn, R, V, ...)                                   \
  switch (R) {                                                     \
    case 1: fn<1, V>(__VA_ARGS__); break;                          \
    case 2: fn<2, V>(__VA_ARGS__); break;                          \
    case 3: fn<3, V>(__VA_ARGS__); break;                          \
    default: fn<4, V>(__VA_ARGS__); break;                         \
  }

}  // namespace

namespace llama_q8 {

// The entry points, as gemv.cpp's: addresses of contiguous tensors that llama/runtime/native.py
// checked. One call takes every weight that multiplies the same activations (a layer's wq, wk and
// wv; w1 and w3): the activations are rounded once, and the threads split all the weights' rows
// as one range, so a small weight is not a parallel region of its own. Activations and results
// are float32, or bfloat16 where flagged (widened exactly; results rounded to nearest even, as
// PyTorch's conversion rounds): a bfloat16 model's products then need no conversions around them.

// `run(act, part, n0, n1, out)` computes rows n0..n1 of weight `part` into `out` (R, N) float32.
template <typename Run>
void joint(int64_t x, int64_t rows, int64_t K, bool int4, int64_t group, const std::vector<int64_t>& outs,
           const std::vector<int64_t>& Ns, bool vector, bool x_bf16, bool out_bf16, const Run& run) {
  const size_t P = Ns.size();
  std::vector<int64_t> first(P + 1, 0);  // each weight's first block in the joint range
  for (size_t p = 0; p < P; ++p) first[p + 1] = first[p] + (Ns[p] + NB - 1) / NB;
  std::vector<float> wide;
  for (int64_t r0 = 0; r0 < rows; r0 += MAX_ROWS) {
    const int64_t R = std::min(MAX_ROWS, rows - r0);
    const float* xr = ptr<const float>(x) + r0 * K;
    if (x_bf16) {
      wide.resize(R * K);
      const uint16_t* xh = ptr<const uint16_t>(x) + r0 * K;
      for (int64_t i = 0; i < R * K; ++i) wide[i] = bf16_to_float(xh[i]);
      xr = wide.data();
    }
    const Act a = quantize(xr, R, K, int4, group, vector);
    std::vector<std::vector<float>> tmp(out_bf16 ? P : 0);  // float32 results before rounding
    for (size_t p = 0; p < tmp.size(); ++p) tmp[p].resize(R * Ns[p]);
    at::parallel_for(0, first[P], 16, [&](int64_t b0, int64_t b1) {
      for (size_t p = 0; p < P; ++p) {
        const int64_t lo = std::max(b0, first[p]), hi = std::min(b1, first[p + 1]), N = Ns[p];
        if (lo >= hi) continue;
        const int64_t n0 = (lo - first[p]) * NB, n1 = std::min(N, (hi - first[p]) * NB);
        float* op = out_bf16 ? tmp[p].data() : ptr<float>(outs[p]) + r0 * N;
        run(a, p, n0, n1, op);
        if (!out_bf16) continue;
        uint16_t* oh = ptr<uint16_t>(outs[p]) + r0 * N;
        for (int64_t r = 0; r < R; ++r)
          for (int64_t n = n0; n < n1; ++n) oh[r * N + n] = float_to_bf16(op[r * N + n]);
      }
    });
  }
}

void int8a_mm(int64_t x, int64_t rows, int64_t K, const std::vector<int64_t>& qs, const std::vector<int64_t>& scales,
              const std::vector<int64_t>& outs, const std::vector<int64_t>& Ns, int64_t isa, bool x_bf16,
              bool out_bf16) {
  const int which = resolve(isa, 64, VNNI);  // masked loads and scalar tails: any K
  joint(x, rows, K, false, 0, outs, Ns, which >= AVX2, x_bf16, out_bf16,
        [&](const Act& a, size_t p, int64_t n0, int64_t n1, float* op) {
          const int8_t* qp = ptr<const int8_t>(qs[p]);
          const float* sp = ptr<const float>(scales[p]);
          const int64_t N = Ns[p];
          if (which == VNNI) { BY_ROWS_V(int8a_avx512, a.R, true, a, qp, sp, op, N, n0, n1) }
          else if (which == AVX512) { BY_ROWS_V(int8a_avx512, a.R, false, a, qp, sp, op, N, n0, n1) }
          else if (which == AVX2) { BY_ROWS(int8a_avx2, a.R, a, qp, sp, op, N, n0, n1) }
          else int8a_generic(a, qp, sp, op, N, n0, n1);
        });
}

void int4a_mm(int64_t x, int64_t rows, int64_t K, const std::vector<int64_t>& qs, const std::vector<int64_t>& scales,
              const std::vector<int64_t>& zeros, int64_t group, const std::vector<int64_t>& outs,
              const std::vector<int64_t>& Ns, int64_t isa, bool x_bf16, bool out_bf16) {
  const int which = resolve(isa, 64, VNNI);
  joint(x, rows, K, true, group, outs, Ns, which >= AVX2, x_bf16, out_bf16,
        [&](const Act& a, size_t p, int64_t n0, int64_t n1, float* op) {
          const uint8_t* qp = ptr<const uint8_t>(qs[p]);
          const uint16_t *scp = ptr<const uint16_t>(scales[p]), *zp = ptr<const uint16_t>(zeros[p]);
          const int64_t N = Ns[p];
          if (which == VNNI) { BY_ROWS_V(int4a_avx512, a.R, true, a, qp, scp, zp, group, op, N, n0, n1) }
          else if (which == AVX512) { BY_ROWS_V(int4a_avx512, a.R, false, a, qp, scp, zp, group, op, N, n0, n1) }
          else if (which == AVX2) { BY_ROWS(int4a_avx2, a.R, a, qp, scp, zp, group, op, N, n0, n1) }
          else int4a_generic(a, qp, scp, zp, group, op, N, n0, n1);
        });
}

}  // namespace llama_q8

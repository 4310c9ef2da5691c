// Products of a few activation rows (float32 or bfloat16) with bfloat16 weights w (N, K), out (rows, N)
// float32 or bfloat16 = x @ w^T, the products summed in float32. Decode reads every weight once per
// token, so the bytes read per second bound these products: each thread walks its own contiguous
// run of weight rows front to back (one sequential stream the hardware prefetcher follows, helped by
// software prefetches a fixed distance ahead), NBR rows at a time with several independent
// accumulators each, and reads each activation row from the innermost cache.
//
// Instruction sets: with bfloat16 activations and AVX-512 BF16, vdpbf16ps multiplies pairs of
// bfloat16 and adds them into float32 (the products of two bfloat16 are exact in float32, as
// F.linear in bfloat16 computes them; only the order of the sums differs); otherwise the weights are
// widened to float32 (a bfloat16 is the high half of its float32) and multiplied by float32
// activations with FMA (AVX-512 F or AVX2), bfloat16 activations widened once per call.
#include <vector>

#include "common.h"

namespace {

constexpr int PF = 256;  // bytes ahead of each weight row's reads that are prefetched
// Activations of up to this many bytes stay in the innermost cache beside the streaming weights: one
// weight row per step; larger ones are read once for NBR_WIDE weight rows at a time instead.
constexpr int64_t X_FITS = 16384;
constexpr int NBR_WIDE = 4;

struct Out {  // where a product's results go: float32 or bfloat16 (rows, N)
  void* p;
  int64_t N;
  bool bf16;
  inline void put(int64_t r, int64_t n, float v) const {
    if (bf16) static_cast<uint16_t*>(p)[r * N + n] = float_to_bf16(v);
    else static_cast<float*>(p)[r * N + n] = v;
  }
};

// ------------------------------------------------------------------ plain C++ (any CPU), float32 x

void generic(const float* x, int64_t R, int64_t K, const uint16_t* w, const Out& o, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t r = 0; r < R; ++r) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += x[r * K + k] * bf16_to_float(w[n * K + k]);
      o.put(r, n, acc);
    }
}

// Each kernel below: weight rows n..n + NBR against R activation rows, U vectors per weight row per
// step (independent sums: one row at a time still keeps several in flight), a vector at a time past the
// last whole step; the prefetches cover each 64-byte line PF bytes ahead of the step's reads.
#define ROWS_LOOP(V, STEP)                                                           \
  const uint16_t* wr = w + n * K;                                                    \
  int64_t k = 0;                                                                     \
  for (; k + V * U <= K; k += V * U)                                                 \
    for (int i = 0; i < NBR; ++i) {                                                  \
      const char* line = reinterpret_cast<const char*>(wr + i * K + k) + PF;         \
      for (int b = 0; b < V * U * 2; b += 64) _mm_prefetch(line + b, _MM_HINT_T0);   \
      for (int u = 0; u < U; ++u) STEP(i, k + V * u, u);                             \
    }                                                                                \
  for (; k < K; k += V)                                                              \
    for (int i = 0; i < NBR; ++i) STEP(i, k, 0);

// ------------------------------------------------------------------ AVX-512 BF16, bfloat16 x

template <int R, int NBR>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void dp_rows(const uint16_t* x, int64_t K, const uint16_t* w,
                                                                    const Out& o, int64_t n) {
  constexpr int U = NBR >= 2 ? 1 : 2;  // measured: two vectors (128 bytes) per step beat four here
  __m512 acc[NBR][R][U];
  for (int i = 0; i < NBR; ++i)
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[i][r][u] = _mm512_setzero_ps();
#define DP_STEP(i, kk, u)                                                                          \
  {                                                                                                \
    __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + (i) * K + (kk));                               \
    for (int r = 0; r < R; ++r)                                                                    \
      acc[i][r][u] = _mm512_dpbf16_ps(acc[i][r][u], (__m512bh)_mm512_loadu_si512(x + r * K + (kk)), wv); \
  }
  ROWS_LOOP(32, DP_STEP)
#undef DP_STEP
  for (int i = 0; i < NBR; ++i)
    for (int r = 0; r < R; ++r) {
      __m512 s = acc[i][r][0];
      for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[i][r][u]);
      o.put(r, n + i, _mm512_reduce_add_ps(s));
    }
}

// ------------------------------------------------------------------ AVX-512 F, float32 x

template <int R, int NBR>
__attribute__((target("avx512f,avx512bw"))) void fma512_rows(const float* x, int64_t K, const uint16_t* w,
                                                             const Out& o, int64_t n) {
  constexpr int U = NBR >= 4 ? 1 : 4 / NBR;
  __m512 acc[NBR][R][U];
  for (int i = 0; i < NBR; ++i)
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[i][r][u] = _mm512_setzero_ps();
#define FMA512_STEP(i, kk, u)                                                                        \
  {                                                                                                  \
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + (i) * K + (kk)));           \
    __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));               \
    for (int r = 0; r < R; ++r) acc[i][r][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * K + (kk)), acc[i][r][u]); \
  }
  ROWS_LOOP(16, FMA512_STEP)
#undef FMA512_STEP
  for (int i = 0; i < NBR; ++i)
    for (int r = 0; r < R; ++r) {
      __m512 s = acc[i][r][0];
      for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[i][r][u]);
      o.put(r, n + i, _mm512_reduce_add_ps(s));
    }
}

// ------------------------------------------------------------------ AVX2 + FMA, float32 x

template <int R, int NBR>
__attribute__((target("avx2,fma"))) void fma256_rows(const float* x, int64_t K, const uint16_t* w, const Out& o,
                                                     int64_t n) {
  constexpr int U = NBR >= 4 ? 1 : 4 / NBR;
  __m256 acc[NBR][R][U];
  for (int i = 0; i < NBR; ++i)
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[i][r][u] = _mm256_setzero_ps();
#define FMA256_STEP(i, kk, u)                                                                        \
  {                                                                                                  \
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + (i) * K + (kk)));              \
    __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));               \
    for (int r = 0; r < R; ++r) acc[i][r][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * K + (kk)), acc[i][r][u]); \
  }
  ROWS_LOOP(8, FMA256_STEP)
#undef FMA256_STEP
  for (int i = 0; i < NBR; ++i)
    for (int r = 0; r < R; ++r) {
      __m256 s = acc[i][r][0];
      for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[i][r][u]);
      o.put(r, n + i, hsum256(s));
    }
}
#undef ROWS_LOOP

// Rows n0..n1 of the weight for R activation rows: `many` NBR rows per step, the rest `one` at a time.
template <int NBR, typename X, typename F1, typename FN>
void walk(const X* x, int64_t K, const uint16_t* w, const Out& o, int64_t n0, int64_t n1, F1 one, FN many) {
  int64_t n = n0;
  for (; n + NBR <= n1; n += NBR) many(x, K, w, o, n);
  for (; n < n1; ++n) one(x, K, w, o, n);
}

template <int R>
void run_rows(int which, const void* x, int64_t K, const uint16_t* w, const Out& o, int64_t n0, int64_t n1) {
#define WALK(KERNEL, XT)                                                                        \
  if (R * K * static_cast<int64_t>(sizeof(XT)) <= X_FITS)                                      \
    walk<1>(static_cast<const XT*>(x), K, w, o, n0, n1, KERNEL<R, 1>, KERNEL<R, 1>);           \
  else                                                                                          \
    walk<NBR_WIDE>(static_cast<const XT*>(x), K, w, o, n0, n1, KERNEL<R, 1>, KERNEL<R, NBR_WIDE>);
  if (which == BF16) { WALK(dp_rows, uint16_t) }
  else if (which == AVX512) { WALK(fma512_rows, float) }
  else if (which == AVX2) { WALK(fma256_rows, float) }
  else generic(static_cast<const float*>(x), R, K, w, o, n0, n1);
#undef WALK
}

}  // namespace

namespace llama_bf16 {

// x: (rows, K) float32, or bfloat16 if x_bf16; out: (rows, N) float32, or bfloat16 if out_bf16.
// Addresses of contiguous tensors that llama/runtime/native.py checked.
void bf16_mm(int64_t x, int64_t rows, int64_t K, int64_t w, int64_t out, int64_t N, int64_t isa, bool x_bf16,
             bool out_bf16) {
  int which = resolve(isa, 16, BF16);  // widths checked below: BF16 takes bfloat16 activations only
  if (which == VNNI || which == BF16 && (!x_bf16 || K % 32)) which = AVX512;
  // float32 activations, not forced: AVX2's widening of the weights read more per second than
  // AVX-512's (vpmovzxwd to 512 bits) on the AVX-512 CPU this was measured on
  if (isa == AUTO && which == AVX512) which = AVX2;
  if (which == AVX512 && K % 16) which = AVX2;
  if (which == AVX2 && K % 8) which = GENERIC;
  const uint16_t* wp = ptr<const uint16_t>(w);
  for (int64_t r0 = 0; r0 < rows; r0 += MAX_ROWS) {
    const int64_t R = std::min(MAX_ROWS, rows - r0);
    const void* xr = x_bf16 ? static_cast<const void*>(ptr<const uint16_t>(x) + r0 * K) : ptr<const float>(x) + r0 * K;
    std::vector<float> wide;  // bfloat16 activations widened once for the kernels that take float32 (exact)
    if (x_bf16 && which != BF16) {
      wide.resize(R * K);
      for (int64_t i = 0; i < R * K; ++i) wide[i] = bf16_to_float(static_cast<const uint16_t*>(xr)[i]);
      xr = wide.data();
    }
    const Out o{out_bf16 ? static_cast<void*>(ptr<uint16_t>(out) + r0 * N) : ptr<float>(out) + r0 * N, N, out_bf16};
    // one contiguous run of whole 8-row blocks per thread, as equal as they divide
    at::parallel_for(0, (N + 7) / 8, 1, [&](int64_t b0, int64_t b1) {
      const int64_t n0 = b0 * 8, n1 = std::min(N, b1 * 8);
      switch (R) {
        case 1: run_rows<1>(which, xr, K, wp, o, n0, n1); break;
        case 2: run_rows<2>(which, xr, K, wp, o, n0, n1); break;
        case 3: run_rows<3>(which, xr, K, wp, o, n0, n1); break;
        default: run_rows<4>(which, xr, K, wp, o, n0, n1); break;
      }
    });
  }
}

}  // namespace llama_bf16

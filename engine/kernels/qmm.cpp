// kvbench's matmul over GGUF-format weights: y (M, N) = x (M, K) . W(N, K)^T with W in its GGML block
// layout (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, F16, BF16), never expanded in memory.
//
// Design (the same split llama.cpp's CPU backend makes, written from the GGML block formats):
//  * Small M (decode, M <= 16): every weight block is unpacked to 32 integers per group in registers and
//    met by each activation row as it is (float32: the quants widened), as int8 per 32 values (llama.cpp's
//    arithmetic), or as 16-bit fixed point per 32 values in two int8 halves ("q16", the engine's default):
//    the last two dot in integers (VNNI dpbusd, or AVX2 maddubs/madd). Weight bytes are read once per
//    call whatever M is: decode is bound by memory bandwidth and by the instructions per weight.
//  * Large M (prefill): callers dequantize W to bf16 (``dequant``) and hand it to torch's GEMM (oneDNN),
//    whose blocking a hand kernel would not beat.
//  * F16 / BF16 weights at small M: converted 8 at a time to f32 in registers and FMA'd with x in f32.
// Threads: at::parallel_for over output rows (torch's own OpenMP pool, so no second runtime spins
// beside torch's). Every path has a portable scalar twin compiled where AVX2 is absent.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KV_AVX2 1
#else
#define KV_AVX2 0
#endif
#if KV_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define KV_AVX512 1
#else
#define KV_AVX512 0
#endif

namespace {

// GGML type ids (ggml.h enum ggml_type)
enum : int64_t { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12,
                 Q5_K = 13, Q6_K = 14, BF16 = 30 };
// kvbench's own ids: the same blocks with 16 rows interleaved (see "x16" below); not GGML types
enum : int64_t { Q4_0_X16 = 1002, Q4_1_X16 = 1003, Q8_0_X16 = 1008 };
inline bool is_x16(int64_t t) { return t == Q4_0_X16 || t == Q4_1_X16 || t == Q8_0_X16; }
inline int64_t x16_base(int64_t t) { return t == Q4_0_X16 ? Q4_0 : t == Q4_1_X16 ? Q4_1 : Q8_0; }

struct Layout { int64_t block, bytes; };

Layout layout(int64_t t) {
  switch (t) {
    case F32: return {1, 4};
    case F16: return {1, 2};
    case BF16: return {1, 2};
    case Q4_0: case Q4_0_X16: return {32, 18};
    case Q4_1: case Q4_1_X16: return {32, 20};
    case Q5_0: return {32, 22};
    case Q5_1: return {32, 24};
    case Q8_0: case Q8_0_X16: return {32, 34};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
  }
  TORCH_CHECK(false, "kvbench qmm: GGML type ", t, " is not supported by the kernel");
}

inline float fp16(const uint8_t* p) {
  uint16_t h; std::memcpy(&h, p, 2);
#if KV_AVX2
  return _cvtsh_ss(h);  // F16C: one instruction (the software conversion was a third of the decode kernel)
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

inline float bf16f(uint16_t h) { uint32_t u = uint32_t(h) << 16; float f; std::memcpy(&f, &u, 4); return f; }
// element k of an F32 / F16 / BF16 row
inline float wval(int64_t t, const uint16_t* row, int64_t k) {
  if (t == F32) { float f; std::memcpy(&f, reinterpret_cast<const float*>(row) + k, 4); return f; }
  return t == F16 ? c10::detail::fp16_ieee_to_fp32_value(row[k]) : bf16f(row[k]);
}

// Q4_K / Q5_K: 6-bit scale and min of sub-block j (ggml's get_scale_min_k4)
inline void scale_min_k4(int j, const uint8_t* q, int& sc, int& m) {
  if (j < 4) { sc = q[j] & 63; m = q[j + 4] & 63; }
  else { sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}

// One 32-weight group unpacked: q[i] integers with  w_i = s[i / 16] * q[i] + mn  (two scales so that
// Q6_K's 16-element sub-blocks fit; every other format repeats one scale).
struct Group { int8_t q[32]; float s[2]; float mn; };

// Unpack group g (0 .. block/32 - 1) of the block at p. Scalar: the compiler vectorizes the loops, and
// the AVX2 dot below loads q as one register.
inline void unpack(int64_t t, const uint8_t* p, int g, Group& o) {
  o.mn = 0.f;
  switch (t) {
    case Q8_0: {
      o.s[0] = o.s[1] = fp16(p);
      std::memcpy(o.q, p + 2, 32);
      return;
    }
    case Q4_0: case Q4_1: {
      const uint8_t* qs = p + (t == Q4_0 ? 2 : 4);
      const int off = t == Q4_0 ? 8 : 0;
      for (int j = 0; j < 16; ++j) { o.q[j] = int8_t((qs[j] & 0xF) - off); o.q[j + 16] = int8_t((qs[j] >> 4) - off); }
      o.s[0] = o.s[1] = fp16(p);
      if (t == Q4_1) o.mn = fp16(p + 2);
      return;
    }
    case Q5_0: case Q5_1: {
      const bool one = t == Q5_1;
      uint32_t qh; std::memcpy(&qh, p + (one ? 4 : 2), 4);
      const uint8_t* qs = p + (one ? 8 : 6);
      const int off = one ? 0 : 16;
      for (int j = 0; j < 16; ++j) {
        o.q[j] = int8_t(((qs[j] & 0xF) | (((qh >> j) << 4) & 0x10)) - off);
        o.q[j + 16] = int8_t(((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) - off);
      }
      o.s[0] = o.s[1] = fp16(p);
      if (one) o.mn = fp16(p + 2);
      return;
    }
    case Q4_K: case Q5_K: {
      const float d = fp16(p), dmin = fp16(p + 2);
      const uint8_t* scales = p + 4;
      int sc, m;
      scale_min_k4(g, scales, sc, m);
      o.s[0] = o.s[1] = d * sc;
      o.mn = -dmin * m;
      const int pair = g / 2, hi = g % 2;  // groups 2j and 2j+1 share 32 bytes: low and high nibbles
      if (t == Q4_K) {
        const uint8_t* qs = p + 16 + 32 * pair;
        for (int l = 0; l < 32; ++l) o.q[l] = int8_t(hi ? qs[l] >> 4 : qs[l] & 0xF);
      } else {
        const uint8_t* qh = p + 16;
        const uint8_t* qs = p + 48 + 32 * pair;
        for (int l = 0; l < 32; ++l)
          o.q[l] = int8_t((hi ? qs[l] >> 4 : qs[l] & 0xF) | (((qh[l] >> g) & 1) << 4));
      }
      return;
    }
    case Q6_K: {
      const uint8_t* ql = p + 64 * (g / 4);       // 128-element halves: 64 bytes of low nibbles ...
      const uint8_t* qh = p + 128 + 32 * (g / 4);  // ... and 32 bytes of high bit pairs
      const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192) + 8 * (g / 4);
      const float d = fp16(p + 208);
      const int r = g % 4;  // sub-group within the half: ql offset 0/32, nibble low/high, qh bits 2r
      const uint8_t* l0 = ql + (r & 1) * 32;
      for (int l = 0; l < 32; ++l)
        o.q[l] = int8_t((((r < 2) ? (l0[l] & 0xF) : (l0[l] >> 4)) | (((qh[l] >> (2 * r)) & 3) << 4)) - 32);
      o.s[0] = d * sc[2 * r];
      o.s[1] = d * sc[2 * r + 1];
      return;
    }
  }
  TORCH_CHECK(false, "kvbench qmm: GGML type ", t, " has no unpacker");
}

// Activation row quantized like GGML's Q8_0/Q8_1: per 32 values int8 q, scale d, and d * sum(q) over
// each half of 16 (the weight formats with an offset need it: w = s*q + mn contributes mn * d * sum(q)).
struct QRow { const int8_t* q; const float* d; const float* s; };

void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* d, float* s) {
  const int64_t nb = K / 32;
  at::parallel_for(0, M * nb, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* xb = x + b * 32;
      float amax = 0.f;
      for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float dd = amax / 127.f, id = dd ? 1.f / dd : 0.f;
      int sum[2] = {0, 0};
      for (int i = 0; i < 32; ++i) { int v = int(std::nearbyint(xb[i] * id)); q[b * 32 + i] = int8_t(v); sum[i / 16] += v; }
      d[b] = dd;
      s[2 * b] = dd * float(sum[0]);
      s[2 * b + 1] = dd * float(sum[1]);
    }
  });
}

// Activation row as 16-bit fixed point per 32 values ("q16"): X = round(x / dd), dd = max|x| / 32512, split
// into two int8 halves X = 256 hi + lo, hi in [-127, 127] and lo in [-127, 127]: where round gives lo = -128
// (1 in 256 values) X moves one unit up, because signed weights negate lo and -(-128) does not fit int8. So
// |x - dd X| <= 1.5 dd = max|x| / 21675 (float32 keeps 2^-24 relative; llama.cpp's int8 max|x| / 254). Two
// integer dots per weight group, exact in int32, give the dot with X. dl repeats dd 8 times per group (one per int32 lane
// of the dot), s holds the float sums of x per 16 values (for the formats' minima, as in the float path), ls
// the integer sums of X per 4 values (one per int32 lane: Q4_0's offset of 8 subtracted inside the dot).
// hl and d hold the same numbers again for the x16 kernels: per group its hi then its lo bytes (one 64-byte
// line), and dd once. Why: an x16 kernel reads a group's activations once per tile of 16 weight rows, and with
// hi, lo and dl apart that is three lines per group, 17 KB of a 2816-value row, which with a 25 KB tile of
// weights no longer fits the 32 KB L1: a 1024x2816 Q4_0 matrix read from DRAM took 77 us against 63 for
// 2816x1024, the same bytes; with hl and d it took 65.
struct Q16Row { const int8_t* hi; const int8_t* lo; const float* dl; const float* s; const int32_t* ls;
                const int8_t* hl; const float* d; };

#if KV_AVX2
// One block of quantize16_rows in vector registers (the scalar loop below cost ~10 us per 1024 values, a fifth of
// a small matrix's call). The same X (cvtps rounds to nearest even, as nearbyint; the same clamp and -128 fix-up);
// the float sums per 16 values are added in another order (the minima's bound allows any: 15 roundings).
inline void quantize16_block(const float* xb, int8_t* hi, int8_t* lo, float* dl, float* s, int32_t* ls, int8_t* hl,
                             float* d) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4];
  for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(xb + 8 * i);
  __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                           _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm_cvtss_f32(m4);
  const float dd = amax / 32512.f, id = amax > 0.f ? 32512.f / amax : 0.f;
  for (int h = 0; h < 2; ++h) {
    const __m256 a = _mm256_add_ps(v[2 * h], v[2 * h + 1]);
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));
    s[h] = _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
  const __m256 idv = _mm256_set1_ps(id);
  const __m256i lim = _mm256_set1_epi32(32512), c128 = _mm256_set1_epi32(128), c255 = _mm256_set1_epi32(255);
  __m256i X[4], H[4], L[4];
  for (int i = 0; i < 4; ++i) {
    __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], idv));
    q = _mm256_max_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), lim), _mm256_min_epi32(lim, q));
    const __m256i bad = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_add_epi32(q, c128), c255), _mm256_setzero_si256());
    q = _mm256_sub_epi32(q, bad);  // lo would be -128: X one unit up
    X[i] = q;
    H[i] = _mm256_srai_epi32(_mm256_add_epi32(q, c128), 8);
    L[i] = _mm256_sub_epi32(q, _mm256_slli_epi32(H[i], 8));
  }
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  auto pack = [&](const __m256i* r) {
    return _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3])), order);
  };
  const __m256i ph = pack(H), pl = pack(L);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), ph);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo), pl);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(hl), ph);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(hl + 32), pl);
  *d = dd;
  const __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(X[0], X[1]), _mm256_hadd_epi32(X[2], X[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(ls), _mm256_permutevar8x32_epi32(sums, order));
  _mm256_storeu_ps(dl, _mm256_set1_ps(dd));
}
#endif

void quantize16_rows(const float* x, int64_t M, int64_t K, int8_t* hi, int8_t* lo, float* dl, float* s,
                     int32_t* ls, int8_t* hl, float* d) {
  const int64_t nb = K / 32;
  at::parallel_for(0, M * nb, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* xb = x + b * 32;
#if KV_AVX2
      quantize16_block(xb, hi + b * 32, lo + b * 32, dl + b * 8, s + 2 * b, ls + b * 8, hl + b * 64, d + b);
      continue;
#endif
      float amax = 0.f, sum[2] = {0.f, 0.f};
      for (int i = 0; i < 32; ++i) { amax = std::max(amax, std::fabs(xb[i])); sum[i / 16] += xb[i]; }
      const float dd = amax / 32512.f, id = amax > 0.f ? 32512.f / amax : 0.f;
      for (int i = 0; i < 32; ++i) {
        int X = std::max(-32512, std::min(32512, int(std::nearbyint(xb[i] * id))));
        if (((X + 128) & 255) == 0) X += 1;  // lo would be -128
        const int h = (X + 128) >> 8;  // floor((X + 128) / 256): round(X / 256)
        hi[b * 32 + i] = int8_t(h);
        lo[b * 32 + i] = int8_t(X - 256 * h);
        if (i % 4 == 0) ls[b * 8 + i / 4] = 0;
        ls[b * 8 + i / 4] += X;
      }
      for (int l = 0; l < 8; ++l) dl[b * 8 + l] = dd;
      s[2 * b] = sum[0];
      s[2 * b + 1] = sum[1];
      std::memcpy(hl + b * 64, hi + b * 32, 32);
      std::memcpy(hl + b * 64 + 32, lo + b * 32, 32);
      d[b] = dd;
    }
  });
}

// A quantized activation row as the integer kernels read it: the integer of value i of group xb, and the scale
// that turns a group's integer dot into x's units (both row kinds carry s, the per-16 sums the minima meet).
inline int xint(const QRow& r, int64_t xb, int i) { return r.q[xb * 32 + i]; }
inline int xint(const Q16Row& r, int64_t xb, int i) { return 256 * r.hi[xb * 32 + i] + r.lo[xb * 32 + i]; }
inline float xscale(const QRow& r, int64_t xb) { return r.d[xb]; }
inline float xscale(const Q16Row& r, int64_t xb) { return r.dl[xb * 8]; }

#if KV_AVX2
// sum over 32 int8 pairs, as 8 int32 lanes (lanes 0-3: elements 0-15, lanes 4-7: 16-31) in float.
// u (unsigned, <= 128) . x (signed, |x| <= 127) in groups of 4 -> 8 int32 lanes, as float
inline __m256 dotu32(__m256i u, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x));
#elif defined(__AVXVNNI__)
  return _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, x));
#else
  const __m256i p16 = _mm256_maddubs_epi16(u, x);  // u <= 128, |x| <= 127: pairs stay under 2^15
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
#endif
}
// signed w . x: |w| carries the magnitude, x takes w's sign (w = -128 gives |w| = 128 as unsigned)
inline __m256 dot32(__m256i w, __m256i x) { return dotu32(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)); }
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

constexpr int MAXM = 16;
constexpr int MB = 4;  // activation rows per pass over a weight row: their accumulators stay in registers

template <int R>
using Rows = std::integral_constant<int, R>;

// f(Rows<r>{}, m0) for each block of r <= MB activation rows starting at m0 (r a compile-time constant, so
// the kernels keep that block's accumulators in registers).
template <typename F>
inline void row_blocks(int64_t M, F&& f) {
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    switch (std::min<int64_t>(MB, M - m0)) {
      case 1: f(Rows<1>{}, m0); break;
      case 2: f(Rows<2>{}, m0); break;
      case 3: f(Rows<3>{}, m0); break;
      default: f(Rows<4>{}, m0); break;
    }
  }
}

// Weight rows [n0, n1) in tiles of 8 that stay in L1 while every block of activation rows passes over them:
// f(Rows<r>{}, m0, t0, t1).
template <typename F>
inline void weight_tiles(int64_t M, int64_t n0, int64_t n1, F&& f) {
  constexpr int64_t TILE = 8;
  for (int64_t t0 = n0; t0 < n1; t0 += TILE) {
    const int64_t t1 = std::min(n1, t0 + TILE);
    row_blocks(M, [&](auto R, int64_t m0) { f(R, m0, t0, t1); });
  }
}

// f(std::integral_constant<int64_t, TY>{}) for each quantized format; false (f not called) for other types.
template <typename F>
inline bool by_format(int64_t t, F&& f) {
  switch (t) {
    case Q8_0: f(std::integral_constant<int64_t, Q8_0>{}); return true;
    case Q4_0: f(std::integral_constant<int64_t, Q4_0>{}); return true;
    case Q4_1: f(std::integral_constant<int64_t, Q4_1>{}); return true;
    case Q5_0: f(std::integral_constant<int64_t, Q5_0>{}); return true;
    case Q5_1: f(std::integral_constant<int64_t, Q5_1>{}); return true;
    case Q4_K: f(std::integral_constant<int64_t, Q4_K>{}); return true;
    case Q5_K: f(std::integral_constant<int64_t, Q5_K>{}); return true;
    case Q6_K: f(std::integral_constant<int64_t, Q6_K>{}); return true;
  }
  return false;
}

#if KV_AVX2
inline __m256i nibbles_lo(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
inline __m256i nibbles_hi(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }
// 16 bytes of nibble pairs -> 32 values: low nibbles are elements 0-15, high nibbles 16-31 (Q4_0/Q4_1/Q5_x)
inline __m256i nibbles_32(const uint8_t* p) {
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(t, 4), m), _mm_and_si128(t, m));
}
// 32 bits -> 32 bytes, 0x10 where bit j of qh is set (the fifth bit of Q5_0/Q5_1 quants)
inline __m256i bits_32(const uint8_t* p) {
  uint32_t qh; std::memcpy(&qh, p, 4);
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(int(qh)),  // byte j <- byte j/8 of qh
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
  const __m256i sel = _mm256_set1_epi64x(int64_t(0x8040201008040201ULL));  // byte j tests bit j%8
  const __m256i on = _mm256_cmpeq_epi8(_mm256_and_si256(spread, sel), sel);
  return _mm256_and_si256(on, _mm256_set1_epi8(0x10));
}

// One block unpacked into NG groups of 32 int8 with  w = s * q + mn  (s and mn per 16 values, for
// Q6_K's 16-value sub-blocks). Formats with an offset keep q unsigned (Q4_0's q - 8 becomes q with
// mn = -8 d): the integer dot then needs no sign fix-up, and mn meets the activations' block sums.
template <int64_t TY> struct Fmt;
template <> struct Fmt<Q8_0> { static constexpr int NG = 1, BYTES = 34; static constexpr bool MIN = false, SIGNED = true;
  static void unpack(const uint8_t* p, __m256i* q, __m256* s, float (*)[2]) {
    q[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2)); s[0] = _mm256_set1_ps(fp16(p)); } };
template <> struct Fmt<Q4_0> { static constexpr int NG = 1, BYTES = 18; static constexpr bool MIN = true, SIGNED = false;
  static void unpack(const uint8_t* p, __m256i* q, __m256* s, float (*mn)[2]) {
    const float d = fp16(p);
    q[0] = nibbles_32(p + 2); s[0] = _mm256_set1_ps(d); mn[0][0] = mn[0][1] = -8.f * d; } };
template <> struct Fmt<Q4_1> { static constexpr int NG = 1, BYTES = 20; static constexpr bool MIN = true, SIGNED = false;
  static void unpack(const uint8_t* p, __m256i* q, __m256* s, float (*mn)[2]) {
    q[0] = nibbles_32(p + 4); s[0] = _mm256_set1_ps(fp16(p)); mn[0][0] = mn[0][1] = fp16(p + 2); } };
template <> struct Fmt<Q5_0> { static constexpr int NG = 1, BYTES = 22; static constexpr bool MIN = true, SIGNED = false;
  static void unpack(const uint8_t* p, __m256i* q, __m256* s, float (*mn)[2]) {
    const float d = fp16(p);
    q[0] = _mm256_or_si256(nibbles_32(p + 6), bits_32(p + 2)); s[0] = _mm256_set1_ps(d); mn[0][0] = mn[0][1] = -16.f * d; } };
template <> struct Fmt<Q5_1> { static constexpr int NG = 1, BYTES = 24; static constexpr bool MIN = true, SIGNED = false;
  static void unpack(const uint8_t* p, __m256i* q, __m256* s, float (*mn)[2]) {
    q[0] = _mm256_or_si256(nibbles_32(p + 8), bits_32(p + 4)); s[0] = _mm256_set1_ps(fp16(p));
    mn[0][0] = mn[0][1] = fp16(p + 2); } };
template <int64_t TY> inline void k4_scales(const uint8_t* p, __m256* s, float (*mn)[2]) {
  const float d = fp16(p), dmin = fp16(p + 2);
  for (int g = 0; g < 8; ++g) {
    int sc, m; scale_min_k4(g, p + 4, sc, m);
    s[g] = _mm256_set1_ps(d * sc); mn[g][0] = mn[g][1] = -dmin * m;
  }
}
template <> struct Fmt<Q4_K> { static constexpr int NG = 8, BYTES = 144; static constexpr bool MIN = true, SIGNED = false;
  static void unpack(const uint8_t* p, __m256i* q, __m256* s, float (*mn)[2]) {
    k4_scales<Q4_K>(p, s, mn);
    for (int j = 0; j < 4; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 + 32 * j));
      q[2 * j] = nibbles_lo(v); q[2 * j + 1] = nibbles_hi(v);
    } } };
template <> struct Fmt<Q5_K> { static constexpr int NG = 8, BYTES = 176; static constexpr bool MIN = true, SIGNED = false;
  static void unpack(const uint8_t* p, __m256i* q, __m256* s, float (*mn)[2]) {
    k4_scales<Q5_K>(p, s, mn);
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16));
    const __m256i one = _mm256_set1_epi8(1);
    for (int j = 0; j < 4; ++j) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 48 + 32 * j));
      const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), one), 4);
      const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j + 1), one), 4);
      q[2 * j] = _mm256_or_si256(nibbles_lo(v), h0); q[2 * j + 1] = _mm256_or_si256(nibbles_hi(v), h1);
    } } };
template <> struct Fmt<Q6_K> { static constexpr int NG = 8, BYTES = 210; static constexpr bool MIN = true, SIGNED = false;
  static void unpack(const uint8_t* p, __m256i* q, __m256* s, float (*mn)[2]) {
    const float d = fp16(p + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
    const __m256i three = _mm256_set1_epi8(3);
    for (int h = 0; h < 2; ++h) {  // 128-element halves
      const uint8_t* ql = p + 64 * h;
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * h));
      const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
      const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
      const __m256i lo[4] = {nibbles_lo(l0), nibbles_lo(l1), nibbles_hi(l0), nibbles_hi(l1)};
      for (int r = 0; r < 4; ++r) {
        const int g = 4 * h + r;
        const float s0 = d * sc[8 * h + 2 * r], s1 = d * sc[8 * h + 2 * r + 1];
        q[g] = _mm256_or_si256(lo[r], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * r), three), 4));
        s[g] = _mm256_setr_m128(_mm_set1_ps(s0), _mm_set1_ps(s1));
        mn[g][0] = -32.f * s0; mn[g][1] = -32.f * s1;  // q6 - 32 as q6 with an offset
      }
    } } };

// float32 activations: weights unpacked to int8 as above, then widened to float32 in registers and
// multiplied with x as it is. No activation rounding (the result is float32 GEMV accuracy), about a
// third more instructions per weight than the int8 dot. xs: sums of x per 16 values, for the minima.
template <int64_t TY, int R>
void fdotq_t(const uint8_t* w, int64_t nblk, const float* x, int64_t K, const float* xs, float* y, int64_t N,
             int64_t n0, int64_t n1) {
  using F = Fmt<TY>;
  const int64_t rb = nblk * F::BYTES;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * rb;
    __m256 acc[R][2];
    float accm[R];
    for (int m = 0; m < R; ++m) { acc[m][0] = acc[m][1] = _mm256_setzero_ps(); accm[m] = 0.f; }
    for (int64_t b = 0; b < nblk; ++b) {
      __m256i q[F::NG]; __m256 s[F::NG]; float mn[F::NG][2];
      F::unpack(row + b * F::BYTES, q, s, mn);
      for (int g = 0; g < F::NG; ++g) {
        const int64_t xb = b * F::NG + g;
        const __m128i lo = _mm256_castsi256_si128(q[g]), hi = _mm256_extracti128_si256(q[g], 1);
        __m256 qf[4];
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int i = 0; i < 4; ++i)
          qf[i] = _mm256_cvtepi32_ps(F::SIGNED ? _mm256_cvtepi8_epi32(parts[i]) : _mm256_cvtepu8_epi32(parts[i]));
        const __m256 s0 = _mm256_permute2f128_ps(s[g], s[g], 0x00), s1 = _mm256_permute2f128_ps(s[g], s[g], 0x11);
        for (int m = 0; m < R; ++m) {
          const float* xg = x + m * K + xb * 32;
          __m256 t0 = _mm256_mul_ps(qf[0], _mm256_loadu_ps(xg));
          __m256 t1 = _mm256_mul_ps(qf[2], _mm256_loadu_ps(xg + 16));
          t0 = _mm256_fmadd_ps(qf[1], _mm256_loadu_ps(xg + 8), t0);
          t1 = _mm256_fmadd_ps(qf[3], _mm256_loadu_ps(xg + 24), t1);
          acc[m][0] = _mm256_fmadd_ps(t0, s0, acc[m][0]);
          acc[m][1] = _mm256_fmadd_ps(t1, s1, acc[m][1]);
          if (F::MIN) accm[m] += mn[g][0] * xs[m * (K / 16) + 2 * xb] + mn[g][1] * xs[m * (K / 16) + 2 * xb + 1];
        }
      }
    }
    for (int m = 0; m < R; ++m) y[m * N + n] = hsum(_mm256_add_ps(acc[m][0], acc[m][1])) + accm[m];
  }
}

// u . x in groups of 4 bytes added to acc (u unsigned, x signed; |u x| pairs stay under 2^15 for the
// quants here: q <= 63, or |q| <= 127 for Q8_0, times |x| <= 128)
inline __m256i dpb(__m256i acc, __m256i u, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, x);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, x);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)));
#endif
}
// 256 (q . hi) + (q . lo) = q . X, exact in int32 (|q . X| <= 32 * 127 * 32512 < 2^31), as 8 float lanes
template <bool SIGNED>
inline __m256 dot16(__m256i q, const int8_t* hi, const int8_t* lo) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi));
  __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo));
  if constexpr (SIGNED) { h = _mm256_sign_epi8(h, q); l = _mm256_sign_epi8(l, q); q = _mm256_sign_epi8(q, q); }
  const __m256i z = _mm256_setzero_si256();
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_slli_epi32(dpb(z, q, h), 8), dpb(z, q, l)));
}

// One group of quants q against row r's group xb, as 8 float lanes of the integer dot, and the lanes' scales.
template <bool SIGNED>
inline __m256 gdot(__m256i q, const QRow& r, int64_t xb) {
  const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r.q + xb * 32));
  return SIGNED ? dot32(q, xq) : dotu32(q, xq);
}
template <bool SIGNED>
inline __m256 gdot(__m256i q, const Q16Row& r, int64_t xb) { return dot16<SIGNED>(q, r.hi + xb * 32, r.lo + xb * 32); }
inline __m256 gscale(const QRow& r, int64_t xb) { return _mm256_set1_ps(r.d[xb]); }
inline __m256 gscale(const Q16Row& r, int64_t xb) { return _mm256_loadu_ps(r.dl + xb * 8); }

// Integer-dot kernel (int8 or q16 rows), one group (ymm) at a time: the AVX2 path, and the odd tail of the
// AVX-512 one. y[m0 .. m0+R) for weight rows [n0, n1), R <= MB activation rows, one accumulator each.
// (Two chains alternated by a runtime index looked free but kept the accumulators on the stack: a store and
// a reload around every FMA, seen in the assembly, 1.2-1.6x slower. Every kernel here keeps one per row.)
template <int64_t TY, int R, typename Row>
void idot_t(const uint8_t* w, int64_t nblk, const Row* xr, float* y, int64_t N, int64_t n0, int64_t n1) {
  using F = Fmt<TY>;
  const int64_t rb = nblk * F::BYTES;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * rb;
    __m256 acc[R];
    float accm[R];
    for (int m = 0; m < R; ++m) { acc[m] = _mm256_setzero_ps(); accm[m] = 0.f; }
    for (int64_t b = 0; b < nblk; ++b) {
      __m256i q[F::NG]; __m256 s[F::NG]; float mn[F::NG][2];
      F::unpack(row + b * F::BYTES, q, s, mn);
      for (int g = 0; g < F::NG; ++g) {
        const int64_t xb = b * F::NG + g;
        for (int m = 0; m < R; ++m) {
          acc[m] = _mm256_fmadd_ps(gdot<F::SIGNED>(q[g], xr[m], xb), _mm256_mul_ps(s[g], gscale(xr[m], xb)), acc[m]);
          if (F::MIN) accm[m] += mn[g][0] * xr[m].s[2 * xb] + mn[g][1] * xr[m].s[2 * xb + 1];
        }
      }
    }
    for (int m = 0; m < R; ++m) y[m * N + n] = hsum(acc[m]) + accm[m];
  }
}

#if KV_AVX512 && defined(__AVX512VNNI__)
// q16 activations with AVX-512 VNNI: two groups (64 weights) per zmm, so every dot, conversion and FMA
// covers twice the weights of the AVX2 path. Groups pair up inside a block (K-quants: 8 groups) or across
// two blocks (32-weight formats); an odd last block goes through one ymm group.
template <bool SIGNED>
inline __m512 dot16x2(__m512i q, const int8_t* hi, const int8_t* lo) {
  __m512i h = _mm512_loadu_si512(hi), l = _mm512_loadu_si512(lo);
  if constexpr (SIGNED) {  // AVX-512BW has no sign_epi8: negate x where q < 0, then take |q|
    const __mmask64 neg = _mm512_movepi8_mask(q);
    const __m512i z = _mm512_setzero_si512();
    h = _mm512_mask_sub_epi8(h, neg, z, h); l = _mm512_mask_sub_epi8(l, neg, z, l); q = _mm512_abs_epi8(q);
  }
  const __m512i z = _mm512_setzero_si512();
  return _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(z, q, h), 8),
                                             _mm512_dpbusd_epi32(z, q, l)));
}
inline __m512i cat256(__m256i a, __m256i b) { return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1); }
inline __m512 cat256(__m256 a, __m256 b) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(a)), _mm256_castps_pd(b), 1));
}

// Two Q4_0 / Q4_1 blocks (at p and p + BYTES) as 64 quants in element order, in one zmm: the 32 bytes of
// nibble pairs split into low and high nibbles, then 128-bit lanes ordered [lo0, hi0, lo1, hi1].
template <int BYTES, int QS>
inline __m512i nibbles_64(const uint8_t* p) {
  const __m256i v = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + QS))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + BYTES + QS)), 1);
  const __m256i m = _mm256_set1_epi8(0x0F);
  const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m)),
                                       _mm256_and_si256(_mm256_srli_epi16(v, 4), m), 1);
  return _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));
}

template <int64_t TY, int R>
void q16dot512_t(const uint8_t* w, int64_t nblk, const Q16Row* xr, float* y, int64_t N, int64_t n0, int64_t n1) {
  using F = Fmt<TY>;
  constexpr int BP = F::NG == 1 ? 2 : 1;  // blocks unpacked per step: an even number of groups
  constexpr int NG = BP * F::NG;
  const int64_t rb = nblk * F::BYTES, nsteps = nblk / BP;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * rb;
    __m512 acc[R];
    float accm[R];
    for (int m = 0; m < R; ++m) { acc[m] = _mm512_setzero_ps(); accm[m] = 0.f; }
    if constexpr (TY == Q4_0 || TY == Q4_1) {  // the common 4-bit formats: both blocks unpacked at once
      constexpr int QS = TY == Q4_0 ? 2 : 4;
      const __m512i z = _mm512_setzero_si512();
      for (int64_t st = 0; st < nsteps; ++st) {
        const uint8_t* p = row + st * 2 * F::BYTES;
        const __m512i qq = nibbles_64<F::BYTES, QS>(p);
        const __m512 ss = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(fp16(p)), _mm512_set1_ps(fp16(p + F::BYTES)));
        const int64_t xb = st * 2;
        for (int m = 0; m < R; ++m) {
          const __m512i h = _mm512_loadu_si512(xr[m].hi + xb * 32), l = _mm512_loadu_si512(xr[m].lo + xb * 32);
          __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(_mm512_dpbusd_epi32(z, qq, h), 8), _mm512_dpbusd_epi32(z, qq, l));
          if constexpr (TY == Q4_0)  // (q - 8) . X = q . X - 8 sum(X), per lane, exact: no float minimum term
            dot = _mm512_sub_epi32(dot, _mm512_slli_epi32(_mm512_loadu_si512(xr[m].ls + xb * 8), 3));
          acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ss, _mm512_loadu_ps(xr[m].dl + xb * 8)),
                                   acc[m]);
          if constexpr (TY == Q4_1) {
            const float* xs = xr[m].s + 2 * xb;
            accm[m] += fp16(p + 2) * (xs[0] + xs[1]) + fp16(p + F::BYTES + 2) * (xs[2] + xs[3]);
          }
        }
      }
    } else
    for (int64_t st = 0; st < nsteps; ++st) {
      __m256i q[NG]; __m256 s[NG]; float mn[NG][2];
      for (int i = 0; i < BP; ++i)
        F::unpack(row + (st * BP + i) * F::BYTES, q + i * F::NG, s + i * F::NG, mn + i * F::NG);
      for (int g = 0; g < NG; g += 2) {
        const int64_t xb = st * NG + g;
        const __m512i qq = cat256(q[g], q[g + 1]);
        const __m512 ss = cat256(s[g], s[g + 1]);
        for (int m = 0; m < R; ++m) {
          const __m512 dq = dot16x2<F::SIGNED>(qq, xr[m].hi + xb * 32, xr[m].lo + xb * 32);
          acc[m] = _mm512_fmadd_ps(dq, _mm512_mul_ps(ss, _mm512_loadu_ps(xr[m].dl + xb * 8)), acc[m]);
          if (F::MIN)
            accm[m] += mn[g][0] * xr[m].s[2 * xb] + mn[g][1] * xr[m].s[2 * xb + 1]
                     + mn[g + 1][0] * xr[m].s[2 * xb + 2] + mn[g + 1][1] * xr[m].s[2 * xb + 3];
        }
      }
    }
    float tail[R] = {};
    if (nblk % BP) {  // the odd last block of a 32-weight format
      const int64_t b = nblk - 1;
      __m256i q[1]; __m256 s[1]; float mn[1][2];
      F::unpack(row + b * F::BYTES, q, s, mn);
      for (int m = 0; m < R; ++m) {
        tail[m] = hsum(_mm256_mul_ps(gdot<F::SIGNED>(q[0], xr[m], b), _mm256_mul_ps(s[0], gscale(xr[m], b))));
        if (F::MIN) tail[m] += mn[0][0] * xr[m].s[2 * b] + mn[0][1] * xr[m].s[2 * b + 1];
      }
    }
    for (int m = 0; m < R; ++m)
      y[m * N + n] = _mm512_reduce_add_ps(acc[m]) + accm[m] + tail[m];
  }
}
#endif

#if KV_AVX512
// 4- and 5-bit formats with AVX-512: a group's 16 (or 32) possible weight values s*j + mn form a
// table in one (two) zmm registers; the quants index it (vpermps), giving float32 weights without
// a conversion or a separate minimum term, then one FMA per 16 weights. Exact float32 products, as
// in the AVX2 path, in about half the instructions.
template <int64_t TY, int R>
void fdotq_lut_t(const uint8_t* w, int64_t nblk, const float* x, int64_t K, float* y, int64_t N, int64_t n0,
                 int64_t n1) {
  using F = Fmt<TY>;
  constexpr bool FIVE = TY == Q5_0 || TY == Q5_1 || TY == Q5_K;
  const int64_t rb = nblk * F::BYTES;
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 iota16 = _mm512_add_ps(iota, _mm512_set1_ps(16.f));
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * rb;
    __m512 acc[R][2];  // one chain per half-group (see idot_t)
    for (int m = 0; m < R; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nblk; ++b) {
      __m256i q[F::NG]; __m256 s[F::NG]; float mn[F::NG][2];
      F::unpack(row + b * F::BYTES, q, s, mn);
      for (int g = 0; g < F::NG; ++g) {
        const __m512 sv = _mm512_set1_ps(_mm256_cvtss_f32(s[g])), mv = _mm512_set1_ps(mn[g][0]);
        const __m512 lut = _mm512_fmadd_ps(iota, sv, mv);
        const __m512i i0 = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(q[g]));
        const __m512i i1 = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(q[g], 1));
        __m512 w0, w1;
        if constexpr (FIVE) {
          const __m512 lut16 = _mm512_fmadd_ps(iota16, sv, mv);
          w0 = _mm512_permutex2var_ps(lut, i0, lut16);
          w1 = _mm512_permutex2var_ps(lut, i1, lut16);
        } else {
          w0 = _mm512_permutexvar_ps(i0, lut);
          w1 = _mm512_permutexvar_ps(i1, lut);
        }
        const int64_t xo = (b * F::NG + g) * 32;
        for (int m = 0; m < R; ++m) {
          acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + xo), acc[m][0]);
          acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + xo + 16), acc[m][1]);
        }
      }
    }
    for (int m = 0; m < R; ++m)
      y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
  }
}

#endif

#endif

// Portable twin of the integer kernels (int8 or q16 rows): unpack a group in memory (q signed, mn the format's
// separate minimum), dot in int32, so every build computes the same integer products.
template <typename Row>
void idot_rows_scalar(int64_t t, const uint8_t* w, int64_t K, const Row* xr, int64_t M, float* y, int64_t N,
                      int64_t n0, int64_t n1) {
  const Layout L = layout(t);
  const int64_t nblk = K / L.block, ng = L.block / 32, rb = nblk * L.bytes;
  Group gr;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * rb;
    float acc[MAXM] = {0};
    for (int64_t b = 0; b < nblk; ++b)
      for (int g = 0; g < ng; ++g) {
        unpack(t, row + b * L.bytes, g, gr);
        const int64_t xb = b * ng + g;
        for (int64_t m = 0; m < M; ++m) {
          int s0 = 0, s1 = 0;
          for (int i = 0; i < 16; ++i) s0 += int(gr.q[i]) * xint(xr[m], xb, i);
          for (int i = 16; i < 32; ++i) s1 += int(gr.q[i]) * xint(xr[m], xb, i);
          acc[m] += (gr.s[0] * float(s0) + gr.s[1] * float(s1)) * xscale(xr[m], xb)
                    + gr.mn * (xr[m].s[2 * xb] + xr[m].s[2 * xb + 1]);
        }
      }
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = acc[m];
  }
}

// The integer kernels over weight rows [n0, n1): q16 rows take AVX-512 VNNI pairs of groups where built.
template <typename Row>
void idot_rows(int64_t t, const uint8_t* w, int64_t K, const Row* xr, int64_t M, float* y, int64_t N,
               int64_t n0, int64_t n1) {
#if KV_AVX2
  const int64_t nblk = K / layout(t).block;
  const bool done = by_format(t, [&](auto TY) {
    weight_tiles(M, n0, n1, [&](auto R, int64_t m0, int64_t t0, int64_t t1) {
      constexpr int64_t ty = decltype(TY)::value;
      constexpr int r = decltype(R)::value;
#if KV_AVX512 && defined(__AVX512VNNI__)
      if constexpr (std::is_same_v<Row, Q16Row>) {
        q16dot512_t<ty, r>(w, nblk, xr + m0, y + m0 * N, N, t0, t1);
        return;
      }
#endif
      idot_t<ty, r>(w, nblk, xr + m0, y + m0 * N, N, t0, t1);
    });
  });
  if (done) return;
#endif
  idot_rows_scalar(t, w, K, xr, M, y, N, n0, n1);
}

// float32-activation path over quantized W (the integer kernels' twin without the integer step); false: no AVX2 build.
bool fdotq_rows(int64_t t, const uint8_t* w, int64_t K, const float* x, const float* xs, int64_t M, float* y,
                int64_t N, int64_t n0, int64_t n1) {
#if KV_AVX2
  const int64_t nblk = K / layout(t).block;
  return by_format(t, [&](auto TY) {
    constexpr int64_t ty = decltype(TY)::value;
    weight_tiles(M, n0, n1, [&](auto R, int64_t m0, int64_t t0, int64_t t1) {
      constexpr int r = decltype(R)::value;
#if KV_AVX512
      if constexpr (ty == Q4_0 || ty == Q4_1 || ty == Q4_K || ty == Q5_0 || ty == Q5_1 || ty == Q5_K) {
        fdotq_lut_t<ty, r>(w, nblk, x + m0 * K, K, y + m0 * N, N, t0, t1);
        return;
      }
#endif
      fdotq_t<ty, r>(w, nblk, x + m0 * K, K, xs + m0 * (K / 16), y + m0 * N, N, t0, t1);
    });
  });
#else
  return false;
#endif
}

// F16 / BF16 weights, f32 activations: R <= MB rows of x per pass, 4 accumulator chains for one row.
#if KV_AVX2
inline __m256 cvt8(int64_t t, const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return t == F16 ? _mm256_cvtph_ps(h) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
// 8 weights of row element type t starting at element k (F32 rows are read as floats)
inline __m256 load8(int64_t t, const uint16_t* row, int64_t k) {
  return t == F32 ? _mm256_loadu_ps(reinterpret_cast<const float*>(row) + k) : cvt8(t, row + k);
}
template <int R>
void fdot_t(int64_t t, const uint16_t* w, int64_t K, const float* x, float* y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int C = R == 1 ? 4 : 1;  // independent chains per row
  const int64_t stride = t == F32 ? 2 * K : K;  // row length in uint16 units
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = w + n * stride;
    __m256 acc[R][C];
    for (int m = 0; m < R; ++m) for (int c = 0; c < C; ++c) acc[m][c] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * C <= K; k += 8 * C)
      for (int c = 0; c < C; ++c) {
        const __m256 wf = load8(t, row, k + 8 * c);
        for (int m = 0; m < R; ++m) acc[m][c] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + m * K + k + 8 * c), acc[m][c]);
      }
    for (int m = 0; m < R; ++m) {
      __m256 a = acc[m][0];
      for (int c = 1; c < C; ++c) a = _mm256_add_ps(a, acc[m][c]);
      float sum = hsum(a);
      for (int64_t kk = k; kk < K; ++kk) sum += wval(t, row, kk) * x[m * K + kk];
      y[m * N + n] = sum;
    }
  }
}
#endif

void fdot_rows(int64_t t, const uint16_t* w, int64_t K, const float* x, int64_t M, float* y, int64_t N,
               int64_t n0, int64_t n1) {
#if KV_AVX2
  row_blocks(M, [&](auto R, int64_t m0) {
    fdot_t<decltype(R)::value>(t, w, K, x + m0 * K, y + m0 * N, N, n0, n1);
  });
#else
  const int64_t stride = t == F32 ? 2 * K : K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = w + n * stride;
    for (int64_t m = 0; m < M; ++m) {
      float sum = 0.f;
      for (int64_t k = 0; k < K; ++k) sum += wval(t, row, k) * x[m * K + k];
      y[m * N + n] = sum;
    }
  }
#endif
}

// "x16": Q4_0 / Q4_1 / Q8_0 blocks with 16 rows interleaved, llama.cpp's repacking idea (its Q4_0 8x8 layout) in a
// layout of our own. Why: at decode a row-major Q4_0 kernel spends ~28 instructions per 64 weights (unpacking,
// a scale per block broadcast and blended, the dot, a conversion), so it ran at ~17 GB/s where Q8_0 reached the
// memory's ~27. Interleaved, one instruction serves 16 rows: per tile of 16 rows and block b, the 16 rows'
// scales (fp16) as one vector, for Q4_1 their minima, then the quants as 4 chunks of 64 bytes, chunk c holding
// bytes 4c..4c+3 of each row's 16 nibble pairs, row after row. Split into nibbles, int32 lane j of chunk c holds
// row j's values 4c..4c+3 (low nibbles) or 16+4c..19+4c (high), so one dpbusd against 4 activation bytes
// broadcast does 64 multiply-adds for 16 rows, and lane j ends the block as row j's integer dot, scaled by a
// vector of the 16 rows' scales. Q8_0: 8 chunks of each row's 32 bytes, stored offset by 128 (w ^ 0x80 = w + 128,
// unsigned): see x16dot_t.
// Same bytes per block as the file (18, 20 or 34); rows n % 16 == 0 only.
// Q4_0 and Q8_0 tile-blocks (288 and 544 bytes: 32 of scales, then the quants) go in pairs, the two blocks'
// scales first (one 64-byte line), then block b's quants, then block b+1's: every 64-byte load of quants is
// then one cache line, where one block after another put every other block's quants across two lines.
// From DRAM (2 threads, q16, the two layouts alternated in one process): Q4_0 2816x1024 64.0 -> 61.3 us,
// 1024x2816 66.7 -> 65.5; Q8_0 about 1%. A last unpaired block (an odd count) keeps the plain order.
inline int64_t x16_hdr(int64_t t) { return t == Q4_1_X16 ? 64 : 32; }  // scales (and minima) of a tile-block
inline int64_t x16_chunks(int64_t t) { return t == Q8_0_X16 ? 8 : 4; }  // 64-byte chunks of quants
inline int64_t x16_qs(int64_t t) { return t == Q4_1_X16 ? 4 : 2; }  // where a file block's quants start
// Byte offsets, from its tile, of block b's scales and of its quants (nblk blocks a tile).
template <int64_t H, int64_t QB, bool PAIRED>
inline void x16_where(int64_t nblk, int64_t b, int64_t& hdr, int64_t& qs) {
  if (!PAIRED || (b % 2 == 0 && b == nblk - 1)) { hdr = b * (H + QB); qs = hdr + H; return; }
  const int64_t base = (b / 2) * 2 * (H + QB), odd = b % 2;
  hdr = base + odd * H;
  qs = base + 2 * H + odd * QB;
}
inline void x16_where(int64_t t, int64_t nblk, int64_t b, int64_t& hdr, int64_t& qs) {
  if (t == Q4_1_X16) x16_where<64, 256, false>(nblk, b, hdr, qs);
  else if (t == Q8_0_X16) x16_where<32, 512, true>(nblk, b, hdr, qs);
  else x16_where<32, 256, true>(nblk, b, hdr, qs);
}

// Row n of an x16 matrix as the file's blocks (nblk blocks of the base type) into out.
void x16_row(int64_t t, const uint8_t* w, int64_t nblk, int64_t n, uint8_t* out) {
  const int64_t hdr = x16_hdr(t), nc = x16_chunks(t), tb = hdr + 64 * nc, bb = layout(t).bytes, j = n % 16;
  const int64_t qs = x16_qs(t);
  const uint8_t* tile = w + (n / 16) * nblk * tb;
  for (int64_t b = 0; b < nblk; ++b) {
    int64_t ho, qo;
    x16_where(t, nblk, b, ho, qo);
    uint8_t* o = out + b * bb;
    std::memcpy(o, tile + ho + 2 * j, 2);
    if (t == Q4_1_X16) std::memcpy(o + 2, tile + ho + 32 + 2 * j, 2);
    for (int c = 0; c < nc; ++c) std::memcpy(o + qs + 4 * c, tile + qo + 64 * c + 4 * j, 4);
    if (t == Q8_0_X16)
      for (int i = 0; i < 32; ++i) o[qs + i] ^= 0x80;  // back to signed
  }
}

// The file's Q4_0 / Q4_1 / Q8_0 blocks (n, k) interleaved as x16 (type: the x16 id), into out (uint8, the same
// size, not overlapping w) or a new tensor.
at::Tensor repack_x16(const at::Tensor& w, int64_t t, int64_t n, int64_t k, const c10::optional<at::Tensor>& out_in) {
  TORCH_CHECK(is_x16(t), "kvbench repack_x16: type must be an x16 id");
  const at::Tensor src = w.contiguous();
  const int64_t base = x16_base(t), nblk = k / 32, bb = layout(t).bytes, hdr = x16_hdr(t), nc = x16_chunks(t);
  const int64_t tb = hdr + 64 * nc, qs = x16_qs(t);
  TORCH_CHECK(k % 32 == 0 && n % 16 == 0 && src.numel() == n * nblk * bb && src.scalar_type() == at::kByte,
              "kvbench repack_x16: (", n, ", ", k, ") blocks of GGML type ", base, " with n % 16 == 0");
  at::Tensor out = out_in.has_value() ? *out_in : at::empty_like(src);
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kByte && out.numel() == src.numel() && out.is_cpu(),
              "kvbench repack_x16: out must be ", src.numel(), " contiguous bytes on the CPU");
  const uint8_t* sp = src.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, n / 16, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t tl = t0; tl < t1; ++tl)
      for (int64_t j = 0; j < 16; ++j) {
        const uint8_t* row = sp + (tl * 16 + j) * nblk * bb;
        uint8_t* tile = op + tl * nblk * tb;
        for (int64_t b = 0; b < nblk; ++b) {
          int64_t ho, qo;
          x16_where(t, nblk, b, ho, qo);
          const uint8_t* blk = row + b * bb;
          std::memcpy(tile + ho + 2 * j, blk, 2);
          if (base == Q4_1) std::memcpy(tile + ho + 32 + 2 * j, blk + 2, 2);
          for (int c = 0; c < nc; ++c) std::memcpy(tile + qo + 64 * c + 4 * j, blk + qs + 4 * c, 4);
          if (base == Q8_0)
            for (int c = 0; c < nc; ++c)
              for (int i = 0; i < 4; ++i) tile[qo + 64 * c + 4 * j + i] ^= 0x80;  // unsigned: w + 128
        }
      }
  });
  return out;
}

#if KV_AVX512 && defined(__AVX512VNNI__)
#define KV_X16 1
// Integer dots of R activation rows with tiles [tl0, tl1) of an x16 matrix. Row kinds: q16 (hi and lo halves,
// two dots) or int8. bsum[m][b]: the integer sum of row m's block b (Q4_0's offset of 8 comes off in integers,
// as in the row-major kernels). Q4_1's minima meet the float block sums, one FMA per block for all 16 rows.
// Q8_0's quants are signed and dpbusd multiplies unsigned by signed bytes, so the layout stores them offset by
// 128 (unsigned, repack_x16) and 128 times the activations' block sum comes off in integers, as Q4_0's 8 does.
// (Offsetting the activations instead cost a dpbusd per chunk for the weights' block sums: 24 instead of 16 per
// tile-block at q16, and the Q8_0 kernel ran at 30 GB/s where Q4_0's ran at the memory's rate.)
template <int64_t TY, int R, typename Row>
void x16dot_t(const uint8_t* w, int64_t nblk, const Row* xr, const int32_t* const* bsum, float* y, int64_t N,
              int64_t tl0, int64_t tl1) {
  constexpr bool Q8 = TY == Q8_0_X16;
  constexpr int64_t HDR = TY == Q4_1_X16 ? 64 : 32, QB = Q8 ? 512 : 256, TB = HDR + QB;
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t tl = tl0; tl < tl1; ++tl) {
    const uint8_t* tile = w + tl * nblk * TB;
    __m512 acc[R];
    for (int m = 0; m < R; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nblk; ++b) {
      int64_t ho, qo;
      x16_where<HDR, QB, TY != Q4_1_X16>(nblk, b, ho, qo);
      const uint8_t* p = tile + ho;  // scales (Q4_1: then minima)
      const uint8_t* qp = tile + qo;
      __m512i q[8];
      if constexpr (Q8) {
        for (int c = 0; c < 8; ++c) q[c] = _mm512_loadu_si512(qp + 64 * c);
      } else {
        for (int c = 0; c < 4; ++c) {
          const __m512i v = _mm512_loadu_si512(qp + 64 * c);
          q[c] = _mm512_and_si512(v, low);
          q[4 + c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
      }
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      for (int m = 0; m < R; ++m) {
        __m512i dot = _mm512_setzero_si512();
        float dx;
        if constexpr (std::is_same_v<Row, Q16Row>) {
          const int32_t* hi = reinterpret_cast<const int32_t*>(xr[m].hl + b * 64);
          const int32_t* lo = hi + 8;
          // four chains of 4 dpbusd rather than two of 8: each dpbusd waits for its accumulator (weights in L3,
          // 2816x1024 Q4_0: 31.8 -> 27.6 us; from DRAM the memory bounds it either way)
          __m512i dh = _mm512_setzero_si512(), dh1 = _mm512_setzero_si512(), dot1 = _mm512_setzero_si512();
          for (int i = 0; i < 8; i += 2) {
            dh = _mm512_dpbusd_epi32(dh, q[i], _mm512_set1_epi32(hi[i]));
            dot = _mm512_dpbusd_epi32(dot, q[i], _mm512_set1_epi32(lo[i]));
            dh1 = _mm512_dpbusd_epi32(dh1, q[i + 1], _mm512_set1_epi32(hi[i + 1]));
            dot1 = _mm512_dpbusd_epi32(dot1, q[i + 1], _mm512_set1_epi32(lo[i + 1]));
          }
          dh = _mm512_add_epi32(dh, dh1);  // integers: the sums are exact in any order
          dot = _mm512_add_epi32(dot, dot1);
          dot = _mm512_add_epi32(_mm512_slli_epi32(dh, 8), dot);
          dx = xr[m].d[b];
        } else {
          const int32_t* xq = reinterpret_cast<const int32_t*>(xr[m].q + b * 32);
          __m512i dot1 = _mm512_setzero_si512();
          for (int i = 0; i < 8; i += 2) {
            dot = _mm512_dpbusd_epi32(dot, q[i], _mm512_set1_epi32(xq[i]));
            dot1 = _mm512_dpbusd_epi32(dot1, q[i + 1], _mm512_set1_epi32(xq[i + 1]));
          }
          dot = _mm512_add_epi32(dot, dot1);
          dx = xr[m].d[b];
        }
        if constexpr (TY == Q4_0_X16) dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(8 * bsum[m][b]));
        if constexpr (Q8) dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(128 * bsum[m][b]));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc[m]);
        if constexpr (TY == Q4_1_X16) {
          const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
          acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xr[m].s[2 * b] + xr[m].s[2 * b + 1]), acc[m]);
        }
      }
    }
    for (int m = 0; m < R; ++m) _mm512_storeu_ps(y + m * N + tl * 16, acc[m]);
  }
}
#else
#define KV_X16 0
#endif

bool x16() { return KV_X16; }

void check_weight(const at::Tensor& w, int64_t t, int64_t n, int64_t k) {
  const Layout L = layout(t);
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.scalar_type() == at::kByte,
              "kvbench qmm: weights must be a contiguous uint8 CPU tensor");
  TORCH_CHECK(k % L.block == 0, "kvbench qmm: row length ", k, " is not a multiple of the block ", L.block);
  TORCH_CHECK(w.numel() == n * (k / L.block) * L.bytes, "kvbench qmm: ", w.numel(), " bytes do not hold ", n,
              " rows of ", k, " weights of type ", t);
  TORCH_CHECK(!is_x16(t) || n % 16 == 0, "kvbench qmm: interleaved weights have whole tiles of 16 rows");
}

at::Tensor dequant_all(const at::Tensor& w, int64_t t, int64_t n, int64_t k);

inline bool is_float(int64_t t) { return t == F32 || t == F16 || t == BF16; }

// Up to MAXM activation rows (M, K) float32, prepared once for every matrix that reads them: the fused decode
// ops below quantize a normalized row once for q, k and v together, and once for gate and up.
// act: 0 float32 activations, 1 int8 per 32 values (llama.cpp's arithmetic), 2 q16 (16-bit fixed point per
// 32 values, two int8 dots). ``quantized``: whether a quantized matrix will read them (F16/BF16/F32 rows
// always meet x as it is, so nothing else is prepared for them).
// (nb,) int32: sums of nb consecutive runs of `per` integers
template <typename I>
void block_sums(const I* v, int64_t nb, int per, int32_t* o) {
  for (int64_t b = 0; b < nb; ++b) {
    int32_t t = 0;
    for (int i = 0; i < per; ++i) t += v[b * per + i];
    o[b] = t;
  }
}

// Activations prepared for the kernels: x as float32, and for quantized weights x quantized (act 2: q16, hi and
// lo bytes, per-4 scales and integer sums; act 1: int8 and per-32 scales), with float sums per 16 values (xs)
// and integer sums per 32 (bsum). The quantized parts live in one allocation: as six tensors they cost more
// than quantizing them (a decode step prepares ~30 of these).
struct Acts {
  at::Tensor x, xs_t;
  std::vector<int32_t> buf;
  int64_t M = 0, K = 0, act = 0;
  const float* xs = nullptr;  // (M, K/16) sums of 16 values, for the minima
  Q16Row r16[MAXM];
  QRow r8[MAXM];
  const int32_t* bsum[MAXM];  // integer sum of each 32-value block (the x16 kernels' Q4_0 / Q8_0 offsets)

  Acts(const at::Tensor& x_in, int64_t act_, bool quantized) : x(x_in.to(at::kFloat).contiguous()), act(act_) {
    TORCH_CHECK(act >= 0 && act <= 2, "kvbench qmm: act must be 0 (float32), 1 (int8) or 2 (q16)");
    TORCH_CHECK(x.dim() == 2, "kvbench qmm: activations must be (M, K)");
    M = x.size(0);
    K = x.size(1);
    TORCH_CHECK(M <= MAXM, "kvbench qmm: at most ", MAXM, " rows per call (dequantize for larger batches)");
    if (!quantized || M == 0) return;
    const float* xp = x.data_ptr<float>();
    const int64_t MK = M * K;
    if (act == 0) {
      xs_t = x.view({M, K / 16, 16}).sum(-1).contiguous();  // (M, K/16), for the minima
      xs = xs_t.data_ptr<float>();
      return;
    }
    // in int32 units: act 2: hi, lo (MK/4 each), dl (MK/4 floats), xs (MK/16), ls (MK/4), bsum (MK/32), hl (MK/2),
    // d (MK/32 floats); act 1: q (MK/4), d (MK/32 floats), xs (MK/16), bsum (MK/32)
    buf.resize(act == 2 ? MK / 4 * 4 + MK / 16 + MK / 32 + MK / 2 + MK / 32 : MK / 4 + MK / 32 + MK / 16 + MK / 32);
    int32_t* p = buf.data();
    auto take = [&](int64_t n) { int32_t* r = p; p += n; return r; };
    if (act == 2) {
      int8_t* hi = reinterpret_cast<int8_t*>(take(MK / 4));
      int8_t* lo = reinterpret_cast<int8_t*>(take(MK / 4));
      float* dl = reinterpret_cast<float*>(take(MK / 4));
      float* s = reinterpret_cast<float*>(take(MK / 16));
      int32_t* ls = take(MK / 4);
      int32_t* bs = take(MK / 32);
      int8_t* hl = reinterpret_cast<int8_t*>(take(MK / 2));
      float* d = reinterpret_cast<float*>(take(MK / 32));
      quantize16_rows(xp, M, K, hi, lo, dl, s, ls, hl, d);
      for (int64_t m = 0; m < M; ++m)
        r16[m] = {hi + m * K, lo + m * K, dl + m * (K / 4), s + m * (K / 16), ls + m * (K / 4), hl + 2 * m * K,
                  d + m * (K / 32)};
      block_sums(ls, M * (K / 32), 8, bs);  // ls holds sums of 4 values
      xs = s;
      for (int64_t m = 0; m < M; ++m) bsum[m] = bs + m * (K / 32);
    } else {
      int8_t* q = reinterpret_cast<int8_t*>(take(MK / 4));
      float* d = reinterpret_cast<float*>(take(MK / 32));
      float* s = reinterpret_cast<float*>(take(MK / 16));
      int32_t* bs = take(MK / 32);
      quantize_rows(xp, M, K, q, d, s);
      for (int64_t m = 0; m < M; ++m) r8[m] = {q + m * K, d + m * (K / 32), s + m * (K / 16)};
      block_sums(q, M * (K / 32), 32, bs);
      xs = s;
      for (int64_t m = 0; m < M; ++m) bsum[m] = bs + m * (K / 32);
    }
  }
};

// y[m * N + n] = x_m . W_n for weight rows [n0, n1) of W (N, K) of type t: called from inside parallel_for.
void mv_range(const Acts& a, int64_t t, const uint8_t* w, int64_t N, float* y, int64_t n0, int64_t n1) {
  const float* x = a.x.data_ptr<float>();
  if (is_x16(t)) {  // n0, n1: whole tiles
#if KV_X16
    if (a.act != 0) {
      row_blocks(a.M, [&](auto R, int64_t m0) {
        constexpr int r = decltype(R)::value;
        auto run = [&](auto TY) {
          constexpr int64_t ty = decltype(TY)::value;
          if (a.act == 2) x16dot_t<ty, r>(w, a.K / 32, a.r16 + m0, a.bsum + m0, y + m0 * N, N, n0 / 16, n1 / 16);
          else x16dot_t<ty, r>(w, a.K / 32, a.r8 + m0, a.bsum + m0, y + m0 * N, N, n0 / 16, n1 / 16);
        };
        if (t == Q4_0_X16) run(std::integral_constant<int64_t, Q4_0_X16>{});
        else if (t == Q4_1_X16) run(std::integral_constant<int64_t, Q4_1_X16>{});
        else run(std::integral_constant<int64_t, Q8_0_X16>{});
      });
      return;
    }
#endif
    // float32 activations, or a build without the x16 kernel: each row as the file's blocks, then the row-major path
    const int64_t nblk = a.K / 32;
    std::vector<uint8_t> row(nblk * layout(t).bytes);
    for (int64_t n = n0; n < n1; ++n) {
      x16_row(t, w, nblk, n, row.data());
      mv_range(a, x16_base(t), row.data(), N, y + n, 0, 1);
    }
    return;
  }
  if (is_float(t)) return fdot_rows(t, reinterpret_cast<const uint16_t*>(w), a.K, x, a.M, y, N, n0, n1);
  if (a.act == 2) return idot_rows(t, w, a.K, a.r16, a.M, y, N, n0, n1);
  if (a.act == 1) return idot_rows(t, w, a.K, a.r8, a.M, y, N, n0, n1);
  if (fdotq_rows(t, w, a.K, x, a.xs, a.M, y, N, n0, n1)) return;
  // portable build, float32 activations: each weight row dequantized, then float dots
  const Layout L = layout(t);
  const int64_t nblk = a.K / L.block, ng = L.block / 32, rb = nblk * L.bytes;
  std::vector<float> row(a.K);
  Group gr;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t b = 0; b < nblk; ++b)
      for (int g = 0; g < ng; ++g) {
        unpack(t, w + n * rb + b * L.bytes, g, gr);
        for (int i = 0; i < 32; ++i) row[(b * ng + g) * 32 + i] = gr.s[i / 16] * float(gr.q[i]) + gr.mn;
      }
    for (int64_t m = 0; m < a.M; ++m) {
      float sum = 0.f;
      for (int64_t k = 0; k < a.K; ++k) sum += row[k] * x[m * a.K + k];
      y[m * N + n] = sum;
    }
  }
}

// A matrix a pass writes: `rows` rows of type t (checked by the caller) into y, row stride ldy.
struct Part { const uint8_t* w; int64_t t, rows; float* y; int64_t ldy; };

// x W^T for matrices stacked by rows (one matrix; q | k | v of mixed types; gate beside up) in one parallel pass
// over torch's pool, sharing the prepared activations. A thread's range of the stacked rows is cut into each
// part's rows, rounded down to whole x16 tiles: every thread rounds a shared boundary the same way, so the
// pieces neither overlap nor leave a gap, and the work splits by rows whatever the parts' layouts.
void mv_parts(const Acts& a, const std::vector<Part>& parts) {
  if (a.M == 0) return;
  std::vector<int64_t> off(parts.size() + 1, 0);
  for (size_t p = 0; p < parts.size(); ++p) off[p + 1] = off[p] + parts[p].rows;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.K, 1));
  at::parallel_for(0, off.back(), grain, [&](int64_t r0, int64_t r1) {
    for (size_t p = 0; p < parts.size(); ++p) {
      const Part& q = parts[p];
      const int64_t u = is_x16(q.t) ? 16 : 1;
      const int64_t lo = std::clamp(r0 - off[p], int64_t(0), q.rows) / u * u;
      const int64_t hi = std::clamp(r1 - off[p], int64_t(0), q.rows) / u * u;
      if (lo < hi) mv_range(a, q.t, q.w, q.ldy, q.y, lo, hi);
    }
  });
}

// (M, n) = a.x W^T
at::Tensor mv(const Acts& a, const at::Tensor& w, int64_t t, int64_t n) {
  check_weight(w, t, n, a.K);
  at::Tensor y = at::empty({a.M, n}, a.x.options());
  mv_parts(a, {{w.data_ptr<uint8_t>(), t, n, y.data_ptr<float>(), n}});
  return y;
}

at::Tensor qmm(const at::Tensor& x_in, const at::Tensor& w, int64_t t, int64_t n, int64_t k, int64_t act) {
  check_weight(w, t, n, k);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == k, "kvbench qmm: x must be (M, ", k, ")");
  if (act == 0 && !KV_AVX2 && !is_float(t))  // portable build: float32 GEMM over the dequantized matrix
    return at::matmul(x_in.to(at::kFloat), dequant_all(w, t, n, k).t());
  return mv(Acts(x_in, act, !is_float(t)), w, t, n);
}

#if KV_AVX2
// float32 -> bfloat16, round to nearest even (as torch's .to(bfloat16)); NaN never occurs in weights.
inline __m128i to_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
inline void store8(float* o, __m256 v) { _mm256_storeu_ps(o, v); }
inline void store8(c10::BFloat16* o, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(o), to_bf16(v)); }

// s * q + mn rounded as gguf.quants rounds it, so dequantized weights equal its output bit for bit:
// where mn is an offset of the scale (Q4_0's -8 d, Q6_K's -32 s) gguf computes s * (q - off), one
// rounding, which an FMA reproduces; where it is a separate minimum (Q4_1, Q5_1, Q4_K, Q5_K) gguf
// rounds the product and then the sum. (-ffp-contract=off keeps the compiler from fusing the latter.)
template <int64_t TY>
inline __m256 madd(__m256 s, __m256 q, __m256 mn) {
  if constexpr (TY == Q4_1 || TY == Q5_1 || TY == Q4_K || TY == Q5_K) return _mm256_add_ps(_mm256_mul_ps(s, q), mn);
  else return _mm256_fmadd_ps(s, q, mn);
}

template <int64_t TY, typename O>
void dequant_row_avx2(const uint8_t* row, int64_t nblk, O* o) {
  using F = Fmt<TY>;
  for (int64_t b = 0; b < nblk; ++b) {
    __m256i q[F::NG]; __m256 s[F::NG]; float mn[F::NG][2] = {};
    F::unpack(row + b * F::BYTES, q, s, mn);
    for (int g = 0; g < F::NG; ++g) {
      O* og = o + (b * F::NG + g) * 32;
      const __m128i lo = _mm256_castsi256_si128(q[g]), hi = _mm256_extracti128_si256(q[g], 1);
      const __m128i parts[2] = {lo, hi};
      for (int h = 0; h < 2; ++h) {  // s[g] holds the scale of elements 0-15 in lanes 0-3, 16-31 in 4-7
        const __m256 sc = h == 0 ? _mm256_permute2f128_ps(s[g], s[g], 0x00) : _mm256_permute2f128_ps(s[g], s[g], 0x11);
        const __m256 m = _mm256_set1_ps(mn[g][h]);
        const __m128i lo8 = parts[h], hi8 = _mm_srli_si128(parts[h], 8);
        const __m256 a = _mm256_cvtepi32_ps(F::SIGNED ? _mm256_cvtepi8_epi32(lo8) : _mm256_cvtepu8_epi32(lo8));
        const __m256 c = _mm256_cvtepi32_ps(F::SIGNED ? _mm256_cvtepi8_epi32(hi8) : _mm256_cvtepu8_epi32(hi8));
        store8(og + 16 * h, madd<TY>(sc, a, m));
        store8(og + 16 * h + 8, madd<TY>(sc, c, m));
      }
    }
  }
}

template <typename O>
bool dequant_row_fast(int64_t t, const uint8_t* row, int64_t k, O* o) {
  const int64_t nblk = k / layout(t).block;
  if (by_format(t, [&](auto TY) { dequant_row_avx2<decltype(TY)::value>(row, nblk, o); })) return true;
  if (t != F16 && t != BF16) return false;
  const uint16_t* h = reinterpret_cast<const uint16_t*>(row);
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) store8(o + i, cvt8(t, h + i));
  for (; i < k; ++i) o[i] = O(t == F16 ? c10::detail::fp16_ieee_to_fp32_value(h[i]) : bf16f(h[i]));
  return true;
}
#else
template <typename O>
bool dequant_row_fast(int64_t, const uint8_t*, int64_t, O*) { return false; }
#endif

// One row of k values of a row-major type (the file's blocks) as float32 or bfloat16.
template <typename T>
void dequant_row(int64_t t, const uint8_t* row, int64_t k, T* o, Group& gr) {
  if (dequant_row_fast(t, row, k, o)) return;
  if (t == F16 || t == BF16) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(row);
    for (int64_t i = 0; i < k; ++i) o[i] = T(t == F16 ? c10::detail::fp16_ieee_to_fp32_value(h[i]) : bf16f(h[i]));
    return;
  }
  const Layout L = layout(t);
  const int64_t nblk = k / L.block, ng = L.block / 32;
  for (int64_t b = 0; b < nblk; ++b)
    for (int g = 0; g < ng; ++g) {
      unpack(t, row + b * L.bytes, g, gr);
      T* ob = o + (b * ng + g) * 32;
      for (int i = 0; i < 32; ++i) ob[i] = T(gr.s[i / 16] * float(gr.q[i]) + gr.mn);
    }
}

// Rows idx of W (N, K) as float32 or bfloat16: the embedding lookup (get_rows) and the prefill path.
template <typename T>
void dequant_rows(int64_t t, const uint8_t* w, int64_t k, const int64_t* idx, int64_t R, T* out) {
  const Layout L = layout(t);
  const int64_t rb = (k / L.block) * L.bytes, nblk = k / L.block;
  if (is_x16(t)) {  // each row's blocks put back together from its tile, then the row-major path
    const int64_t base = x16_base(t);
    at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
      std::vector<uint8_t> row(rb);
      Group gr;
      for (int64_t r = r0; r < r1; ++r) {
        x16_row(t, w, nblk, idx[r], row.data());
        dequant_row(base, row.data(), k, out + r * k, gr);
      }
    });
    return;
  }
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    Group gr;
    for (int64_t r = r0; r < r1; ++r) dequant_row(t, w + idx[r] * rb, k, out + r * k, gr);
  });
}

at::Tensor dequant(const at::Tensor& w, int64_t t, int64_t n, int64_t k, const std::optional<at::Tensor>& rows,
                   bool bf16) {
  check_weight(w, t, n, k);
  const at::Tensor idx = rows.has_value() ? rows->to(at::kLong).contiguous().view(-1) : at::arange(n, at::kLong);
  const int64_t R = idx.numel();
  if (R) {
    const auto lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < n, "kvbench dequant: row index out of [0, ", n, ")");
  }
  at::Tensor out = at::empty({R, k}, at::TensorOptions().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  if (bf16)
    dequant_rows<c10::BFloat16>(t, w.data_ptr<uint8_t>(), k, idx.data_ptr<int64_t>(), R, out.data_ptr<c10::BFloat16>());
  else
    dequant_rows<float>(t, w.data_ptr<uint8_t>(), k, idx.data_ptr<int64_t>(), R, out.data_ptr<float>());
  return out;
}

// RMS norm of each row, times the weight, in one pass over the row (torch 2.13's CPU rms_norm is six
// ops at decode sizes). Sum of squares in double, as ggml's rms_norm; y = x * (1/sqrt(mean + eps)) * w.
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "kvbench rms_norm: float32 CPU tensors");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t D = x.size(-1), T = x.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK(w.numel() == D, "kvbench rms_norm: weight of ", w.numel(), " for rows of ", D);
  at::Tensor y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * D;
      double ss = 0.0;
      for (int64_t i = 0; i < D; ++i) ss += double(xr[i]) * double(xr[i]);
      const float scale = 1.0f / std::sqrt(float(ss / double(D)) + float(eps));
      float* yr = yp + r * D;
      for (int64_t i = 0; i < D; ++i) yr[i] = (xr[i] * scale) * wp[i];
    }
  });
  return y;
}

// Rotary embedding of x (T, H, D), any strides, by angles cos/sin (T, n_rot/2): NORM rotates adjacent
// pairs (x[2i], x[2i+1]), NEOX halves (x[i], x[i + n_rot/2]); dims past n_rot pass through. Into y (T, H, D),
// any strides: y may be x itself (each pair is read before it is written). One op in place of the ~12 a tensor
// expression takes per call.
void rope_into(const at::Tensor& x, const float* cp, const float* sp, int64_t half, bool neox, at::Tensor& y) {
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2);
  TORCH_CHECK(2 * half <= D, "kvbench rope: angles do not fit x");
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
  const int64_t o0 = y.stride(0), o1 = y.stride(1), o2 = y.stride(2);
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T * H, std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1)), [&](int64_t a, int64_t b) {
    for (int64_t th = a; th < b; ++th) {
      const int64_t t = th / H, h = th % H;
      const float* xr = xp + t * s0 + h * s1;
      float* yr = yp + t * o0 + h * o1;
      const float *ct = cp + t * half, *st = sp + t * half;
      for (int64_t i = 0; i < half; ++i) {
        const int64_t i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
        const float x0 = xr[i0 * s2], x1 = xr[i1 * s2];
        yr[i0 * o2] = x0 * ct[i] - x1 * st[i];
        yr[i1 * o2] = x0 * st[i] + x1 * ct[i];
      }
      if (yr != xr)
        for (int64_t i = 2 * half; i < D; ++i) yr[i * o2] = xr[i * s2];
    }
  });
}

// cos/sin (T, [1,] n_rot/2) as contiguous float32 rows, and n_rot/2.
struct Angles {
  at::Tensor c, s;
  int64_t half;
  Angles(const at::Tensor& cos, const at::Tensor& sin, int64_t T)
      : c(cos.to(at::kFloat).contiguous()), s(sin.to(at::kFloat).contiguous()),
        half(c.numel() / std::max<int64_t>(T, 1)) {
    TORCH_CHECK(c.numel() == T * half && s.numel() == T * half, "kvbench rope: angles do not fit the rows");
  }
};

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool neox) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "kvbench rope: x (T, H, D) float32");
  const Angles a(cos, sin, x.size(0));
  at::Tensor y = at::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  rope_into(x, a.c.data_ptr<float>(), a.s.data_ptr<float>(), a.half, neox, y);
  return y;
}

// Fused decode ops (fast mode, at most MAXM rows). A LLaMA block at decode is ~20 torch calls (norms, five
// matmuls, rope, adds, silu, mul), each a dispatch and a Python step that cost more than their arithmetic at
// these sizes (llama-small Q4_0: ~1.8 ms of a 5.4 ms step outside the matmuls). These two ops run the block
// around the memory: everything before K/V are stored, and everything after attention. Same operations in the
// same order as the unfused path (this file's rms_norm, matmul, rope and silu_mul, float adds),
// so the results are equal to it bit for bit; tests/unit/engine/kernels/test_fused_block.py checks that.

// RMS norm, q/k/v matmul (+ bias), rope on q and k: x (M, n_embd) -> q (M, H, dk), k (M, Hkv, dk), v (M, Hkv, dv).
// No cos/sin: no rope (the layer has none).
std::vector<at::Tensor> attn_qkv(const at::Tensor& x, const at::Tensor& norm_w, double eps, at::TensorList ws,
                                 at::IntArrayRef types, at::IntArrayRef rows, const c10::optional<at::Tensor>& bias,
                                 const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin, bool neox,
                                 int64_t n_head, int64_t n_head_kv, int64_t d_k, int64_t d_v, int64_t act) {
  const int64_t M = x.size(0), E = x.size(1), nq = n_head * d_k, nk = n_head_kv * d_k, nv = n_head_kv * d_v;
  const int64_t P = int64_t(ws.size()), N = nq + nk + nv;
  TORCH_CHECK(P > 0 && int64_t(types.size()) == P && int64_t(rows.size()) == P,
              "kvbench attn_qkv: one type and one row count per matrix part");
  // Parts stacked along the output (q | k | v in one matrix, or a Q4_K_M file's Q4_K q and k beside its Q6_K v):
  // one quantization of the normalized row, one pass over all of them.
  at::Tensor y = at::empty({M, N}, x.options());
  std::vector<Part> parts;
  int64_t off = 0;
  bool quantized = false;
  for (int64_t p = 0; p < P; ++p) {
    check_weight(ws[p], types[p], rows[p], E);
    quantized |= !is_float(types[p]);
    parts.push_back({ws[p].data_ptr<uint8_t>(), types[p], rows[p], y.data_ptr<float>() + off, N});
    off += rows[p];
  }
  TORCH_CHECK(off == N, "kvbench attn_qkv: the parts hold ", off, " rows, q, k and v need ", N);
  mv_parts(Acts(rms_norm(x, norm_w, eps), act, quantized), parts);
  if (bias.has_value()) y.add_(*bias);
  at::Tensor q = y.narrow(1, 0, nq).view({M, n_head, d_k});
  at::Tensor k = y.narrow(1, nq, nk).view({M, n_head_kv, d_k});
  if (cos.has_value()) {  // in place, in y: the same products as rope(), without two tensors and their dispatch
    TORCH_CHECK(sin.has_value(), "kvbench attn_qkv: cos without sin");
    const Angles a(*cos, *sin, M);
    rope_into(q, a.c.data_ptr<float>(), a.s.data_ptr<float>(), a.half, neox, q);
    rope_into(k, a.c.data_ptr<float>(), a.s.data_ptr<float>(), a.half, neox, k);
  }
  return {q, k, y.narrow(1, nq + nk, nv).view({M, n_head_kv, d_v})};
}

// y = x + y in place (y float32, contiguous, x's shape): torch's add rounds each sum once as this does, and its
// dispatch cost more than 1024 additions (two a layer).
inline at::Tensor add_into(const at::Tensor& x_in, at::Tensor y) {
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.is_contiguous() && x.numel() == y.numel(), "kvbench ffn_block: shapes");
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t i = 0, n = y.numel(); i < n; ++i) yp[i] = xp[i] + yp[i];
  return y;
}

#if KV_AVX2
// torch's own vector exp (SLEEF, max error 1.0 ulp), which libtorch_cpu exports: its softmax uses the same.
extern "C" __m256 Sleef_expf8_u10avx2(__m256);
#endif

// g = silu(g) * u in place over n floats: g / (1 + exp(-g)) * u, torch's formula for SiLU, with SLEEF's exp 8 lanes
// at a time (the scalar tail: std::exp). In fast mode both the fused block and the module path (FeedForward) take
// it, so they stay equal bit for bit; exact mode keeps torch's. at::silu and mul_ cost ~5 us a layer at decode
// (two dispatches and an allocation, the caches just flushed) for ~1 us of arithmetic.
inline void silu_mul_into(float* g, const float* u, int64_t n) {
  int64_t i = 0;
#if KV_AVX2
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 e = Sleef_expf8_u10avx2(_mm256_xor_ps(x, sign));
    _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

at::Tensor silu_mul(const at::Tensor& g_in, const at::Tensor& u_in) {
  TORCH_CHECK(g_in.scalar_type() == at::kFloat && u_in.scalar_type() == at::kFloat && g_in.sizes() == u_in.sizes() &&
              g_in.device().is_cpu(), "kvbench silu_mul: two float32 CPU tensors of one shape");
  at::Tensor g = g_in.clone(at::MemoryFormat::Contiguous);  // the output: one copy, whatever g_in's layout
  const at::Tensor u = u_in.contiguous();
  silu_mul_into(g.data_ptr<float>(), u.data_ptr<float>(), g.numel());
  return g;
}

// The rest of the block after attention: h = x + a Wo^T; out = h + W2 (silu(W1 n(h)) * W3 n(h)), with n the RMS
// norm. Gate and up share one quantization of n(h) and one parallel pass.
at::Tensor ffn_block(const at::Tensor& x, const at::Tensor& a, const at::Tensor& wo, int64_t to,
                     const at::Tensor& norm_w, double eps, const at::Tensor& w1, int64_t t1, const at::Tensor& w3,
                     int64_t t3, const at::Tensor& w2, int64_t t2, int64_t n_ff, int64_t act) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "kvbench ffn_block: x (M, n_embd) float32");
  const int64_t M = x.size(0), E = x.size(1);
  const at::Tensor h = add_into(x, mv(Acts(a, act, !is_float(to)), wo, to, E));
  const Acts hn(rms_norm(h, norm_w, eps), act, !is_float(t1) || !is_float(t3));
  check_weight(w1, t1, n_ff, E);
  check_weight(w3, t3, n_ff, E);
  at::Tensor g = at::empty({M, n_ff}, x.options()), u = at::empty({M, n_ff}, x.options());
  mv_parts(hn, {{w1.data_ptr<uint8_t>(), t1, n_ff, g.data_ptr<float>(), n_ff},
                {w3.data_ptr<uint8_t>(), t3, n_ff, u.data_ptr<float>(), n_ff}});
  silu_mul_into(g.data_ptr<float>(), u.data_ptr<float>(), g.numel());
  return add_into(h, mv(Acts(g, act, !is_float(t2)), w2, t2, E));
}

at::Tensor dequant_all(const at::Tensor& w, int64_t t, int64_t n, int64_t k) {
  return dequant(w, t, n, k, std::nullopt, false);
}

// dot of a float row with a row of element type et (F32, F16, BF16), and y += a x likewise: 8 lanes at a time
// where AVX2 is built (the compiler does not vectorize a float reduction on its own without reassociating it,
// which -ffp-contract=off and no -ffast-math forbid). F16/BF16 widen exactly, so the sums are those of the
// float32 rows.
inline __attribute__((always_inline)) float dot_e(int64_t et, const float* a, const void* bv, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
  const uint16_t* b = static_cast<const uint16_t*>(bv);
#if KV_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(et, b, i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(et, b, i + 8), acc1);
  }
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += a[i] * wval(et, b, i);
  return s;
}
inline __attribute__((always_inline)) void axpy_e(int64_t et, float a, const void* xv, float* y, int64_t n) {
  int64_t i = 0;
  const uint16_t* x = static_cast<const uint16_t*>(xv);
#if KV_AVX2
  const __m256 av = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, load8(et, x, i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * wval(et, x, i);
}

// p[j] = exp(p[j] - mx) in place (-inf gives 0); returns the sum of the p[j].
inline float exp_shifted(float* p, int64_t n, float mx) {
  int64_t j = 0;
  float sum = 0.f;
#if KV_AVX2
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 e = Sleef_expf8_u10avx2(_mm256_sub_ps(_mm256_loadu_ps(p + j), m));
    _mm256_storeu_ps(p + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; j < n; ++j) { p[j] = p[j] == -INFINITY ? 0.f : std::exp(p[j] - mx); sum += p[j]; }
  return sum;
}

#if KV_AVX2
// The 8 sums of a0..a7's lanes, as one vector (a transpose-reduce: no horizontal sum per key).
inline __m256 sum8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// Grouped-query attention: the GB query heads that share a KV head (GB <= 4) read each of its K and V rows once,
// where one head at a time read them GB times. Every score is one 8-lane FMA chain over d reduced by sum8, then
// scaled, exp'd and normalized, and every output one FMA chain over the keys, whatever GB: the result does not
// depend on the grouping (equal bit for bit to the same attention with K and V repeated per query head, GB = 1;
// tests/unit/engine/kernels/test_attend.py), and it is what the per-head AVX2 loop it replaced computed.

// Keys ahead whose rows are prefetched: the hardware's prefetchers do not follow one KV head's slice of each cache
// row (1/hkv of a row, a row apart). 16: 8 and 32 were no better at 1024 and 4096 cells.
constexpr int64_t PF_K = 16;
// Scores of GB query rows (q + h d) against n keys: KB = 8 / GB keys at a time, the GB x KB chains reduced
// together. p[h ps + j] = (q_h . k_j) * sc, -inf where masked; mx[h] = max over j of p[h ps + j].
// row_bytes > 0: k is the start of each cache row, row_bytes long; the rest of the rows (the other KV heads' slices)
// is prefetched into L2, 2 PF_K keys ahead, for the items of the same chunk that read them next (attend_small).
template <int64_t ET, int GB>
void scores_group(const float* q, const char* k, int64_t ks, int64_t d, int64_t n, float sc, const bool* m,
                  int64_t last, float* p, int64_t ps, float* mx, int64_t row_bytes = 0) {
  constexpr int64_t et = ET;
  constexpr int KB = 8 / GB;
  const __m256 scv = _mm256_set1_ps(sc);
  for (int h = 0; h < GB; ++h) mx[h] = -INFINITY;
  for (int64_t j0 = 0; j0 < n; j0 += KB) {
    const int64_t nb = std::min<int64_t>(KB, n - j0);
    if (j0 + PF_K < n)
      for (int kk = 0; kk < KB; ++kk)
        for (int64_t b = 0; b < d * (ET == F32 ? 4 : 2); b += 64)
          _mm_prefetch(k + (j0 + PF_K + kk) * ks + b, _MM_HINT_T0);
    if (row_bytes && j0 + 2 * PF_K < n)
      for (int kk = 0; kk < KB; ++kk)
        for (int64_t b = d * (ET == F32 ? 4 : 2); b < row_bytes; b += 64)
          _mm_prefetch(k + (j0 + 2 * PF_K + kk) * ks + b, _MM_HINT_T1);
    __m256 acc[8];
    for (int a = 0; a < 8; ++a) acc[a] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) {
      __m256 kv[KB];
      for (int kk = 0; kk < KB; ++kk)
        kv[kk] = kk < nb ? load8(et, reinterpret_cast<const uint16_t*>(k + (j0 + kk) * ks), i) : _mm256_setzero_ps();
      for (int h = 0; h < GB; ++h) {
        const __m256 qv = _mm256_loadu_ps(q + h * d + i);
        for (int kk = 0; kk < KB; ++kk) acc[h * KB + kk] = _mm256_fmadd_ps(qv, kv[kk], acc[h * KB + kk]);
      }
    }
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, _mm256_mul_ps(sum8(acc), scv));
    for (int kk = 0; kk < nb; ++kk) {
      const int64_t j = j0 + kk;
      const bool see = m ? m[j] : j <= last;
      for (int h = 0; h < GB; ++h) {
        const float x = see ? tmp[h * KB + kk] : -INFINITY;
        p[h * ps + j] = x;
        mx[h] = std::max(mx[h], x);
      }
    }
  }
}

// out_h[0, dv) = sum_j w[h pw + j] v_j for GB heads, w already normalized, over the keys in js (those some head
// may see: every weight 0 elsewhere). CP 8-lane chunks of dv per pass over the keys, GB x CP accumulators in
// registers: 16 with AVX-512's 32 vector registers, 8 with AVX2's 16. row_bytes: as for scores_group, on the first
// pass.
template <int64_t ET, int GB>
void weighted_group(const char* v, int64_t vs, const float* w, int64_t pw, const int32_t* js, int64_t nj, int64_t dv,
                    float* out, int64_t row_bytes = 0) {
  constexpr int64_t et = ET;
  constexpr int CP = KV_AVX512 ? 4 : 2;
  int64_t c0 = 0;
  for (; c0 + 8 * CP <= dv; c0 += 8 * CP) {
    __m256 acc[GB][CP];
    for (int h = 0; h < GB; ++h)
      for (int c = 0; c < CP; ++c) acc[h][c] = _mm256_setzero_ps();
    for (int64_t jj = 0; jj < nj; ++jj) {
      const int64_t j = js[jj];
      if (jj + PF_K < nj)
        for (int64_t b = 0; b < 8 * CP * (ET == F32 ? 4 : 2); b += 64)
          _mm_prefetch(v + js[jj + PF_K] * vs + c0 * (ET == F32 ? 4 : 2) + b, _MM_HINT_T0);
      if (row_bytes && c0 == 0 && jj + 2 * PF_K < nj)
        for (int64_t b = 8 * CP * (ET == F32 ? 4 : 2); b < row_bytes; b += 64)
          _mm_prefetch(v + js[jj + 2 * PF_K] * vs + b, _MM_HINT_T1);
      const uint16_t* row = reinterpret_cast<const uint16_t*>(v + j * vs);
      __m256 vv[CP];
      for (int c = 0; c < CP; ++c) vv[c] = load8(et, row, c0 + 8 * c);
      for (int h = 0; h < GB; ++h) {
        const __m256 wh = _mm256_set1_ps(w[h * pw + j]);
        for (int c = 0; c < CP; ++c) acc[h][c] = _mm256_fmadd_ps(wh, vv[c], acc[h][c]);
      }
    }
    for (int h = 0; h < GB; ++h)
      for (int c = 0; c < CP; ++c) _mm256_storeu_ps(out + h * dv + c0 + 8 * c, acc[h][c]);
  }
  for (; c0 < dv; c0 += 8) {  // what is left of dv, one chunk at a time
    __m256 acc[GB];
    for (int h = 0; h < GB; ++h) acc[h] = _mm256_setzero_ps();
    for (int64_t jj = 0; jj < nj; ++jj) {
      const int64_t j = js[jj];
      const __m256 vv = load8(et, reinterpret_cast<const uint16_t*>(v + j * vs), c0);
      for (int h = 0; h < GB; ++h) acc[h] = _mm256_fmadd_ps(_mm256_set1_ps(w[h * pw + j]), vv, acc[h]);
    }
    for (int h = 0; h < GB; ++h) _mm256_storeu_ps(out + h * dv + c0, acc[h]);
  }
}

// One token's attention for GB query heads sharing one KV head (q rows at qh, d apart; out rows dv apart). p:
// scratch of GB rows of ps >= n + 8 floats, js of n indices. A head that may attend nothing gets zeros.
// With part (a chunk of a longer cache, merged by merge_chunks): the weights stay exp(s - max), unnormalized, and
// part[2 h], part[2 h + 1] get head h's max and sum of weights (-inf and 0 where it sees nothing here).
// krow, vrow > 0: kh, vh start their cache rows; the whole rows are prefetched into L2 (scores_group).
template <int64_t ET_K, int64_t ET_V, int GB>
void attend_group(const float* qh, const char* kh, int64_t ks, const char* vh, int64_t vs, int64_t d, int64_t dv,
                  int64_t n, float sc, const bool* m, int64_t last, float* p, int64_t ps, int32_t* js, float* out,
                  float* part = nullptr, int64_t krow = 0, int64_t vrow = 0) {
  float mx[GB];
  scores_group<ET_K, GB>(qh, kh, ks, d, n, sc, m, last, p, ps, mx, krow);
  for (int h = 0; h < GB; ++h) {
    float* ph = p + h * ps;
    if (mx[h] == -INFINITY) {  // weights of 0: the pass below adds nothing for this head
      for (int64_t j = 0; j < n; ++j) ph[j] = 0.f;
      if (part) part[2 * h] = -INFINITY, part[2 * h + 1] = 0.f;
      continue;
    }
    const float l = exp_shifted(ph, n, mx[h]);
    if (part) {
      part[2 * h] = mx[h], part[2 * h + 1] = l;
      continue;
    }
    const float inv = 1.f / l;
    for (int64_t j = 0; j < n; ++j) ph[j] *= inv;  // the per-head loop's p[j] * inv, one rounding
  }
  int64_t nj = 0;  // keys with a weight for some head (a masked key has none)
  for (int64_t j = 0; j < n; ++j) {
    bool any = false;
    for (int h = 0; h < GB; ++h) any |= p[h * ps + j] != 0.f;
    if (any) js[nj++] = int32_t(j);
  }
  weighted_group<ET_V, GB>(vh, vs, p, ps, js, nj, dv, out, vrow);
}

// With fewer than ATT_SPLIT_BELOW work items (rows x KV heads x groups), or a cache of ATT_SPLIT_KEYS keys or
// more, a cache longer than ATT_CHUNK keys is attended in chunks of that many (flash-decoding's split), each with
// its own max and sum, merged afterwards in chunk order. Decided by the shapes alone, so the result never depends
// on the thread count. The items run chunk by chunk (every head of chunk 0, then of chunk 1, ...), so each thread
// takes a run of whole chunks: 256 cache rows (256 KB of f32 K and V at llama-small's width) read by every KV head
// in turn, the first of which prefetches the whole rows into L2 for the others. Head by head over the whole cache,
// each thread read a quarter of every row from DRAM, a row apart. Old and new builds in alternating processes
// (median of 3 x 64 steps each): llama-small Q4_0 after 4000 tokens 1.08-1.35x (5 rounds), after 2048 1.06-1.12x,
// after 128 (not split) 1.01-1.03x; SmolLM2 (3 KV heads: 3 items on 2 threads, split from 257 keys already)
// 1.23-1.24x after 4000 tokens, 1.00-1.07x after 1024. Same tokens in every case. Split from 1024 keys,
// llama-small gained nothing there either way, so it is split from 2048.
constexpr int64_t ATT_CHUNK = 256, ATT_SPLIT_BELOW = 4, ATT_SPLIT_KEYS = 2048;

// out (dv) for one head from nc chunks' (max, sum) pairs and unnormalized sums o (dv each, os apart): every chunk
// rescaled to the common max, m = max_c m_c, out = sum_c exp(m_c - m) o_c / sum_c exp(m_c - m) l_c.
inline void merge_chunks(const float* mp, int64_t ms, const float* op, int64_t os, int64_t nc, int64_t dv, float* out) {
  float mx = -INFINITY;
  for (int64_t c = 0; c < nc; ++c) mx = std::max(mx, mp[c * ms]);
  for (int64_t i = 0; i < dv; ++i) out[i] = 0.f;
  if (mx == -INFINITY) return;  // sees nothing at all: zeros
  float l = 0.f;
  for (int64_t c = 0; c < nc; ++c)
    if (mp[c * ms] != -INFINITY) l += std::exp(mp[c * ms] - mx) * mp[c * ms + 1];
  const float inv = 1.f / l;
  for (int64_t c = 0; c < nc; ++c) {
    if (mp[c * ms] == -INFINITY) continue;
    const float a = std::exp(mp[c * ms] - mx) * inv;
    const float* o = op + c * os;
    for (int64_t i = 0; i < dv; ++i) out[i] += a * o[i];
  }
}

// f(std::integral_constant<int64_t, ET>{}) for a float element type (F32, F16, BF16): kernels see it at compile time.
template <typename F>
inline void by_elem(int64_t et, F&& f) {
  if (et == F16) f(std::integral_constant<int64_t, F16>{});
  else if (et == BF16) f(std::integral_constant<int64_t, BF16>{});
  else f(std::integral_constant<int64_t, F32>{});
}
#endif

// p[j] = (q . k_j) * sc for n keys (rows of element type et, byte stride ks), -inf where masked (mask row m, or
// causal: j <= last); returns max p. The per-head path where the grouped one does not run (no AVX2, or d or dv
// not a multiple of 8).
inline float scores(int64_t et, const float* q, const char* k, int64_t ks, int64_t d, int64_t n, float sc,
                    const bool* m, int64_t last, float* p) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    if (!(m ? m[j] : j <= last)) { p[j] = -INFINITY; continue; }
    p[j] = dot_e(et, q, k + j * ks, d) * sc;
    mx = std::max(mx, p[j]);
  }
  return mx;
}

// out[0, dv) = inv * sum_j p[j] v_j over rows of element type et (byte stride vs); weights of 0 are skipped.
inline void weighted(int64_t et, const char* v, int64_t vs, const float* p, int64_t n, float inv, int64_t dv,
                     float* out) {
  for (int64_t i = 0; i < dv; ++i) out[i] = 0.f;
  for (int64_t j = 0; j < n; ++j)
    if (p[j] != 0.f) axpy_e(et, p[j] * inv, v + j * vs, out, dv);
}

inline int64_t elem_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return F32;
    case at::kHalf: return F16;
    case at::kBFloat16: return BF16;
    default: TORCH_CHECK(false, "kvbench attend_small: k and v must be float32, float16 or bfloat16");
  }
}

// Attention for a few query rows (decode): q (T, H, d), k (n, Hkv, d), v (n, Hkv, dv) float32 with contiguous
// rows, mask (T, n) bool (true: may attend) or none (rows are the last T positions of k/v: causal). Per (row,
// head): scores in float32, softmax with its max subtracted, the weighted sum of v. Why a kernel: at these sizes
// torch's flash-attention op, or bmm + softmax + bmm, spend most of their time waking threads between ops
// (~70 us a layer in the engine for a few microseconds of arithmetic); this runs inline unless the work is large.
// k and v may be float16 or bfloat16, a cache's storage read as it is (widened in registers): converting the
// cache to float32 first took longer than the attention (0.6 ms a layer at 1000 cells, against 0.15).
// Scores 8 chains at a time (one reduction per 8), exp 8 lanes at a time, the weighted sum of V with its
// accumulators in registers: ~4x the per-key loop, whose horizontal sum per key and read-modify-write of the
// output per key dominated (SmolLM2/llama-small shapes at 1000-4000 cells). The query heads that share a KV head
// go together (attend_group), and the next keys' rows are prefetched: llama-small, 4 heads a KV head, at 4096
// cells 0.65-0.86 -> 0.38-0.40 ms a layer from DRAM; decode at 1024 cells 1.25x faster, SmolLM2 (3 a KV head) 1.08x.
// A row that may attend nothing gets zeros (torch's kernel gives NaN; kvbench's memories never produce one).
at::Tensor attend_small(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                        const c10::optional<at::Tensor>& mask_in, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3 && v_in.dim() == 3, "kvbench attend_small: q, k, v must be 3-D");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat, "kvbench attend_small: q must be float32");
  const int64_t ek = elem_type(k_in), ev = elem_type(v_in);
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k = k_in.stride(2) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(2) == 1 ? v_in : v_in.contiguous();
  const int64_t T = q.size(0), H = q.size(1), d = q.size(2), n = k.size(0), hkv = k.size(1), dv = v.size(2);
  TORCH_CHECK(k.size(2) == d && v.size(0) == n && v.size(1) == hkv && H % hkv == 0, "kvbench attend_small: shapes");
  at::Tensor mask;
  if (mask_in.has_value()) {
    mask = mask_in->to(at::kBool).contiguous();
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == T && mask.size(1) == n, "kvbench attend_small: mask (T, n)");
  }
  at::Tensor y = at::empty({T, H * dv}, q.options());
  const float* qp = q.data_ptr<float>();
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  const int64_t kb = k.element_size(), vb = v.element_size();
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), vs0 = v.stride(0), vs1 = v.stride(1), g = H / hkv;
  const float sc = float(scale);
  const bool vec = d % 8 == 0 && dv % 8 == 0;  // the 8-key and register paths (AVX2 builds)
#if KV_AVX2
  if (vec) {  // heads that share a KV head in groups of gb: one work item per (row, KV head, group)
    const int64_t gb = g % 4 == 0 ? 4 : g % 3 == 0 ? 3 : g % 2 == 0 ? 2 : 1, ng = g / gb;
    const int64_t CH = T * hkv * ng < ATT_SPLIT_BELOW || n >= ATT_SPLIT_KEYS ? ATT_CHUNK : std::max<int64_t>(n, 1);
    const int64_t nc = (n + CH - 1) / CH, cn = std::min(n, CH);  // chunks, keys a chunk
    const int64_t ps = gb * (2 + dv);  // a split item's (max, sum) pairs, then its heads' unnormalized outputs
    const int64_t NR = T * hkv * ng;  // items a chunk
    // bytes from a row's first KV head to the end of its last one's slice: what the chunk's first item prefetches
    const int64_t krow = nc > 1 ? ((hkv - 1) * ks1 + d) * kb : 0, vrow = nc > 1 ? ((hkv - 1) * vs1 + dv) * vb : 0;
    std::vector<float> parts(nc > 1 ? T * hkv * ng * nc * ps : 0);
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, gb * cn * (d + dv)));
    at::parallel_for(0, T * hkv * ng * nc, grain, [&](int64_t i0, int64_t i1) {
      std::vector<float> p(gb * (cn + 8));
      std::vector<int32_t> js(cn);
      for (int64_t it = i0; it < i1; ++it) {  // (chunk, row, KV head, group), the group fastest
        const int64_t c = it / NR, r = it % NR, t = r / (hkv * ng), hk = r / ng % hkv, h0 = hk * g + r % ng * gb;
        const bool first = r % (hkv * ng) == 0;  // a row's first KV head and group: it prefetches the whole rows
        const int64_t j0 = c * CH, nj = std::min(n, j0 + CH) - j0;
        const float* qh = qp + (t * H + h0) * d;
        const char* kh = kp + hk * ks1 * kb + j0 * ks0 * kb;
        const char* vh = vp + hk * vs1 * vb + j0 * vs0 * vb;
        const bool* mt = mp ? mp + t * n + j0 : nullptr;
        float* part = nc > 1 ? parts.data() + (r * nc + c) * ps : nullptr;  // merged per r, in chunk order
        float* out = part ? part + 2 * gb : yp + t * H * dv + h0 * dv;
        by_elem(ek, [&](auto K) {
          by_elem(ev, [&](auto V) {
            constexpr int64_t EK = decltype(K)::value, EV = decltype(V)::value;
            auto run = [&](auto GB) {
              attend_group<EK, EV, decltype(GB)::value>(qh, kh, ks0 * kb, vh, vs0 * vb, d, dv, nj, sc, mt,
                                                        n - T + t - j0, p.data(), cn + 8, js.data(), out, part,
                                                        first ? krow : 0, first ? vrow : 0);
            };
            if (gb == 4) run(std::integral_constant<int, 4>{});
            else if (gb == 3) run(std::integral_constant<int, 3>{});
            else if (gb == 2) run(std::integral_constant<int, 2>{});
            else run(std::integral_constant<int, 1>{});
          });
        });
      }
    });
    if (nc > 1)  // per (row, head): the chunks of its item in order
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t hk = h / g, grp = h % g / gb, hh = h % gb;
          const float* base = parts.data() + ((t * hkv + hk) * ng + grp) * nc * ps;
          merge_chunks(base + 2 * hh, ps, base + 2 * gb + hh * dv, ps, nc, dv, yp + (t * H + h) * dv);
        }
    return y;
  }
#endif
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, n * (d + dv)));
  at::parallel_for(0, T * H, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> p(n + 8);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / H, h = r % H, hk = h / g;
      const char* kh = kp + hk * ks1 * kb;
      const char* vh = vp + hk * vs1 * vb;
      float* out = yp + t * H * dv + h * dv;
      const float mx = scores(ek, qp + (t * H + h) * d, kh, ks0 * kb, d, n, sc, mp ? mp + t * n : nullptr,
                              n - T + t, p.data());
      if (mx == -INFINITY) { for (int64_t i = 0; i < dv; ++i) out[i] = 0.f; continue; }
      const float inv = 1.f / exp_shifted(p.data(), n, mx);
      weighted(ev, vh, vs0 * vb, p.data(), n, inv, dv, out);
    }
  });
  return y;
}

// n float32 values into row r of a float cache's storage (f32, f16, bf16; rows contiguous), as torch's copy_
// rounds them.
inline void put_row(const float* x, int64_t n, const at::Tensor& cache, int64_t r) {
  char* row = static_cast<char*>(cache.data_ptr()) + r * cache.stride(0) * cache.element_size();
  switch (cache.scalar_type()) {
    case at::kFloat: std::memcpy(row, x, n * sizeof(float)); return;
    case at::kHalf: for (int64_t i = 0; i < n; ++i) reinterpret_cast<c10::Half*>(row)[i] = c10::Half(x[i]); return;
    case at::kBFloat16:
      for (int64_t i = 0; i < n; ++i) reinterpret_cast<c10::BFloat16*>(row)[i] = c10::BFloat16(x[i]);
      return;
    default: TORCH_CHECK(false, "kvbench kv_attend: the cache must be float32, float16 or bfloat16");
  }
}

// A decode layer's memory step in one op, for a float cache (f32, f16, bf16) on the CPU: store this ubatch's K/V
// rows into the cache's storage, then attend_small over the cells attention reads. k (T, Hkv, d), v (T, Hkv, dv)
// float32; kc (size, Hkv * d), vc (size, Hkv * dv) storage. Rows go to slots[t] (or slot0 + t); attention reads
// cells[j] (or rows [0, n_kv)). The memory decided all of these (engine/memory: KVStorage); this only runs them.
// Same operations as the Python path (a copy that rounds f32 to f16/bf16 to nearest even, index_select or a view,
// attend_small), so equal bit for bit; what it saves is ~25 us of Python and dispatch per layer and step.
at::Tensor kv_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kc,
                     const at::Tensor& vc,
                     const c10::optional<at::Tensor>& slots, int64_t slot0, const c10::optional<at::Tensor>& cells,
                     int64_t n_kv, const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && kc.dim() == 2 && vc.dim() == 2, "kvbench kv_attend: k, v 3-D, kc, vc 2-D");
  const int64_t T = k.size(0), hkv = k.size(1), d = k.size(2), dv = v.size(2);
  TORCH_CHECK(kc.size(1) == hkv * d && vc.size(1) == hkv * dv && kc.size(0) == vc.size(0),
              "kvbench kv_attend: cache rows must hold n_head_kv * head_dim values");
  TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat, "kvbench kv_attend: k, v float32");
  TORCH_CHECK(kc.stride(1) == 1 && vc.stride(1) == 1, "kvbench kv_attend: cache rows must be contiguous");
  const at::Tensor k2 = k.contiguous(), v2 = v.contiguous();
  at::Tensor sl;
  if (slots.has_value()) {
    sl = slots->to(at::kLong).contiguous();
    TORCH_CHECK(sl.numel() == T, "kvbench kv_attend: one slot per row");
  } else {
    TORCH_CHECK(slot0 >= 0 && slot0 + T <= kc.size(0), "kvbench kv_attend: slots outside the cache");
  }
  // Row t into row slots[t] (or slot0 + t), rounded as torch's copy rounds (c10's conversions, to nearest even):
  // two ATen copies a layer cost ~4 us at decode, the conversion of 2 x 256 values well under one.
  for (int64_t t = 0; t < T; ++t) {
    const int64_t r = sl.defined() ? sl.data_ptr<int64_t>()[t] : slot0 + t;
    TORCH_CHECK(r >= 0 && r < kc.size(0), "kvbench kv_attend: slot ", r, " outside the cache");
    put_row(k2.data_ptr<float>() + t * hkv * d, hkv * d, kc, r);
    put_row(v2.data_ptr<float>() + t * hkv * dv, hkv * dv, vc, r);
  }
  at::Tensor kr, vr;
  if (cells.has_value()) {
    kr = kc.index_select(0, *cells);
    vr = vc.index_select(0, *cells);
  } else {
    TORCH_CHECK(n_kv >= 0 && n_kv <= kc.size(0), "kvbench kv_attend: n_kv outside the cache");
    kr = kc.narrow(0, 0, n_kv);
    vr = vc.narrow(0, 0, n_kv);
  }
  return attend_small(q, kr.view({-1, hkv, d}), vr.view({-1, hkv, dv}), mask, scale);
}

// A LLaMA forward pass over a decode-sized ubatch in one op: the token rows of the embedding (dequant), then with
// rope's angles cos/sin (T, 1, n_rot/2; none: no rope) per layer attn_qkv, kv_attend and
// ffn_block, then the output rows' final norm and the output matrix (qmm): the functions the per-layer path
// calls, in its order, so the logits are equal to the module path's bit for bit. Why: with the weights at the
// memory's rate, what separated a step from llama.cpp's was ~0.8 ms of Python between ~30 native calls.
// Per layer l, ws holds nparts[l] q/k/v parts, then wo, w1, w3, w2 (types, rows alike: w1's rows are n_ff);
// norms holds the attention and the feed-forward norm; biases is empty or one q/k/v bias per layer. Every layer's K/V storage (kcs, vcs)
// is written and read at the same places (one ubatch: slots, cells, mask; kv_attend says which is which).
at::Tensor decode_forward(const at::Tensor& token, const c10::optional<at::Tensor>& cos,
                          const c10::optional<at::Tensor>& sin, const at::Tensor& embd, int64_t embd_type,
                          int64_t embd_rows, at::TensorList ws,
                          at::IntArrayRef types, at::IntArrayRef rows, at::IntArrayRef nparts, at::TensorList norms,
                          at::TensorList biases, at::TensorList kcs, at::TensorList vcs,
                          const c10::optional<at::Tensor>& slots, int64_t slot0, const c10::optional<at::Tensor>& cells,
                          int64_t n_kv, const c10::optional<at::Tensor>& mask, bool neox, int64_t n_head,
                          int64_t n_head_kv, int64_t d_k, int64_t d_v, double eps, double scale, int64_t act,
                          const c10::optional<at::Tensor>& out_rows, const at::Tensor& out_norm, double out_eps,
                          const at::Tensor& head, int64_t head_type, int64_t n_vocab) {
  const int64_t L = int64_t(nparts.size());
  TORCH_CHECK(L > 0 && int64_t(norms.size()) == 2 * L && int64_t(kcs.size()) == L &&
              int64_t(vcs.size()) == L && (biases.empty() || int64_t(biases.size()) == L),
              "kvbench decode_forward: per layer two norms, one K and one V storage (and a bias or none)");
  TORCH_CHECK(int64_t(types.size()) == int64_t(ws.size()) && int64_t(rows.size()) == int64_t(ws.size()),
              "kvbench decode_forward: one type and one row count per matrix");
  at::Tensor x = dequant(embd, embd_type, embd_rows, norms[0].size(0), token, false);  // (T, n_embd)
  int64_t w = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t P = nparts[l];
    TORCH_CHECK(P > 0 && w + P + 4 <= int64_t(ws.size()), "kvbench decode_forward: layer ", l, " lacks matrices");
    const auto bias = biases.empty() ? c10::optional<at::Tensor>() : c10::optional<at::Tensor>(biases[l]);
    const auto qkv = attn_qkv(x, norms[2 * l], eps, ws.slice(w, P), types.slice(w, P), rows.slice(w, P), bias, cos,
                              sin, neox, n_head, n_head_kv, d_k, d_v, act);
    w += P;
    const at::Tensor a = kv_attend(qkv[0], qkv[1], qkv[2], kcs[l], vcs[l], slots, slot0, cells, n_kv, mask, scale);
    x = ffn_block(x, a, ws[w], types[w], norms[2 * l + 1], eps, ws[w + 1], types[w + 1], ws[w + 2], types[w + 2],
                  ws[w + 3], types[w + 3], rows[w + 1], act);  // w1's rows: n_ff
    w += 4;
  }
  TORCH_CHECK(w == int64_t(ws.size()), "kvbench decode_forward: ", int64_t(ws.size()) - w, " matrices left over");
  if (out_rows.has_value()) x = x.index_select(0, *out_rows);
  return qmm(rms_norm(x, out_norm, out_eps), head, head_type, n_vocab, x.size(1), act);
}

// decode_forward's arguments that belong to the model, held once (Transformer.fuse builds one): a step then
// passes the few that change (tokens, positions, the memory's storage and places). Why: after the weights'
// stream has evicted the caches, converting ~100 arguments of the plain op cost ~70 us of a ~2.1 ms
// llama-small Q4_0 step (17 us warm); a method call with ten costs 28 (6 warm).
struct DecodeStack : torch::CustomClassHolder {
  at::Tensor embd, out_norm, head;
  int64_t embd_type, embd_rows, n_head, n_head_kv, d_k, d_v, act, head_type, n_vocab;
  c10::optional<at::Tensor> inv_freq;
  std::vector<at::Tensor> ws, norms, biases;
  std::vector<int64_t> types, rows, nparts;
  bool neox;
  double eps, scale, out_eps;
  std::vector<float> cos_tab, sin_tab;  // rope's angles of positions [0, n_tab): see angles()
  int64_t n_tab = 0;

  DecodeStack(at::Tensor embd_, int64_t embd_type_, int64_t embd_rows_, c10::optional<at::Tensor> inv_freq_,
              std::vector<at::Tensor> ws_, std::vector<int64_t> types_, std::vector<int64_t> rows_,
              std::vector<int64_t> nparts_, std::vector<at::Tensor> norms_, std::vector<at::Tensor> biases_,
              bool neox_, int64_t n_head_, int64_t n_head_kv_, int64_t d_k_, int64_t d_v_, double eps_,
              double scale_, int64_t act_, at::Tensor out_norm_, double out_eps_, at::Tensor head_,
              int64_t head_type_, int64_t n_vocab_)
      : embd(std::move(embd_)), out_norm(std::move(out_norm_)), head(std::move(head_)), embd_type(embd_type_),
        embd_rows(embd_rows_), n_head(n_head_), n_head_kv(n_head_kv_), d_k(d_k_), d_v(d_v_), act(act_),
        head_type(head_type_), n_vocab(n_vocab_), inv_freq(std::move(inv_freq_)), ws(std::move(ws_)),
        norms(std::move(norms_)), biases(std::move(biases_)), types(std::move(types_)), rows(std::move(rows_)),
        nparts(std::move(nparts_)), neox(neox_), eps(eps_), scale(scale_), out_eps(out_eps_) {
    TORCH_CHECK(act >= 0 && act <= 2, "kvbench DecodeStack: act must be 0 (float32), 1 (int8) or 2 (q16)");
  }

  at::Tensor forward(const at::Tensor& token, const at::Tensor& pos, const std::vector<at::Tensor>& kcs,
                     const std::vector<at::Tensor>& vcs, const c10::optional<at::Tensor>& slots, int64_t slot0,
                     const c10::optional<at::Tensor>& cells, int64_t n_kv, const c10::optional<at::Tensor>& mask,
                     const c10::optional<at::Tensor>& out_rows) {
    c10::optional<at::Tensor> cos, sin;
    if (inv_freq.has_value()) std::tie(cos, sin) = angles(pos);
    return decode_forward(token, cos, sin, embd, embd_type, embd_rows, ws, types, rows, nparts, norms, biases,
                          kcs, vcs, slots, slot0, cells, n_kv, mask, neox, n_head, n_head_kv, d_k, d_v, eps, scale,
                          act, out_rows, out_norm, out_eps, head, head_type, n_vocab);
  }

  // cos and sin (T, 1, n_rot/2) of positions pos, from tables of every position so far, grown 256 positions at a
  // time by the ops Rope.angles runs (float64 theta = pos * inv_freq, its cos and sin, then float32): the same
  // values, element by element, as computing them each step (256 x n_rot/2 values a call, a multiple of the
  // vector width, so no element takes the scalar tail), where eight torch ops at the start of a step cost
  // ~40 us, the caches cold.
  std::pair<at::Tensor, at::Tensor> angles(const at::Tensor& pos_in) {
    const at::Tensor pos = pos_in.to(at::kLong).contiguous();
    const int64_t T = pos.numel(), half = inv_freq->numel();
    const int64_t* pp = pos.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(pp[t] >= 0, "kvbench DecodeStack: position ", pp[t], " is negative");
      while (pp[t] >= n_tab) {
        const at::Tensor theta = at::arange(n_tab, n_tab + 256, at::kLong).to(at::kDouble).unsqueeze(1) *
                                 inv_freq->unsqueeze(0);
        const at::Tensor c = theta.cos().to(at::kFloat).contiguous(), s = theta.sin().to(at::kFloat).contiguous();
        cos_tab.insert(cos_tab.end(), c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
        sin_tab.insert(sin_tab.end(), s.data_ptr<float>(), s.data_ptr<float>() + s.numel());
        n_tab += 256;
      }
    }
    at::Tensor c = at::empty({T, 1, half}, at::kFloat), s = at::empty({T, 1, half}, at::kFloat);
    for (int64_t t = 0; t < T; ++t) {
      std::memcpy(c.data_ptr<float>() + t * half, cos_tab.data() + pp[t] * half, half * sizeof(float));
      std::memcpy(s.data_ptr<float>() + t * half, sin_tab.data() + pp[t] * half, half * sizeof(float));
    }
    return {c, s};
  }
};

// Mamba-1's selective scan over time for S sequences: s_t = dA_t * s_{t-1} + dBx_t (elementwise over (di, ds)),
// y_t = sum_n s_t[:, n] C_t[n]. dA, dBx (S, T, di, ds), C (S, T, ds), s0 (S, di, ds), float32. The state update
// is the same two roundings as the torch expression (a product, then a sum: -ffp-contract=off keeps them apart),
// so s equals the sequential torch loop bit for bit; y sums over n in order. Why a kernel: the recurrence is
// sequential in time, and a Python loop of three small torch ops per token cost more than the arithmetic.
// Parallel over (sequence, channel) rows.
std::vector<at::Tensor> ssm_scan(const at::Tensor& dA_in, const at::Tensor& dBx_in, const at::Tensor& C_in,
                                 const at::Tensor& s0_in) {
  TORCH_CHECK(dA_in.dim() == 4 && dA_in.sizes() == dBx_in.sizes() && C_in.dim() == 3 && s0_in.dim() == 3,
              "kvbench ssm_scan: dA, dBx (S, T, di, ds), C (S, T, ds), s0 (S, di, ds)");
  for (const auto* t : {&dA_in, &dBx_in, &C_in, &s0_in})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "kvbench ssm_scan: float32 CPU tensors");
  const at::Tensor dA = dA_in.contiguous(), dBx = dBx_in.contiguous(), C = C_in.contiguous();
  const int64_t S = dA.size(0), T = dA.size(1), di = dA.size(2), ds = dA.size(3);
  TORCH_CHECK(C.size(0) == S && C.size(1) == T && C.size(2) == ds && s0_in.size(0) == S && s0_in.size(1) == di &&
              s0_in.size(2) == ds, "kvbench ssm_scan: shapes disagree");
  at::Tensor s = s0_in.contiguous().clone();
  at::Tensor y = at::empty({S, T, di}, dA.options());
  const float* a = dA.data_ptr<float>();
  const float* b = dBx.data_ptr<float>();
  const float* c = C.data_ptr<float>();
  float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, T * ds));
  at::parallel_for(0, S * di, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t q = r / di, d = r % di;
      float* st = sp + r * ds;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t o = ((q * T + t) * di + d) * ds;
        const float* ct = c + (q * T + t) * ds;
        float acc = 0.f;
        for (int64_t n = 0; n < ds; ++n) {
          const float prod = a[o + n] * st[n];
          st[n] = prod + b[o + n];
          acc += st[n] * ct[n];
        }
        yp[(q * T + t) * di + d] = acc;
      }
    }
  });
  return {y, s};
}

// RWKV-7's wkv7 (ggml_rwkv_wkv7): per head an N x N state S[i = value][j = key];
//   sa = S_i . a;  S_i = S_i * w + v_i k + sa b;  y_i = S_i . r
// Row i of a head's state only ever reads row i, so the rows are independent: the loop runs in parallel over
// sequence x head x row, and each thread walks its row through time with the row in cache.
std::vector<at::Tensor> wkv7(const at::Tensor& r_in, const at::Tensor& w_in, const at::Tensor& k_in,
                             const at::Tensor& v_in, const at::Tensor& a_in, const at::Tensor& b_in,
                             const at::Tensor& s0_in) {
  TORCH_CHECK(r_in.dim() == 4 && s0_in.dim() == 4, "kvbench wkv7: r, w, k, v, a, b (S, T, H, N), s0 (S, H, N, N)");
  for (const auto* t : {&r_in, &w_in, &k_in, &v_in, &a_in, &b_in, &s0_in}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "kvbench wkv7: float32 CPU tensors");
    if (t != &s0_in) TORCH_CHECK(t->sizes() == r_in.sizes(), "kvbench wkv7: r, w, k, v, a, b shapes disagree");
  }
  const int64_t S = r_in.size(0), T = r_in.size(1), H = r_in.size(2), N = r_in.size(3);
  TORCH_CHECK(s0_in.size(0) == S && s0_in.size(1) == H && s0_in.size(2) == N && s0_in.size(3) == N,
              "kvbench wkv7: s0 must be (S, H, N, N)");
  const at::Tensor r = r_in.contiguous(), w = w_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(),
                   a = a_in.contiguous(), b = b_in.contiguous();
  at::Tensor s = s0_in.contiguous().clone();
  at::Tensor y = at::empty({S, T, H, N}, r.options());
  const float *rp = r.data_ptr<float>(), *wp = w.data_ptr<float>(), *kp = k.data_ptr<float>(),
              *vp = v.data_ptr<float>(), *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, T * N));
  at::parallel_for(0, S * H * N, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t q = row / (H * N), h = (row / N) % H, i = row % N;
      float* st = sp + row * N;  // (S, H, N, N) contiguous: row (q, h, i) starts at row * N
      for (int64_t t = 0; t < T; ++t) {
        const int64_t o = ((q * T + t) * H + h) * N;
        float sa = 0.f;
        for (int64_t j = 0; j < N; ++j) sa += st[j] * ap[o + j];
        const float vi = vp[o + i];
        float acc = 0.f;
        for (int64_t j = 0; j < N; ++j) {
          st[j] = st[j] * wp[o + j] + vi * kp[o + j] + sa * bp[o + j];
          acc += st[j] * rp[o + j];
        }
        yp[o + i] = acc;
      }
    }
  });
  return {y, s};
}

bool simd() { return KV_AVX2; }
bool simd512() { return KV_AVX512; }

}  // namespace

TORCH_LIBRARY(kvbench, m) {
  m.def("qmm(Tensor x, Tensor w, int type, int n, int k, int act) -> Tensor");
  m.def("dequant(Tensor w, int type, int n, int k, Tensor? rows, bool bf16) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("silu_mul(Tensor g, Tensor u) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin, bool neox) -> Tensor");
  m.def("attend_small(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  m.def("kv_attend(Tensor q, Tensor k, Tensor v, Tensor(a!) kc, Tensor(b!) vc, Tensor? slots, int slot0, Tensor? cells, "
        "int n_kv, Tensor? mask, float scale) -> Tensor");
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<at::Tensor, int64_t, int64_t, c10::optional<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, bool, int64_t, int64_t, int64_t, int64_t, double, double, int64_t,
                       at::Tensor, double, at::Tensor, int64_t, int64_t>())
      .def("forward", &DecodeStack::forward);
  m.def("attn_qkv(Tensor x, Tensor norm_w, float eps, Tensor[] ws, int[] types, int[] rows, Tensor? bias, Tensor? cos, "
        "Tensor? sin, "
        "bool neox, int n_head, int n_head_kv, int d_k, int d_v, int act) -> Tensor[]");
  m.def("ffn_block(Tensor x, Tensor a, Tensor wo, int to, Tensor norm_w, float eps, Tensor w1, int t1, Tensor w3, "
        "int t3, Tensor w2, int t2, int n_ff, int act) -> Tensor");
  m.def("ssm_scan(Tensor dA, Tensor dBx, Tensor C, Tensor s0) -> Tensor[]");
  m.def("wkv7(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor s0) -> Tensor[]");
  m.def("simd", simd);  // was the AVX2 path compiled in
  m.def("simd512", simd512);  // and the AVX-512 one
  m.def("x16", x16);  // and the interleaved (x16) kernel (AVX-512 VNNI)
  m.def("repack_x16(Tensor w, int type, int n, int k, Tensor(a!)? out=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvbench, CPU, m) {
  m.impl("qmm", qmm);
  m.impl("dequant", dequant);
  m.impl("rms_norm", rms_norm);
  m.impl("silu_mul", silu_mul);
  m.impl("rope", rope);
  m.impl("attend_small", attend_small);
  m.impl("attn_qkv", attn_qkv);
  m.impl("kv_attend", kv_attend);
  m.impl("repack_x16", repack_x16);
  m.impl("ffn_block", ffn_block);
  m.impl("ssm_scan", ssm_scan);
  m.impl("wkv7", wkv7);
}

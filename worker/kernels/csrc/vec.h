// Helpers shared by the attention kernels: GCC's generic vector type of one register's floats (16
// with AVX-512, else 8: one AVX2 register, two SSE or NEON ones, so the kernels build for any x86
// or ARM CPU), element conversions, a whole-vector exp, a transposing horizontal sum, the work
// queue that spreads uneven items over the kernels' threads (pool.h), and whether bf16 dot products
// (`vdpbf16ps`, AVX512_BF16) are compiled in.
//
// Why not 16 floats everywhere: GCC splits a generic vector wider than the target's registers
// into pieces it moves through the stack (perf on a Zen 3: the prefill attention's products were
// mostly 16-byte spills and reloads, 4.5 GFLOP/s).
#pragma once

#include <torch/extension.h>
#include "pool.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace spindle_vec {

#if defined(__AVX512F__)
constexpr int64_t LANES = 16;  // floats per vector
#else
constexpr int64_t LANES = 8;
#endif

// The attention kernels' bf16 paths multiply bf16 pairs with `vdpbf16ps` where the CPU has it
// (products of two bf16 are exact in fp32, summed in fp32); elsewhere they convert to fp32.
#if defined(__AVX512BF16__)
constexpr bool BF16_DOT = true;
#else
constexpr bool BF16_DOT = false;
#endif

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef uint32_t uvec __attribute__((vector_size(LANES * sizeof(uint32_t))));
typedef uint16_t u16vec __attribute__((vector_size(LANES * sizeof(uint16_t))));

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
inline float to_float(at::Half x) { return static_cast<float>(x); }

inline vec splat(float x) { return vec{} + x; }

// The vector whose lane i holds i.
inline ivec lane_indices() {
  ivec lanes{};
  for (int32_t l = 0; l < LANES; ++l) lanes[l] = l;
  return lanes;
}

// LANES consecutive elements as a float vector.
inline vec load(const float* src) {
  vec out;
  std::memcpy(&out, src, sizeof(vec));
  return out;
}
inline vec bf16_bits_to_vec(u16vec halves) {
  const uvec bits = __builtin_convertvector(halves, uvec) << 16;
  vec out;
  std::memcpy(&out, &bits, sizeof(vec));
  return out;
}
inline vec load(const at::BFloat16* src) {
  u16vec halves;
  std::memcpy(&halves, src, sizeof(halves));
  return bf16_bits_to_vec(halves);
}
inline vec load(const at::Half* src) {
  alignas(64) float lanes[LANES];
  for (int64_t l = 0; l < LANES; ++l) lanes[l] = static_cast<float>(src[l]);
  return load(lanes);
}

// `v` rounded to T's precision (round to nearest even, as torch converts), as floats; and
// stored as T. bf16 uses AVX512_BF16's `vcvtneps2bf16` where compiled in.
inline u16vec to_bf16_bits(vec v) {
#if defined(__AVX512BF16__)
  const __m256bh packed = _mm512_cvtneps_pbh((__m512)v);
  u16vec halves;
  std::memcpy(&halves, &packed, sizeof(halves));
  return halves;
#else
  // round to nearest even on the bits, as c10::BFloat16 does for finite values (-ffast-math
  // assumes no NaN)
  uvec bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return __builtin_convertvector((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16, u16vec);
#endif
}
template <typename T>
inline vec round_vec(vec v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) return bf16_bits_to_vec(to_bf16_bits(v));
  return v;
}
inline void store(float* dst, vec v) { std::memcpy(dst, &v, sizeof(vec)); }
inline void store(at::BFloat16* dst, vec v) {
  const u16vec halves = to_bf16_bits(v);
  std::memcpy(dst, &halves, sizeof(halves));
}

// exp(x - shift) for whole vectors: 2^n * p(r) with x - shift = n ln2 + r, |r| <= ln2 / 2, p a
// degree-6 polynomial (relative error ~2e-7); below -87 (masked scores) the result is exactly 0.
inline vec exp_minus(vec x, vec shift) {
  x -= shift;
  const ivec live = x > splat(-87.0f);
  x = live ? x : splat(-87.0f);
  const vec half = x < splat(0.0f) ? splat(-0.5f) : splat(0.5f);
  const vec n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f + half, ivec), vec);
  const vec r = x - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;
  vec p = splat(1.0f / 720) * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof(vec));
  return live ? p * scale : vec{};
}

// SiLU(g) = g / (1 + exp(-g)) for whole vectors, exp's argument capped at 80: -ffast-math assumes
// no infinities (SiLU(-80) is 0 anyway). Shared by silu_and_mul and the fused gate|up kernel.
inline vec silu(vec g) {
  const vec minus_g = -g, cap = splat(80.0f);
  return g / (splat(1.0f) + exp_minus(minus_g < cap ? minus_g : cap, vec{}));
}

// SiLU(gate) * up for `rows` rows of `width` (a multiple of LANES) fp32 sums each, `ld` apart,
// into T rows `ldo` apart: the gated MLP's epilogue in the fused gate|up kernels. Rounded as the
// unfused layers round: gate and up to T (the linear's output), SiLU(gate) to T (the
// activation's), the product to T; in float32 that is plain SiLU(gate) * up.
template <typename T>
inline void store_silu_mul(T* out, int64_t ldo, int64_t rows, const float* gate, const float* up,
                           int64_t ld, int64_t width) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < width; i += LANES) {
      const vec activated = round_vec<T>(silu(round_vec<T>(load(gate + r * ld + i))));
      store(out + r * ldo + i, activated * round_vec<T>(load(up + r * ld + i)));
    }
}

// The vector whose lane i is the sum of x[i]'s lanes (x holds LANES vectors), by rounds of
// pairwise shuffle-and-add (LANES - 1 pairs in all) instead of LANES separate horizontal sums.
#if defined(__AVX512F__)
inline vec transpose_sum(const vec* x) {
  vec eights[8], fours[4], twos[2];
  for (int i = 0; i < 8; ++i) {
    const vec a = x[2 * i], b = x[2 * i + 1];
    eights[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22,
                                        23) +
                __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28,
                                        29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {
    const vec a = eights[2 * i], b = eights[2 * i + 1];
    fours[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25,
                                       26, 27) +
               __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29,
                                       30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    const vec a = fours[2 * i], b = fours[2 * i + 1];
    twos[i] = __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28,
                                      29) +
              __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27,
                                      30, 31);
  }
  return __builtin_shufflevector(twos[0], twos[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24,
                                 26, 28, 30) +
         __builtin_shufflevector(twos[0], twos[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25,
                                 27, 29, 31);
}
#else
inline vec transpose_sum(const vec* x) {
  vec fours[4], twos[2];
  for (int i = 0; i < 4; ++i) {
    const vec a = x[2 * i], b = x[2 * i + 1];
    fours[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) +
               __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  }
  for (int i = 0; i < 2; ++i) {
    const vec a = fours[2 * i], b = fours[2 * i + 1];
    twos[i] = __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13) +
              __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15);
  }
  return __builtin_shufflevector(twos[0], twos[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(twos[0], twos[1], 1, 3, 5, 7, 9, 11, 13, 15);
}
#endif

// The threads for_each_item runs `count` items on. It hands indices out in order, so the item a
// thread takes after item i is about i + item_threads(count).
inline int64_t item_threads(int64_t count) {
  return std::max<int64_t>(1, std::min<int64_t>(spindle_pool::max_threads(), count));
}

// Runs work(state, i) for every i in [0, count) on the kernels' threads, each taking the next
// index from a shared counter (callers order items longest first, so the threads finish
// together); make_state() builds each thread's scratch once.
template <typename MakeState, typename Work>
void for_each_item(int64_t count, MakeState make_state, Work work) {
  std::atomic<int64_t> next{0};
  const int64_t threads = item_threads(count);
  spindle_pool::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t index = next++; index < count; index = next++) work(state, index);
  });
}

}  // namespace spindle_vec

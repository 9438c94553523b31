// The vector operations the direct algorithm (direct_conv.cpp) is written over, one struct per instruction set,
// chosen at compile time from the build's macros: AVX-512F (16 lanes, mask registers), else AVX2 + FMA (8 lanes,
// integer lane masks), else none (MMSEG_CBT_DIRECT undefined: the kernel has only its gather + GEMM algorithm).
// MMSEG_CBT_NO_DIRECT (ext_loader's MMSEG_CBT_CPU_ISA=none) leaves the direct algorithm out of any build.
#pragma once

#include <cstdint>

#if !defined(MMSEG_CBT_NO_DIRECT) && (defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)))
#include <immintrin.h>
#define MMSEG_CBT_DIRECT 1
#endif

namespace mmseg_cbt {

#ifdef MMSEG_CBT_DIRECT
#if defined(__AVX512F__)
struct Isa {
  using V = __m512;
  using M = __mmask16;
  static constexpr int L = 16;
  static constexpr const char* name = "avx512";
  // 32 registers: up to 16 accumulators in the thin path's blocks, 6 positions x 4 vectors in the wide microkernel
  static constexpr int kThinMaxBlock = 4;
  static constexpr int kTailGroup = 4;
  static constexpr int kWideNB = 4;
  // the wide variant from 5 vectors (72 channels) on: measured faster than the thin one there, slower below
  static constexpr int kWideMinVec = 5;
  static inline M mask(int64_t left) {
    return left >= L ? static_cast<M>(0xFFFF) : static_cast<M>((1u << (left > 0 ? left : 0)) - 1u);
  }
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  // masked-out lanes are not read (no fault past the end of a buffer) and come back as 0
  static inline V load(M m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static inline V set1(float x) { return _mm512_set1_ps(x); }
  static inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  // returns its second operand when one is NaN: called as max(zero, v), a NaN stays NaN (as in torch.relu)
  static inline V max(V a, V b) { return _mm512_max_ps(a, b); }
  static inline float reduce_add(V a) { return _mm512_reduce_add_ps(a); }
  static inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static inline void store(M m, float* p, V v) { _mm512_mask_storeu_ps(p, m, v); }
};
#else
struct Isa {
  using V = __m256;
  using M = __m256i;
  static constexpr int L = 8;
  static constexpr const char* name = "avx2";
  // 16 registers: 3 x 4 accumulators + 3 weights + 1 broadcast in the thin path, 4 x 3 + 3 + 1 in the wide one
  static constexpr int kThinMaxBlock = 3;
  static constexpr int kTailGroup = 2;
  static constexpr int kWideNB = 3;
  // the wide variant from 13 vectors (104 channels) on: the thin one measured faster at 36-96 channels
  static constexpr int kWideMinVec = 13;
  static inline M mask(int64_t left) {
    const int n = left >= L ? L : (left > 0 ? static_cast<int>(left) : 0);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static inline V zero() { return _mm256_setzero_ps(); }
  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  // vmaskmovps: masked-out lanes are not read (no fault past the end of a buffer) and come back as 0
  static inline V load(M m, const float* p) { return _mm256_maskload_ps(p, m); }
  static inline V set1(float x) { return _mm256_set1_ps(x); }
  static inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static inline V add(V a, V b) { return _mm256_add_ps(a, b); }
  // vmaxps returns its second operand when one is NaN: called as max(zero, v), a NaN stays NaN
  static inline V max(V a, V b) { return _mm256_max_ps(a, b); }
  static inline float reduce_add(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static inline void store(M m, float* p, V v) { _mm256_maskstore_ps(p, m, v); }
};
#endif
#endif

// 'avx512', 'avx2' or 'none': which direct algorithm this build has.
inline const char* isa_name() {
#ifdef MMSEG_CBT_DIRECT
  return Isa::name;
#else
  return "none";
#endif
}

}  // namespace mmseg_cbt

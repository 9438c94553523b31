// The direct ("im2col-free") float32 algorithms of the masked conv's CPU kernel (direct_conv.cpp), over the
// instruction set of the build (simd.h).
#pragma once

#include <torch/extension.h>

#include <cstdint>

namespace mmseg_cbt {

// Which direct algorithm sparse_conv_gemm's `direct` argument selects.
enum DirectMode : int64_t {
  kGemm = 0,    // none: gather + GEMM
  kDirect = 1,  // the direct algorithm, thin or wide variant chosen here by the conv's width (direct_wide)
  kThin = 2,    // forced thin variant (tests)
  kWide = 3,    // forced wide, cache-blocked variant (tests)
  kThinVectorTail = 4,  // thin variant, the last cout % L <= 4 channels as one more masked vector instead of dot
                        // products (faster where horizontal sums are dear against full-width FMAs: per-CPU tuning)
};

// Whether this build has a direct algorithm (AVX-512 or AVX2 + FMA, not disabled).
bool direct_available();

// Whether kDirect runs the wide variant for `cout` output channels.
bool direct_wide(int64_t cout);

// Whether run_direct in `mode` takes the wide variant for `cout` output channels.
bool direct_runs_wide(int64_t mode, int64_t cout);

// The wide variant's weights, vector-major: for each output vector v, the (rows, L) slice of wmat's columns
// [v * L, v * L + L) (zeros past Cout), contiguous, so that a K-block of any rows reads each vector's weights as
// one stream. wide_pack_floats: the floats pack_wide writes (dst 64-byte aligned).
int64_t wide_pack_floats(int64_t rows, int64_t cout);
void pack_wide(const at::Tensor& wmat, float* dst);

// dst[dst_rows[i]] = relu(window(src, strips[i*k : i*k+k] - base) @ wmat + bias + res[res_rows[i]]) (float32; the
// arguments as sparse_conv_gemm's, checked there). base: the row of the full buffer that src's first row is (a band
// of it, in the one-conv op). keep_plan: the thin variant reuses this thread's weight layout of its previous call
// (the same conv's previous band) instead of rebuilding it. wide_pack: the wide variant's packed weights
// (pack_wide of wmat), or nullptr to pack them in this call.
void run_direct(const at::Tensor& src, const at::Tensor& strips, int64_t k, const at::Tensor& wmat, const float* bias,
                const float* res, const int64_t* res_rows, bool relu, float* dst, const int64_t* dst_rows,
                int64_t mode, int64_t base = 0, bool keep_plan = false, const float* wide_pack = nullptr);

}  // namespace mmseg_cbt

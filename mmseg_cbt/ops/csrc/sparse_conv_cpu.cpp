// CPU kernel of mmseg_cbt's masked ("sparse") convolution, two algorithms over the same index tables:
//  - gather -> GEMM -> epilogue -> scatter, fused per chunk (any float dtype, any width; BLAS sgemm / dgemm);
//  - a direct algorithm for float32 that reads each window in place (no gather, no BLAS) and writes the output rows
//    directly (direct_conv.cpp; AVX-512 or AVX2 + FMA, from the build's flags: simd.h).
// Which one runs is decided in Python (mmseg_cbt/ops/policy.py: the `direct` argument). The PyTorch path
// (mmseg_cbt/ops/sparse_conv/torch_impl.py) computes the same from the same tables and is the reference of both in
// the parity tests. Why a compiled kernel on top of it: there every op of a chunk is its own OpenMP region (a
// fork/join per op, the block written and read by both threads); here each thread owns whole chunks, gathers into
// its own L2-sized block, runs a single-threaded GEMM and the epilogue while the rows are in L1. Measurements:
// docs/benchmarks.md.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "direct_conv.h"
#include "simd.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// The BLAS GEMM that at::mm_out ends in, called directly: at::mm_out's dispatch and checks cost ~3-5 us per chunk,
// a tenth of a thin chunk's GEMM. Fortran interface (column-major), looked up in the torch library already loaded (MKL is linked into torch's
// x86 CPU builds); when absent, or for a non-contiguous weight, at::mm_out is used.
typedef void (*sgemm_fn)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
typedef void (*dgemm_fn)(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
                         const int*, const double*, const int*, const double*, double*, const int*);
struct Blas {
  sgemm_fn sgemm = nullptr;
  dgemm_fn dgemm = nullptr;
};
const Blas& blas() {
  static const Blas b = [] {
    Blas r;
    void* h = dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD);
    if (h != nullptr) {
      r.sgemm = reinterpret_cast<sgemm_fn>(dlsym(h, "sgemm_"));
      r.dgemm = reinterpret_cast<dgemm_fn>(dlsym(h, "dgemm_"));
    }
    return r;
  }();
  return b;
}

// o (n x cout, row-major) = a (n x kkc, row-major) @ w (kkc x cout, row-major, contiguous); in column-major terms
// o^T = w^T a^T, so the call passes w first.
template <typename T>
void gemm_rows(const T* a, const T* w, T* o, int64_t n, int64_t kkc, int64_t cout, const at::Tensor& wmat,
               const at::TensorOptions& opts) {
  const int m_ = static_cast<int>(cout), n_ = static_cast<int>(n), k_ = static_cast<int>(kkc);
  const T one = 1, zero = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (blas().sgemm != nullptr && w != nullptr) {
      blas().sgemm("N", "N", &m_, &n_, &k_, &one, w, &m_, a, &k_, &zero, o, &m_);
      return;
    }
  } else {
    if (blas().dgemm != nullptr && w != nullptr) {
      blas().dgemm("N", "N", &m_, &n_, &k_, &one, w, &m_, a, &k_, &zero, o, &m_);
      return;
    }
  }
  at::Tensor ov = at::from_blob(o, {n, cout}, opts);
  at::mm_out(ov, at::from_blob(const_cast<T*>(a), {n, kkc}, opts), wmat);
}

// Short rows (54-1152 values): an inlined, vectorised loop instead of a memcpy call per row.
template <typename T>
inline void copy_row(T* __restrict__ d, const T* __restrict__ s, int64_t n) {
  for (int64_t j = 0; j < n; ++j) d[j] = s[j];
}

// ReLU that keeps NaN, as torch.relu does: a NaN compares false, so it is returned unchanged (x > 0 ? x : 0 would
// turn it into 0).
template <typename T>
inline T relu_keep_nan(T x) {
  return x < T(0) ? T(0) : x;
}

template <typename T>
void run_chunks(const at::Tensor& src, const at::Tensor& strips, int64_t k, const at::Tensor& wmat,
                const T* bias, const T* res, const int64_t* res_rows, bool relu, T* dst,
                const int64_t* dst_rows, int64_t chunk, int64_t base = 0) {
  const int64_t cin = src.size(1);
  const int64_t m = strips.numel() / k;
  const int64_t strip = k * cin, kkc = k * strip, cout = wmat.size(1);
  const T* s = src.data_ptr<T>();
  const int64_t* st = strips.data_ptr<int64_t>();
  const int64_t nchunks = (m + chunk - 1) / chunk;
  // grain 1: every chunk is a task; OpenMP splits the chunk range into one contiguous share per thread
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    // per-thread scratch kept between calls: a fresh 100 KiB-1 MiB allocation per call and thread costs page
    // faults (glibc serves it by mmap) that are comparable to a small conv
    thread_local std::vector<T> a_buf, o_buf;
    if (a_buf.size() < static_cast<size_t>(chunk * kkc)) a_buf.resize(chunk * kkc);
    if (o_buf.size() < static_cast<size_t>(chunk * cout)) o_buf.resize(chunk * cout);
    T* ap = a_buf.data();
    T* op = o_buf.data();
    const auto opts = src.options();
    // the direct BLAS call needs the weight as one contiguous row-major block (PackedConv's wmat is)
    const T* w = wmat.is_contiguous() ? wmat.data_ptr<T>() : nullptr;
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t p0 = c * chunk, n = std::min(chunk, m - p0);
      // im2col of the chunk: k contiguous strips of k*cin values per window (see SparseIndex.windows)
      const int64_t* sc = st + p0 * k;
      for (int64_t i = 0; i < n * k; ++i) {
        copy_row(ap + i * strip, s + (sc[i] - base) * cin, strip);
      }
      gemm_rows<T>(ap, w, op, n, kkc, cout, wmat, opts);
      for (int64_t i = 0; i < n; ++i) {
        T* orow = op + i * cout;
        if (bias) {
          for (int64_t j = 0; j < cout; ++j) orow[j] += bias[j];
        }
        if (res) {
          // read before the scatter below: the residual may be the output buffer itself (same row)
          const T* rrow = res + (res_rows ? res_rows[p0 + i] : p0 + i) * cout;
          for (int64_t j = 0; j < cout; ++j) orow[j] += rrow[j];
        }
        if (relu) {
          for (int64_t j = 0; j < cout; ++j) orow[j] = relu_keep_nan(orow[j]);
        }
        copy_row(dst + (dst_rows ? dst_rows[p0 + i] : p0 + i) * cout, orow, cout);
      }
    }
  });
}

void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(),
              name, " must be a contiguous 1-D int64 CPU tensor");
}

// Every entry of an index table in [0, limit]: one pass (microseconds for the tables of a 128x256 map), so a wrong
// table is an error instead of a write outside the buffer.
void check_range(const at::Tensor& t, int64_t limit, const char* name) {
  const int64_t* p = t.data_ptr<int64_t>();
  const int64_t n = t.numel();
  if (n == 0) return;
  int64_t lo = p[0], hi = p[0];
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, p[i]);
    hi = std::max(hi, p[i]);
  }
  TORCH_CHECK(lo >= 0 && hi <= limit, name, " holds rows outside [0, ", limit, "]: ", lo, "..", hi);
}

// Whether the direct kernel can run this conv (float32 on a build with a direct algorithm).
bool direct_supported(at::ScalarType dtype) { return mmseg_cbt::direct_available() && dtype == at::kFloat; }

// The wide variant's packed weights for this call: the caller's (pack_wide of wmat, checked for its size) when the
// wide variant runs, nullptr otherwise (the kernel then packs them itself).
const float* wide_pack_for(const c10::optional<at::Tensor>& pack, const at::Tensor& wmat, int64_t direct) {
  if (!pack.has_value() || !mmseg_cbt::direct_runs_wide(direct, wmat.size(1))) return nullptr;
  TORCH_CHECK(pack->scalar_type() == at::kFloat && pack->is_contiguous() && pack->device().is_cpu() &&
              pack->numel() == mmseg_cbt::wide_pack_floats(wmat.size(0), wmat.size(1)),
              "wide_pack must be pack_wide(wmat): a contiguous float32 CPU tensor of ",
              mmseg_cbt::wide_pack_floats(wmat.size(0), wmat.size(1)), " values");
  return pack->data_ptr<float>();
}

// pack_wide as a tensor (64-byte aligned by torch's CPU allocator).
at::Tensor pack_wide_tensor(const at::Tensor& wmat) {
  TORCH_CHECK(wmat.device().is_cpu() && wmat.dim() == 2 && wmat.scalar_type() == at::kFloat,
              "wmat must be a float32 (k*k*Cin, Cout) CPU matrix");
  TORCH_CHECK(mmseg_cbt::direct_available(), "this build has no direct algorithm");
  at::Tensor out = at::empty({mmseg_cbt::wide_pack_floats(wmat.size(0), wmat.size(1))}, wmat.options());
  mmseg_cbt::pack_wide(wmat, out.data_ptr<float>());
  return out;
}

}  // namespace

// dst[dst_rows[i]] = relu(gather(src, strips[i*k : i*k+k]) @ wmat + bias + res[res_rows[i]]), i < M.
//
// src: (R, Cin) flat rows of the padded channels-last input buffer; strips: (M*k,) row where each window strip
// (k*Cin contiguous values) starts; wmat: (k*k*Cin, Cout); bias: (Cout,); res: (R', Cout) flat residual rows
// indexed by res_rows (M,), or compact (M, Cout) rows when res_rows is None; dst: (R'', Cout) flat output rows
// indexed by dst_rows (M,), or compact (M, Cout) when dst_rows is None. Row indices are range-checked (a strip must
// end inside src). direct: 0 runs the gather + GEMM, 1 the direct algorithm (float32, a build with one: its thin or
// wide variant by the width), 2 / 3 its thin / wide variant forced (tests); the caller chooses
// (mmseg_cbt.ops.policy). wide_pack: pack_wide(wmat), which the wide variant reads instead of packing the weights
// in the call (the caller caches it per weight matrix; ignored by the other algorithms).
void sparse_conv_gemm(const at::Tensor& src, const at::Tensor& strips, int64_t k, const at::Tensor& wmat,
                      const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& res,
                      const c10::optional<at::Tensor>& res_rows, bool relu, at::Tensor dst,
                      const c10::optional<at::Tensor>& dst_rows, int64_t chunk, int64_t direct,
                      const c10::optional<at::Tensor>& wide_pack) {
  TORCH_CHECK(src.device().is_cpu() && src.dim() == 2 && src.is_contiguous(), "src must be contiguous 2-D CPU rows");
  TORCH_CHECK(src.scalar_type() == at::kFloat || src.scalar_type() == at::kDouble, "src must be float32 or float64");
  TORCH_CHECK(k == 1 || k == 3, "kernel size must be 1 or 3");
  check_index(strips, "strips");
  TORCH_CHECK(strips.numel() % k == 0, "strips must hold k entries per position");
  check_range(strips, src.size(0) - k, "strips");
  const int64_t m = strips.numel() / k, cout = wmat.size(1);
  TORCH_CHECK(wmat.dim() == 2 && wmat.size(0) == k * k * src.size(1) && wmat.scalar_type() == src.scalar_type(),
              "wmat must be (k*k*Cin, Cout) of the input's dtype");
  TORCH_CHECK(dst.dim() == 2 && dst.size(1) == cout && dst.is_contiguous() && dst.scalar_type() == src.scalar_type(),
              "dst must be contiguous (rows, Cout) of the input's dtype");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  if (dst_rows.has_value()) {
    check_index(*dst_rows, "dst_rows");
    TORCH_CHECK(dst_rows->numel() == m, "dst_rows must have one entry per position");
    check_range(*dst_rows, dst.size(0) - 1, "dst_rows");
  } else {
    TORCH_CHECK(dst.size(0) == m, "compact dst must have one row per position");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == cout && bias->is_contiguous() && bias->scalar_type() == src.scalar_type(),
                "bias must be contiguous (Cout,) of the input's dtype");
  }
  if (res.has_value()) {
    TORCH_CHECK(res->dim() == 2 && res->size(1) == cout && res->is_contiguous() &&
                res->scalar_type() == src.scalar_type(), "res must be contiguous (rows, Cout) of the input's dtype");
    if (res_rows.has_value()) {
      check_index(*res_rows, "res_rows");
      TORCH_CHECK(res_rows->numel() == m, "res_rows must have one entry per position");
      check_range(*res_rows, res->size(0) - 1, "res_rows");
    } else {
      TORCH_CHECK(res->size(0) == m, "compact res must have one row per position");
    }
  }
  TORCH_CHECK(direct >= 0 && direct <= 4,
              "direct must be 0 (GEMM), 1 (direct kernel), 2 (thin), 3 (wide) or 4 (thin, vector tail)");
  const bool can_direct = direct_supported(src.scalar_type());
  TORCH_CHECK(direct == 0 || can_direct, "the direct kernel runs float32 on an AVX-512 or AVX2 build (has_direct() "
              "says whether this build has it)");
  const float* packed = wide_pack_for(wide_pack, wmat, direct);
  if (m == 0) return;
  if (direct != 0) {
    mmseg_cbt::run_direct(src, strips, k, wmat, bias.has_value() ? bias->data_ptr<float>() : nullptr,
                          res.has_value() ? res->data_ptr<float>() : nullptr,
                          res.has_value() && res_rows.has_value() ? res_rows->data_ptr<int64_t>() : nullptr, relu,
                          dst.data_ptr<float>(), dst_rows.has_value() ? dst_rows->data_ptr<int64_t>() : nullptr,
                          direct, 0, false, packed);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "sparse_conv_gemm", [&] {
    run_chunks<scalar_t>(src, strips, k, wmat, bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
                         res.has_value() ? res->data_ptr<scalar_t>() : nullptr,
                         res.has_value() && res_rows.has_value() ? res_rows->data_ptr<int64_t>() : nullptr, relu,
                         dst.data_ptr<scalar_t>(), dst_rows.has_value() ? dst_rows->data_ptr<int64_t>() : nullptr,
                         chunk);
  });
}

// acc[i] += sum_t weights[i, t] * src[rows[i, t]], t < T: the HRNet fuse's bilinear upsampling (T = 4 taps) evaluated
// at the active rows only, in one pass over acc instead of T index_select + addcmul_ passes.
void add_weighted_rows(at::Tensor acc, const at::Tensor& src, const at::Tensor& rows, const at::Tensor& weights) {
  TORCH_CHECK(acc.device().is_cpu() && acc.dim() == 2 && acc.is_contiguous(), "acc must be contiguous 2-D CPU rows");
  TORCH_CHECK(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble, "acc must be float32 or float64");
  TORCH_CHECK(src.dim() == 2 && src.is_contiguous() && src.size(1) == acc.size(1) &&
              src.scalar_type() == acc.scalar_type(), "src must be contiguous (rows, C) of acc's dtype");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 2 && rows.is_contiguous() && rows.size(0) == acc.size(0),
              "rows must be contiguous int64 (M, T)");
  TORCH_CHECK(weights.scalar_type() == acc.scalar_type() && weights.sizes() == rows.sizes() && weights.is_contiguous(),
              "weights must be contiguous (M, T) of acc's dtype");
  check_range(rows, src.size(0) - 1, "rows");
  const int64_t m = acc.size(0), c = acc.size(1), taps = rows.size(1);
  AT_DISPATCH_FLOATING_TYPES(acc.scalar_type(), "add_weighted_rows", [&] {
    scalar_t* a = acc.data_ptr<scalar_t>();
    const scalar_t* s = src.data_ptr<scalar_t>();
    const int64_t* r = rows.data_ptr<int64_t>();
    const scalar_t* w = weights.data_ptr<scalar_t>();
    at::parallel_for(0, m, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t* __restrict__ ai = a + i * c;
        for (int64_t t = 0; t < taps; ++t) {
          const scalar_t* __restrict__ si = s + r[i * taps + t] * c;
          const scalar_t wt = w[i * taps + t];
          for (int64_t j = 0; j < c; ++j) ai[j] += wt * si[j];
        }
      }
    });
  });
}

#if defined(__AVX2__)
// dst[x * c + ch] = src[ch * sc + x] for x < nx and the channels of whole groups of 8 (returned: where the scalar
// copy of the rest starts): 8 x 8 tiles transposed in registers (8 loads, 24 shuffles, 8 stores) instead of 64
// scalar moves with strided stores; the 4-8x of the one-conv op's NCHW read.
inline int64_t transpose_channels8(const float* src, int64_t sc, int64_t c, int64_t nx, float* dst) {
  const int64_t nx8 = nx & ~int64_t(7);
  int64_t ch = 0;
  for (; ch + 8 <= c; ch += 8) {
    const float* sp = src + ch * sc;
    float* dp = dst + ch;
    for (int64_t x = 0; x < nx8; x += 8) {
      const __m256 r0 = _mm256_loadu_ps(sp + x), r1 = _mm256_loadu_ps(sp + sc + x);
      const __m256 r2 = _mm256_loadu_ps(sp + 2 * sc + x), r3 = _mm256_loadu_ps(sp + 3 * sc + x);
      const __m256 r4 = _mm256_loadu_ps(sp + 4 * sc + x), r5 = _mm256_loadu_ps(sp + 5 * sc + x);
      const __m256 r6 = _mm256_loadu_ps(sp + 6 * sc + x), r7 = _mm256_loadu_ps(sp + 7 * sc + x);
      const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
      const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
      const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
      const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* d = dp + x * c;
      _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(d + c, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(d + 2 * c, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(d + 3 * c, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(d + 4 * c, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(d + 5 * c, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(d + 6 * c, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(d + 7 * c, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
    for (int64_t x = nx8; x < nx; ++x)
      for (int64_t j = 0; j < 8; ++j) dp[x * c + j] = sp[j * sc + x];
  }
  return ch;
}
// other dtypes: no vector transpose, the scalar copy does all channels
template <typename T>
inline int64_t transpose_channels8(const T*, int64_t, int64_t, int64_t, T*) {
  return 0;
}
#endif

// drow[x * c + ch] = srow[ch * sc + x * sw] for x < w, by 32-pixel blocks, skipping the blocks where need (given)
// holds no true pixel. 32 pixels: fine enough that blocks no active window reads are skipped at low active fractions
// (64 copied 0.31 ms of a 48-channel 128x256 map at 25 % active, 32 about half), coarse enough for whole 8 x 8
// transposes; a block's destination (32 * C values) stays in L1 while it is written out.
template <typename T>
void copy_row_blocks(const T* srow, int64_t sc, int64_t sw, int64_t c, int64_t w, const bool* need, T* drow) {
  constexpr int64_t kBlock = 32;
  for (int64_t x0 = 0; x0 < w; x0 += kBlock) {
    const int64_t x1 = std::min(w, x0 + kBlock);
    if (need && std::find(need + x0, need + x1, true) == need + x1) continue;  // no active window reads it
    T* dp = drow + x0 * c;
    if (sc == 1 && sw == c) {  // channels-last input: the block is one contiguous run
      std::copy(srow + x0 * sw, srow + x1 * sw, dp);
      continue;
    }
    int64_t ch = 0;
#if defined(__AVX2__)
    if (sw == 1) ch = transpose_channels8(srow + x0, sc, c, x1 - x0, dp);
#endif
    for (; ch < c; ++ch) {
      const T* sp = srow + ch * sc + x0 * sw;
      for (int64_t x = 0; x < x1 - x0; ++x) dp[x * c + ch] = sp[x * sw];
    }
  }
}

// dst[b, y, x, :] = 0 where !mask[b, y, x]: the stopped pixels of the one-conv op's channels-last output (the
// kernel writes the active ones), instead of zeroing the whole output first.
at::Tensor zero_stopped(at::Tensor dst, const at::Tensor& mask) {
  TORCH_CHECK(dst.device().is_cpu() && dst.dim() == 4 && dst.is_contiguous(), "dst must be a contiguous (N, H, W, C) CPU tensor");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.dim() == 3 && mask.size(0) == dst.size(0) &&
              mask.size(1) == dst.size(1) && mask.size(2) == dst.size(2), "mask must be a contiguous bool (N, H, W) tensor");
  const int64_t rows = dst.size(0) * dst.size(1), w = dst.size(2), c = dst.size(3);
  const bool* mk = mask.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(dst.scalar_type(), "zero_stopped", [&] {
    scalar_t* d = dst.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const bool* mr = mk + r * w;
        for (int64_t x = 0; x < w;) {
          if (mr[x]) {
            ++x;
            continue;
          }
          int64_t x1 = x + 1;
          while (x1 < w && !mr[x1]) ++x1;  // a run of stopped pixels is one contiguous span
          std::fill(d + (r * w + x) * c, d + (r * w + x1) * c, scalar_t(0));
          x = x1;
        }
      }
    });
  });
  return dst;
}

// The one-conv op on an NCHW input, without a padded copy of the whole map: dst[pixel[i]] (or dst[i] if compact) =
// window_i(pad(src)) @ wmat + bias for the active positions i (sorted by output pixel, as SparseIndex keeps them).
// Each thread takes a contiguous share of the positions and walks it in bands of at most band_rows output rows; per
// band it transposes the input rows the band's windows read (only the 32-pixel blocks need marks, zeros for the
// border) into its own small channels-last buffer, which stays in L2 while the kernel reads it, and runs the
// kernel on the band (the kernel's own parallel_for runs inline in a parallel region). A whole padded copy would
// add a third map to the input and output: with a shared L3 that makes the op the one conv whose time depends on
// what else runs. strips: the tables of the full padded buffer (N, H + 2 pad, W + 2 pad, C) (SparseIndex.windows
// with in_pad = pad); consecutive bands of one thread move the rows they share instead of copying them again.
// wide_pack: as sparse_conv_gemm's (packed here once for all threads when absent and the wide variant runs).
void sparse_conv_nchw(const at::Tensor& src, const c10::optional<at::Tensor>& need, const at::Tensor& strips,
                      int64_t k, int64_t stride, int64_t pad, const at::Tensor& wmat,
                      const c10::optional<at::Tensor>& bias, at::Tensor dst, const at::Tensor& pixel, int64_t ho,
                      int64_t wo, bool compact, int64_t band_rows, int64_t chunk, int64_t direct,
                      const c10::optional<at::Tensor>& wide_pack) {
  TORCH_CHECK(src.device().is_cpu() && src.dim() == 4, "src must be an (N, C, H, W) CPU tensor");
  TORCH_CHECK(src.scalar_type() == at::kFloat || src.scalar_type() == at::kDouble, "src must be float32 or float64");
  TORCH_CHECK(k == 1 || k == 3, "kernel size must be 1 or 3");
  TORCH_CHECK(stride == 1 || stride == 2, "stride must be 1 or 2");
  TORCH_CHECK(pad >= 0 && ho > 0 && wo > 0 && band_rows > 0 && chunk > 0,
              "pad must be >= 0; ho, wo, band_rows and chunk positive");
  const int64_t n = src.size(0), c = src.size(1), h = src.size(2), w = src.size(3);
  const int64_t hp = h + 2 * pad, wp = w + 2 * pad;
  TORCH_CHECK((ho - 1) * stride + k <= hp && (wo - 1) * stride + k <= wp, "output (", ho, ", ", wo,
              ") too large for the input");
  check_index(pixel, "pixel");
  check_index(strips, "strips");
  const int64_t m = pixel.numel(), cout = wmat.size(1);
  TORCH_CHECK(strips.numel() == m * k, "strips must hold k entries per position");
  TORCH_CHECK(wmat.dim() == 2 && wmat.size(0) == k * k * c && wmat.scalar_type() == src.scalar_type(),
              "wmat must be (k*k*Cin, Cout) of the input's dtype");
  TORCH_CHECK(dst.dim() == 2 && dst.size(1) == cout && dst.is_contiguous() && dst.scalar_type() == src.scalar_type(),
              "dst must be contiguous (rows, Cout) of the input's dtype");
  TORCH_CHECK(dst.size(0) == (compact ? m : n * ho * wo), "dst must have ", compact ? "one row per position" :
              "one row per output pixel");
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == cout && bias->is_contiguous() && bias->scalar_type() == src.scalar_type(),
                "bias must be contiguous (Cout,) of the input's dtype");
  }
  const bool* nd = nullptr;
  if (need.has_value()) {
    TORCH_CHECK(need->scalar_type() == at::kBool && need->is_contiguous() && need->dim() == 3 && need->size(0) == n &&
                need->size(1) == h && need->size(2) == w, "need must be a contiguous bool (N, H, W) tensor");
    nd = need->data_ptr<bool>();
  }
  TORCH_CHECK(direct >= 0 && direct <= 4, "direct must be 0 to 4 (see sparse_conv_gemm)");
  TORCH_CHECK(direct == 0 || direct_supported(src.scalar_type()), "the direct kernel runs float32 on an AVX-512 or "
              "AVX2 build");
  const int64_t* px = pixel.data_ptr<int64_t>();
  const int64_t* st = strips.data_ptr<int64_t>();
  // every position's pixel in range and increasing, and its strips exactly those of its window: a band's buffer
  // holds only the rows its windows cover, so a wrong table would read outside it (rows tracked incrementally:
  // no division per position)
  {
    int64_t b = 0, y = 0, row_start = 0;
    for (int64_t i = 0; i < m; ++i) {
      TORCH_CHECK(px[i] >= 0 && px[i] < n * ho * wo && (i == 0 || px[i] > px[i - 1]),
                  "pixel must be increasing output pixels in [0, N * Ho * Wo)");
      while (px[i] >= row_start + wo) {
        row_start += wo;
        if (++y == ho) y = 0, ++b;
      }
      const int64_t top_left = (b * hp + y * stride) * wp + (px[i] - row_start) * stride;
      for (int64_t j = 0; j < k; ++j) {
        TORCH_CHECK(st[i * k + j] == top_left + j * wp, "strips do not match the windows of the output pixels "
                    "(position ", i, "): expected the tables of SparseIndex.windows with in_pad = pad");
      }
    }
  }
  if (m == 0) return;
  const int64_t sn = src.stride(0), sc = src.stride(1), sh = src.stride(2), sw = src.stride(3);
  const int64_t cap_rows = (std::min(band_rows, ho) - 1) * stride + k;  // padded rows of the largest band
  const int64_t threads = std::min<int64_t>(std::max<int64_t>(1, at::get_num_threads()), m);
  // the wide variant's packed weights: the caller's, else packed here once for all threads and bands
  const float* wp_ptr = wide_pack_for(wide_pack, wmat, direct);
  at::Tensor own_pack;
  if (!wp_ptr && m > 0 && mmseg_cbt::direct_runs_wide(direct, cout)) {
    own_pack = pack_wide_tensor(wmat);
    wp_ptr = own_pack.data_ptr<float>();
  }
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "sparse_conv_nchw", [&] {
    const scalar_t* s = src.data_ptr<scalar_t>();
    scalar_t* d = dst.data_ptr<scalar_t>();
    const scalar_t* bp = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    // one task per thread, each a contiguous, equal share of the positions
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      thread_local std::vector<scalar_t> band_buf;
      if (band_buf.size() < static_cast<size_t>(cap_rows * wp * c)) band_buf.resize(cap_rows * wp * c);
      scalar_t* bb = band_buf.data();
      const int64_t row_len = wp * c;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t q_end = m * (t + 1) / threads;
        int64_t prev_b = -1, prev_r0 = 0, prev_r1 = 0;  // the image and padded rows now in the buffer
        bool first = true;
        for (int64_t q = m * t / threads; q < q_end;) {
          const int64_t g0 = px[q] / wo, b = g0 / ho, y0 = g0 % ho;
          const int64_t g_stop = std::min(g0 + band_rows, (b + 1) * ho);  // a band stays in one image
          int64_t q1 = q + 1;
          while (q1 < q_end && px[q1] < g_stop * wo) ++q1;
          const int64_t y1 = px[q1 - 1] / wo % ho + 1;
          const int64_t r0 = y0 * stride, r1 = (y1 - 1) * stride + k;  // padded rows [r0, r1) of image b
          int64_t fill0 = r0;
          if (prev_b == b && prev_r1 > r0 && prev_r0 <= r0) {
            // rows shared with the previous band: moved to the top (within L2) instead of transposed again
            std::memmove(bb, bb + (r0 - prev_r0) * row_len, (prev_r1 - r0) * row_len * sizeof(scalar_t));
            fill0 = prev_r1;
          }
          for (int64_t r = fill0; r < r1; ++r) {
            scalar_t* drow = bb + (r - r0) * row_len;
            const int64_t y = r - pad;
            if (y < 0 || y >= h) {
              std::fill(drow, drow + row_len, scalar_t(0));
              continue;
            }
            std::fill(drow, drow + pad * c, scalar_t(0));
            std::fill(drow + (pad + w) * c, drow + row_len, scalar_t(0));
            copy_row_blocks(s + b * sn + y * sh, sc, sw, c, w, nd ? nd + (b * h + y) * w : nullptr, drow + pad * c);
          }
          prev_b = b, prev_r0 = r0, prev_r1 = r1;
          const at::Tensor band = at::from_blob(bb, {r1 - r0, c}, src.options());
          const at::Tensor band_strips = strips.narrow(0, q * k, (q1 - q) * k);
          const int64_t base = (b * hp + r0) * wp;
          scalar_t* dq = compact ? d + q * cout : d;
          const int64_t* rows = compact ? nullptr : px + q;
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (direct != 0) {
              // (the casts are no-ops: this branch is float32 only; AT_DISPATCH's lambda is not a template, so the
              // branch is compiled for float64 too)
              mmseg_cbt::run_direct(band, band_strips, k, wmat, reinterpret_cast<const float*>(bp), nullptr, nullptr,
                                    false, reinterpret_cast<float*>(dq), rows, direct, base, !first, wp_ptr);
              first = false;
              q = q1;
              continue;
            }
          }
          run_chunks<scalar_t>(band, band_strips, k, wmat, bp, nullptr, nullptr, false, dq, rows, chunk, base);
          q = q1;
        }
      }
    });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_conv_nchw", &sparse_conv_nchw,
        "The one-conv op from an NCHW input through per-thread bands of padded rows: dst[pixel[i]] (dst[i] if "
        "compact) = window_i @ wmat + bias (CPU)",
        py::arg("src"), py::arg("need"), py::arg("strips"), py::arg("k"), py::arg("stride"), py::arg("pad"),
        py::arg("wmat"), py::arg("bias"), py::arg("dst"), py::arg("pixel"), py::arg("ho"), py::arg("wo"),
        py::arg("compact"), py::arg("band_rows"), py::arg("chunk"), py::arg("direct") = 0,
        py::arg("wide_pack") = py::none());
  m.def("zero_stopped", &zero_stopped, "dst[b, y, x] = 0 where not mask[b, y, x], returns dst (channels-last, CPU)",
        py::arg("dst"), py::arg("mask"));
  m.def("sparse_conv_gemm", &sparse_conv_gemm, "Masked conv rows: chunked gather + GEMM + epilogue + scatter (CPU)",
        py::arg("src"), py::arg("strips"), py::arg("k"), py::arg("wmat"), py::arg("bias"), py::arg("res"),
        py::arg("res_rows"), py::arg("relu"), py::arg("dst"), py::arg("dst_rows"), py::arg("chunk"),
        py::arg("direct") = 0, py::arg("wide_pack") = py::none());
  m.def("pack_wide", &pack_wide_tensor,
        "The wide variant's weights packed vector-major from wmat (k*k*Cin, Cout), float32: pass them as wide_pack "
        "to every call with this wmat so that the kernel does not pack them per call",
        py::arg("wmat"));
  m.def("runs_wide", &mmseg_cbt::direct_runs_wide, "Whether direct=mode runs the wide variant for cout channels",
        py::arg("mode"), py::arg("cout"));
  m.def("has_direct", &mmseg_cbt::direct_available, "Whether this build has the direct algorithm (float32)");
  m.def("isa", [] { return std::string(mmseg_cbt::isa_name()); },
        "Instruction set of the direct algorithm: 'avx512', 'avx2' or 'none'");
  m.def("direct_wide", &mmseg_cbt::direct_wide, "Whether direct=1 runs the wide variant for cout output channels",
        py::arg("cout"));
  m.def("add_weighted_rows", &add_weighted_rows, "acc[i] += sum_t w[i, t] * src[rows[i, t]] (CPU)");
}

// Direct ("im2col-free") float32 algorithms of the masked conv, written once over the build's vector type (simd.h:
// AVX-512 16 lanes, AVX2 8 lanes; L below). Each window is read in place from the channels-last buffer (k strips
// of k*Cin contiguous values), nothing is gathered, and the output rows are written directly. Two variants:
//  - thin (few output vectors): Cout = L * NB + R is split into
//      NB output vectors: out[p, Lb:Lb+L] += x[p, j] * W[j, Lb:Lb+L] (the window value broadcast, every lane useful),
//      for a tile of 8 positions so that every weight vector loaded serves several FMAs; blocks of at most
//      Isa::kThinMaxBlock vectors;
//      R <= 4 remaining channels as dot products along the window: out[p, LNB+t] = sum_j x[p, j] * W[j, LNB+t], L
//      window values per FMA (each strip is contiguous), one horizontal sum per channel and position;
//      (R > 4, or mode kThinVectorTail: one more vector whose unused lanes have zero weights and are not stored.)
//    For 18 channels on AVX-512 that is 162 + 24 FMAs per position instead of 324, and no gather.
//  - wide (many output vectors; the thin variant would re-read the whole window's weights, kk x L*NB floats, for
//    every tile of 8 positions): cache-blocked. A chunk of up to wide_chunk() positions at a time; the window is cut
//    into K-blocks of at most kWideKb rows (whole strips where they fit, else pieces of a strip), each block of
//    output vectors' weight panel (Kb x L*NB, from the weights packed vector-major once: pack_wide, cached by the
//    caller) streams from L2 while a
//    register-tiled microkernel (P positions x NB vectors of accumulators) runs over all of the chunk's positions;
//    partial sums live in a per-thread tile (chunk x Cout, L2) between K-blocks, and the epilogue (bias, residual,
//    ReLU) runs once after the last.
#include "direct_conv.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "simd.h"

namespace mmseg_cbt {

#ifdef MMSEG_CBT_DIRECT
namespace {

using V = Isa::V;
using M = Isa::M;
constexpr int L = Isa::L;
constexpr int kTile = 8;  // positions per tile of the thin variant

// ReLU that keeps NaN (as torch.relu): zero first, so vmaxps returns v when v is NaN.
inline V relu_v(V v) { return Isa::max(Isa::zero(), v); }
inline float relu_s(float x) { return x < 0.f ? 0.f : x; }

// A float array whose first element is 64-byte aligned: a vector weight load from a 16-byte aligned block would
// straddle two cache lines every time (up to 1.5x the time of a 64-72-channel conv, varying with where malloc put it).
class AlignedFloats {
 public:
  void assign_zero(int64_t n) {
    raw_.assign(n + 16, 0.f);
    const auto addr = reinterpret_cast<uintptr_t>(raw_.data());
    off_ = static_cast<int64_t>(((64 - addr % 64) % 64) / sizeof(float));
  }
  void reserve(int64_t n) {
    if (static_cast<int64_t>(raw_.size()) < n + 16) assign_zero(n);
  }
  float* data() { return raw_.data() + off_; }
  const float* data() const { return raw_.data() + off_; }
  float& operator[](int64_t i) { return data()[i]; }

 private:
  std::vector<float> raw_;
  int64_t off_ = 0;
};

// ---------------------------------------------------------------------------------------------------------------
// thin variant
// ---------------------------------------------------------------------------------------------------------------
struct ThinPlan {
  int64_t k, cin, kc, kk, cout, nb, nmain, tail;  // kc: strip length, kk = k * kc: window length, nmain = cout - tail
  int64_t kcl;                                    // strip length rounded up to the vector width (tail weights)
  AlignedFloats wmain;                            // (kk, nb * L): W's first nmain columns, zeros beyond
  AlignedFloats wtail;                            // (tail, k, kcl): W's last tail columns by strip, zeros beyond kc
  AlignedFloats bmain;                            // (nb * L,) bias, zeros beyond nmain
};

// Fills pl (kept by the calling thread between calls: its vectors keep their capacity, so a call does not pay the
// page faults of fresh 10-200 KiB allocations).
void make_plan(ThinPlan& pl, int64_t k, int64_t cin, const float* w, int64_t cout, const float* bias,
               bool vector_tail) {
  pl.k = k;
  pl.cin = cin;
  pl.kc = k * cin;
  pl.kk = k * pl.kc;
  pl.cout = cout;
  const int64_t r = cout % L;
  pl.tail = (!vector_tail && r > 0 && r <= 4) ? r : 0;
  pl.nmain = cout - pl.tail;
  pl.nb = (pl.nmain + L - 1) / L;
  pl.kcl = (pl.kc + L - 1) / L * L;
  const int64_t vw = pl.nb * L;
  pl.wmain.assign_zero(pl.kk * vw);
  for (int64_t j = 0; j < pl.kk; ++j)
    for (int64_t c = 0; c < pl.nmain; ++c) pl.wmain[j * vw + c] = w[j * cout + c];
  pl.wtail.assign_zero(pl.tail * k * pl.kcl);
  for (int64_t t = 0; t < pl.tail; ++t)
    for (int64_t s = 0; s < k; ++s)
      for (int64_t j = 0; j < pl.kc; ++j)
        pl.wtail[(t * k + s) * pl.kcl + j] = w[(s * pl.kc + j) * cout + pl.nmain + t];
  pl.bmain.assign_zero(vw);
  if (bias)
    for (int64_t c = 0; c < pl.nmain; ++c) pl.bmain[c] = bias[c];
}

// P positions (window strips rows[p * k + s]) x NB output vectors starting at vector b0.
template <int NB, int P>
inline void thin_main(const ThinPlan& pl, const float* const* rows, int64_t b0, V (&acc)[P][NB]) {
  for (int p = 0; p < P; ++p)
    for (int b = 0; b < NB; ++b) acc[p][b] = Isa::zero();
  const int64_t vw = pl.nb * L;
  for (int64_t s = 0; s < pl.k; ++s) {
    const float* x[P];
    for (int p = 0; p < P; ++p) x[p] = rows[p * pl.k + s];
    const float* wr = pl.wmain.data() + s * pl.kc * vw + b0 * L;
    for (int64_t j = 0; j < pl.kc; ++j) {
      V wv[NB];
      for (int b = 0; b < NB; ++b) wv[b] = Isa::load(wr + j * vw + b * L);
      for (int p = 0; p < P; ++p) {
        const V xv = Isa::set1(x[p][j]);
        for (int b = 0; b < NB; ++b) acc[p][b] = Isa::fmadd(xv, wv[b], acc[p][b]);
      }
    }
  }
}

// The R <= 4 tail channels of G positions as dot products along their window strips (G * R accumulators; each
// tail weight vector is loaded once for the G positions).
template <int R, int G>
inline void thin_tail(const ThinPlan& pl, const float* const* rows, float (*out)[4]) {
  V acc[G][R];
  for (int g = 0; g < G; ++g)
    for (int t = 0; t < R; ++t) acc[g][t] = Isa::zero();
  for (int64_t s = 0; s < pl.k; ++s) {
    for (int64_t j = 0; j < pl.kc; j += L) {
      // masked load: never reads past the strip (the buffer's last strip ends at its last value)
      const M m = Isa::mask(pl.kc - j);
      V xv[G];
      for (int g = 0; g < G; ++g) xv[g] = Isa::load(m, rows[g * pl.k + s] + j);
      for (int t = 0; t < R; ++t) {
        const V wv = Isa::load(pl.wtail.data() + (t * pl.k + s) * pl.kcl + j);
        for (int g = 0; g < G; ++g) acc[g][t] = Isa::fmadd(xv[g], wv, acc[g][t]);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int t = 0; t < R; ++t) out[g][t] = Isa::reduce_add(acc[g][t]);
}

// Bias, residual, ReLU and the store of NB vectors of the P positions q0.. (n of them valid) from vector b0 on.
template <int NB, int P>
inline void thin_store(const ThinPlan& pl, V (&acc)[P][NB], int64_t b0, int64_t q0, int64_t n, const float* res,
                       const int64_t* res_rows, bool relu, float* dst, const int64_t* dst_rows) {
  // a compile-time trip count keeps acc in registers (a runtime bound would put it on the stack)
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) {
    if (p >= n) break;
    const int64_t q = q0 + p;
    const float* rrow = res ? res + (res_rows ? res_rows[q] : q) * pl.cout : nullptr;
    float* orow = dst + (dst_rows ? dst_rows[q] : q) * pl.cout;
    for (int b = 0; b < NB; ++b) {
      const int64_t c0 = (b0 + b) * L;
      const M mk = Isa::mask(pl.nmain - c0);
      // the residual is read before the store of the same channels: it may be this output row itself
      V v = Isa::add(acc[p][b], Isa::load(pl.bmain.data() + c0));
      if (rrow) v = Isa::add(v, Isa::load(mk, rrow + c0));
      if (relu) v = relu_v(v);
      Isa::store(mk, orow + c0, v);
    }
  }
}

// One block of NB vectors for a tile of kTile positions, in sub-tiles of P positions. Not inlined: each block shape
// gets its own register allocation (inlined into one function, the shapes' accumulators spilled).
template <int NB, int P>
__attribute__((noinline)) void thin_block(const ThinPlan& pl, const float* const* rows, int64_t b0, int64_t q0,
                                          int64_t n, const float* res, const int64_t* res_rows, bool relu, float* dst,
                                          const int64_t* dst_rows) {
  static_assert(kTile % P == 0, "sub-tiles must divide the tile");
  for (int p0 = 0; p0 < kTile && p0 < n; p0 += P) {
    V acc[P][NB];
    thin_main<NB, P>(pl, rows + p0 * pl.k, b0, acc);
    thin_store<NB, P>(pl, acc, b0, q0 + p0, n - p0, res, res_rows, relu, dst, dst_rows);
  }
}

void run_thin(const at::Tensor& src, const at::Tensor& strips, int64_t k, const at::Tensor& wmat, const float* bias,
              const float* res, const int64_t* res_rows, bool relu, float* dst, const int64_t* dst_rows,
              bool vector_tail, int64_t base, bool keep_plan) {
  thread_local ThinPlan plan;
  if (!keep_plan) {
    const at::Tensor w = wmat.contiguous();
    make_plan(plan, k, src.size(1), w.data_ptr<float>(), wmat.size(1), bias, vector_tail);
  }
  const ThinPlan& pl = plan;
  const float* s = src.data_ptr<float>();
  const int64_t* st = strips.data_ptr<int64_t>();
  const int64_t m = strips.numel() / k, ntiles = (m + kTile - 1) / kTile;
  constexpr int G = Isa::kTailGroup;
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    const float* rows[kTile * 3];
    float tail[kTile][4];
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t q0 = tile * kTile, n = std::min<int64_t>(kTile, m - q0);
      for (int p = 0; p < kTile; ++p) {
        const int64_t q = q0 + std::min<int64_t>(p, n - 1);  // a short last tile repeats its last position
        for (int64_t j = 0; j < k; ++j) rows[p * k + j] = s + (st[q * k + j] - base) * pl.cin;
      }
      if (pl.tail) {
        // tail first: its values go to their own channels, so the order of the stores does not matter
        for (int g0 = 0; g0 < kTile; g0 += G) {
          switch (pl.tail) {
            case 1: thin_tail<1, G>(pl, rows + g0 * k, tail + g0); break;
            case 2: thin_tail<2, G>(pl, rows + g0 * k, tail + g0); break;
            case 3: thin_tail<3, G>(pl, rows + g0 * k, tail + g0); break;
            default: thin_tail<4, G>(pl, rows + g0 * k, tail + g0); break;
          }
        }
        for (int64_t p = 0; p < n; ++p) {
          const int64_t q = q0 + p;
          const float* rrow = res ? res + (res_rows ? res_rows[q] : q) * pl.cout : nullptr;
          float* orow = dst + (dst_rows ? dst_rows[q] : q) * pl.cout;
          for (int64_t t = 0; t < pl.tail; ++t) {
            const int64_t c = pl.nmain + t;
            const float v = tail[p][t] + (bias ? bias[c] : 0.f) + (rrow ? rrow[c] : 0.f);
            orow[c] = relu ? relu_s(v) : v;
          }
        }
      }
      for (int64_t b0 = 0; b0 < pl.nb; b0 += Isa::kThinMaxBlock) {
        const int64_t nbb = std::min<int64_t>(Isa::kThinMaxBlock, pl.nb - b0);
        if (nbb == 1) {
          thin_block<1, 8>(pl, rows, b0, q0, n, res, res_rows, relu, dst, dst_rows);
        } else if (nbb == 2) {
          thin_block<2, 4>(pl, rows, b0, q0, n, res, res_rows, relu, dst, dst_rows);
        } else if (nbb == 3) {
          thin_block<3, 4>(pl, rows, b0, q0, n, res, res_rows, relu, dst, dst_rows);
        } else if constexpr (Isa::kThinMaxBlock >= 4) {
          thin_block<4, 4>(pl, rows, b0, q0, n, res, res_rows, relu, dst, dst_rows);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// wide variant
// ---------------------------------------------------------------------------------------------------------------
// Positions per chunk: as many as keep the chunk's partial-sum tile within 256 KiB (L2); each chunk streams every
// weight panel once. A multiple of every microkernel's P (4, 6, 8, 12), at least 96.
int64_t wide_chunk(int64_t vw) {
  return std::max<int64_t>(96, std::min<int64_t>(1008, (256 << 10) / (vw * 4) / 24 * 24));
}

// K-block rows: whole strips up to this many rows (a 3x3 window up to 128 input channels in one pass, a whole
// 384-channel strip), so that partial sums rarely go through the tile; the panel of a block of output vectors
// (rows x NB * L floats, up to 288 KiB) streams from L2.
constexpr int64_t kWideKb = 1152;

// t[p, b] (+)= sum_s sum_j x[p * ns + s][j] * w[b * ldv + (s * kb + j) * L + lane] for P positions, NB vectors, ns
// pieces of kb window rows each (whole strips, or one piece of a strip when ns == 1); w: the vector-major packed
// weights (pack_wide) at the block's first vector and the K-block's first row, ldv floats between vectors. first:
// the accumulators start at zero instead of the tile.
template <int NB, int P>
__attribute__((noinline)) void wide_micro(const float* const* x, int64_t ns, const float* w, int64_t ldv, int64_t kb,
                                          float* t, int64_t ldt, bool first) {
  V acc[P][NB];
  for (int p = 0; p < P; ++p)
    for (int b = 0; b < NB; ++b) acc[p][b] = first ? Isa::zero() : Isa::load(t + p * ldt + b * L);
  for (int64_t sk = 0; sk < ns; ++sk) {
    const float* xp[P];
    for (int p = 0; p < P; ++p) xp[p] = x[p * ns + sk];
    const float* ws[NB];
    for (int b = 0; b < NB; ++b) ws[b] = w + b * ldv + sk * kb * L;
    for (int64_t j = 0; j < kb; ++j) {
      V wv[NB];
      for (int b = 0; b < NB; ++b) wv[b] = Isa::load(ws[b] + j * L);
      for (int p = 0; p < P; ++p) {
        const V xv = Isa::set1(xp[p][j]);
        for (int b = 0; b < NB; ++b) acc[p][b] = Isa::fmadd(xv, wv[b], acc[p][b]);
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int b = 0; b < NB; ++b) Isa::store(t + p * ldt + b * L, acc[p][b]);
}

typedef void (*micro_fn)(const float* const*, int64_t, const float*, int64_t, int64_t, float*, int64_t, bool);

// Positions per microkernel call for NB vectors: as many accumulators as the registers allow.
constexpr int wide_p(int nb) { return L == 16 ? (nb >= 4 ? 6 : nb == 3 ? 8 : 12) : (nb >= 3 ? 4 : nb == 2 ? 6 : 12); }

micro_fn micro_for(int64_t nb) {
  switch (nb) {
    case 1: return &wide_micro<1, wide_p(1)>;
    case 2: return &wide_micro<2, wide_p(2)>;
    case 3: return &wide_micro<(Isa::kWideNB >= 3 ? 3 : 1), wide_p(Isa::kWideNB >= 3 ? 3 : 1)>;
    default: return &wide_micro<Isa::kWideNB, wide_p(Isa::kWideNB)>;
  }
}

void run_wide(const at::Tensor& src, const at::Tensor& strips, int64_t k, const at::Tensor& wmat, const float* bias,
              const float* res, const int64_t* res_rows, bool relu, float* dst, const int64_t* dst_rows,
              int64_t base, const float* packed) {
  const float* s = src.data_ptr<float>();
  const int64_t* st = strips.data_ptr<int64_t>();
  const int64_t cin = src.size(1), kc = k * cin, cout = wmat.size(1), kk = wmat.size(0);
  const int64_t m = strips.numel() / k;
  const int64_t nvec = (cout + L - 1) / L, vw = nvec * L, ldv = kk * L;
  if (!packed) {
    // this call's own packing, once for all chunks (the caller's thread keeps the buffer between calls)
    thread_local AlignedFloats own;
    own.reserve(wide_pack_floats(kk, cout));
    pack_wide(wmat, own.data());
    packed = own.data();
  }
  // chunks: a multiple of the thread count, rows spread evenly (parallel_for gives each thread a contiguous share)
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = wide_chunk(vw);
  int64_t nch = (m + chunk - 1) / chunk, nsplit = 1;
  if (nch < threads && m < threads * 48) {
    // few positions (e.g. 51): the threads share each chunk's output vectors instead, so each streams only its part
    // of the weights and no chunk is cut into short, padded groups
    nsplit = std::min<int64_t>(nvec, (threads + nch - 1) / nch);
  } else {
    nch = std::min<int64_t>(m, (nch + threads - 1) / threads * threads);
  }
  const int64_t q_step = (m + nch - 1) / nch;
  nch = (m + q_step - 1) / q_step;
  // output vectors: nsplit near-equal ranges, each in blocks of near-equal size (9 = 3 + 3 + 3 rather than
  // 4 + 4 + 1: every block keeps its microkernel's register tile full)
  std::vector<int64_t> blk0{0}, split0{0};
  for (int64_t sp = 0; sp < nsplit; ++sp) {
    const int64_t v0 = nvec * sp / nsplit, v1 = nvec * (sp + 1) / nsplit;
    const int64_t nb = (v1 - v0 + Isa::kWideNB - 1) / Isa::kWideNB;
    for (int64_t i = 1; i <= nb; ++i) blk0.push_back(v0 + (v1 - v0) * i / nb);
    split0.push_back(static_cast<int64_t>(blk0.size()) - 1);
  }
  // K-blocks: whole strips, as many as fit in kWideKb rows (the partial sums stay in registers across strips), or
  // pieces of near-equal length inside a longer strip (a strip's values are contiguous in the input row)
  struct KBlock {
    int64_t s0, ns, o0, kb;  // first strip, strips, offset in the strip, rows per strip
  };
  std::vector<KBlock> kblocks;
  if (kc <= kWideKb) {
    const int64_t spb = std::min<int64_t>(k, kWideKb / kc);
    for (int64_t s0 = 0; s0 < k; s0 += spb) kblocks.push_back({s0, std::min(spb, k - s0), 0, kc});
  } else {
    const int64_t npieces = (kc + kWideKb - 1) / kWideKb;
    for (int64_t sk = 0; sk < k; ++sk)
      for (int64_t piece = 0; piece < npieces; ++piece) {
        const int64_t o0 = kc * piece / npieces, o1 = kc * (piece + 1) / npieces;
        kblocks.push_back({sk, 1, o0, o1 - o0});
      }
  }
  at::parallel_for(0, nch * nsplit, 1, [&](int64_t i0, int64_t i1) {
    thread_local AlignedFloats tile_buf;
    thread_local std::vector<const float*> rows_buf;
    tile_buf.reserve(chunk * vw);
    if (static_cast<int64_t>(rows_buf.size()) < chunk * k) rows_buf.resize(chunk * k);
    float* tile = tile_buf.data();
    const float** rows = rows_buf.data();
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t c = item / nsplit, sp = item % nsplit;
      const int64_t q0 = c * q_step, n = std::min(q_step, m - q0);
      for (int64_t p = 0; p < std::min(chunk, n + 11); ++p) {
        const int64_t q = q0 + std::min(p, n - 1);  // padding positions repeat the last one (computed, not stored)
        for (int64_t j = 0; j < k; ++j) rows[p * k + j] = s + (st[q * k + j] - base) * cin;
      }
      for (size_t kbi = 0; kbi < kblocks.size(); ++kbi) {
        const KBlock& kbk = kblocks[kbi];
        for (int64_t bi = split0[sp]; bi < split0[sp + 1]; ++bi) {
          const int64_t b0 = blk0[bi], nbb = blk0[bi + 1] - b0;
          const int P = wide_p(static_cast<int>(nbb));
          const micro_fn fn = micro_for(nbb);
          // a block of whole strips is ns * kc consecutive rows of wmat, a piece kb rows of one strip
          const float* wb = packed + b0 * ldv + (kbk.s0 * kc + kbk.o0) * L;
          for (int64_t g = 0; g < n; g += P) {
            const float* xp[12 * 3];
            for (int p = 0; p < P; ++p)
              for (int64_t sk = 0; sk < kbk.ns; ++sk) xp[p * kbk.ns + sk] = rows[(g + p) * k + kbk.s0 + sk] + kbk.o0;
            fn(xp, kbk.ns, wb, ldv, kbk.kb, tile + g * vw + b0 * L, vw, kbi == 0);
          }
        }
      }
      const int64_t ve0 = blk0[split0[sp]], ve1 = blk0[split0[sp + 1]];
      for (int64_t p = 0; p < n; ++p) {
        const int64_t q = q0 + p;
        const float* rrow = res ? res + (res_rows ? res_rows[q] : q) * cout : nullptr;
        float* orow = dst + (dst_rows ? dst_rows[q] : q) * cout;
        const float* trow = tile + p * vw;
        for (int64_t v = ve0; v < ve1; ++v) {
          const int64_t ch = v * L;
          const M mk = Isa::mask(cout - ch);
          V val = Isa::load(trow + ch);
          if (bias) val = Isa::add(val, Isa::load(mk, bias + ch));
          // the residual is read before the store of the same channels: it may be this output row itself
          if (rrow) val = Isa::add(val, Isa::load(mk, rrow + ch));
          if (relu) val = relu_v(val);
          Isa::store(mk, orow + ch, val);
        }
      }
    }
  });
}

}  // namespace
#endif

bool direct_available() {
#ifdef MMSEG_CBT_DIRECT
  return true;
#else
  return false;
#endif
}

int64_t wide_pack_floats(int64_t rows, int64_t cout) {
#ifdef MMSEG_CBT_DIRECT
  return (cout + L - 1) / L * rows * L;
#else
  return rows * cout;
#endif
}

void pack_wide(const at::Tensor& wmat, float* dst) {
#ifdef MMSEG_CBT_DIRECT
  const at::Tensor wt = wmat.contiguous();
  const float* w = wt.data_ptr<float>();
  const int64_t rows = wt.size(0), cout = wt.size(1), nvec = (cout + L - 1) / L;
  // (a parallel_for inside a parallel region runs inline, on the calling thread)
  at::parallel_for(0, nvec, 1, [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) {
      const M mk = Isa::mask(cout - v * L);
      float* d = dst + v * rows * L;
      for (int64_t r = 0; r < rows; ++r) Isa::store(d + r * L, Isa::load(mk, w + r * cout + v * L));
    }
  });
#else
  (void)wmat, (void)dst;
  TORCH_CHECK(false, "this build has no direct algorithm");
#endif
}

bool direct_wide(int64_t cout) {
#ifdef MMSEG_CBT_DIRECT
  return (cout + L - 1) / L >= Isa::kWideMinVec;
#else
  (void)cout;
  return false;
#endif
}

bool direct_runs_wide(int64_t mode, int64_t cout) { return mode == kWide || (mode == kDirect && direct_wide(cout)); }

void run_direct(const at::Tensor& src, const at::Tensor& strips, int64_t k, const at::Tensor& wmat, const float* bias,
                const float* res, const int64_t* res_rows, bool relu, float* dst, const int64_t* dst_rows,
                int64_t mode, int64_t base, bool keep_plan, const float* wide_pack) {
#ifdef MMSEG_CBT_DIRECT
  if (direct_runs_wide(mode, wmat.size(1))) {
    run_wide(src, strips, k, wmat, bias, res, res_rows, relu, dst, dst_rows, base, wide_pack);
  } else {
    run_thin(src, strips, k, wmat, bias, res, res_rows, relu, dst, dst_rows, mode == kThinVectorTail, base,
             keep_plan);
  }
#else
  (void)src, (void)strips, (void)k, (void)wmat, (void)bias, (void)res, (void)res_rows, (void)relu, (void)dst,
      (void)dst_rows, (void)mode, (void)base, (void)keep_plan, (void)wide_pack;
  TORCH_CHECK(false, "this build has no direct algorithm");
#endif
}

}  // namespace mmseg_cbt

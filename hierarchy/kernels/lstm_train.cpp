// The coordinatewise LSTM optimiser's training step: forward and backward, each
// one call, for meta-training on the CPU.
//
// Autograd through LSTMRule.update runs a dozen elementwise kernels per layer in
// each direction and keeps about 600 floats per coordinate per step for
// backward. Here the coordinates go in blocks, each block through every layer
// while it sits in the core's L2 cache: the gate products by BLAS, then one
// fused pass for the activations, the cell and the hidden state (forward), or
// for the gate and cell gradients (backward). Only the state, the activated
// gates (4H floats per coordinate, kept for backward) and the gradients of the
// inputs go to memory; each thread sums the weights' gradient of its blocks.
// float32 only; the sigmoid and tanh are exact to float rounding (about 1e-7).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "vec.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

// The BLAS matrix product that torch is linked with (MKL in the pip wheels),
// called directly: a block's products are too small for the dispatcher's cost.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m,
                       const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b,
                       const int* ldb, const float* beta, float* c,
                       const int* ldc);

// MKL's per-thread thread count; weak, so a torch built on another BLAS loads
// this file too, and the call is skipped there.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace {

using namespace hierarchy_kernels;

constexpr int64_t kBlock = 1024;  // coordinates per block: about 0.7 MB in use
constexpr float kLog2e = 1.4426950408889634f;

// The first `count` floats at `from`, zeros after them: the last, short vector of
// a block is read and written through these, so no row needs padding.
__attribute__((always_inline)) inline Vec load(const float* from, int64_t count) {
  Vec v{};
  if (count == kWidth) {
    std::memcpy(&v, from, sizeof(Vec));  // one vector load, not a call
  } else {
    std::memcpy(&v, from, sizeof(float) * count);
  }
  return v;
}

__attribute__((always_inline)) inline void store(float* to, Vec v, int64_t count) {
  if (count == kWidth) {
    std::memcpy(to, &v, sizeof(Vec));
  } else {
    std::memcpy(to, &v, sizeof(float) * count);
  }
}

__attribute__((always_inline)) inline float sum_lanes(Vec v) {
  typedef float Half __attribute__((vector_size(32)));
  typedef float Quarter __attribute__((vector_size(16)));
  const Half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Quarter q = __builtin_shufflevector(h, h, 0, 1, 2, 3) +
                    __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// A store that bypasses the caches where it can (a whole vector at an address
// aligned to 64 bytes, with AVX-512): for what is read back only much later, it
// saves the read of each line that a plain store makes first.
__attribute__((always_inline)) inline void store_stream(float* to, Vec v,
                                                        int64_t count) {
#ifdef __AVX512F__
  if (count == kWidth && (reinterpret_cast<uintptr_t>(to) & 63) == 0) {
    _mm512_stream_ps(to, reinterpret_cast<__m512&>(v));
    return;
  }
#endif
  store(to, v, count);
}

// Runs body(at, width) over `count` coordinates, 16 at a time, then the short
// rest: the full vectors' width is a constant, so their loads and stores are
// single instructions.
template <typename Body>
__attribute__((always_inline)) inline void for_vectors(int64_t count,
                                                       const Body& body) {
  int64_t at = 0;
  for (; at + kWidth <= count; at += kWidth) body(at, kWidth);
  if (at < count) body(at, count - at);
}

// 1 / x to float rounding. With AVX-512, a 14-bit estimate and one Newton step
// (error about 2^-28) cost a fraction of a division.
__attribute__((always_inline)) inline Vec reciprocal(Vec x) {
#ifdef __AVX512F__
  const Vec r = __builtin_ia32_rcp14ps512_mask(x, Vec{}, static_cast<uint16_t>(-1));
  return r * (2.0f - x * r);
#else
  return 1.0f / x;
#endif
}

// tanh z within [-1, 1]: where it saturates, the reciprocal's rounding could put
// it an ulp past, and backward's 1 - tanh^2 would then take the wrong sign.
__attribute__((always_inline)) inline Vec tanh_approx(Vec z) {
  const Vec e = exp2_approx(z * (-2.0f * kLog2e));
  const Vec t = (1.0f - e) * reciprocal(1.0f + e);
  return t > 1.0f ? splat(1.0f) : (t < -1.0f ? splat(-1.0f) : t);  // NaN stays
}

// log x for finite x >= 2^-126, to about an ulp: x = m 2^e with m in
// [sqrt(1/2), sqrt(2)), and log m = 2 atanh(s) with s = (m - 1) / (m + 1), |s| <
// 0.172, by its series to s^11 (the next term is below 1e-10).
__attribute__((always_inline)) inline Vec log_approx(Vec x) {
  const IVec bits = reinterpret_cast<const IVec&>(x);
  IVec exponent = ((bits >> 23) & 0xff) - 127;
  const IVec mantissa_bits = (bits & 0x7fffff) | 0x3f800000;
  Vec m = reinterpret_cast<const Vec&>(mantissa_bits);  // in [1, 2)
  const IVec high = m > 1.4142135623730951f;
  m = high ? m * 0.5f : m;
  exponent = high ? exponent + 1 : exponent;
  const Vec s = (m - 1.0f) * reciprocal(m + 1.0f);
  const Vec s2 = s * s;
  Vec series = s2 * (1.0f / 11.0f) + 1.0f / 9.0f;
  series = series * s2 + 1.0f / 7.0f;
  series = series * s2 + 1.0f / 5.0f;
  series = series * s2 + 1.0f / 3.0f;
  series = series * s2 + 1.0f;
  const Vec e = __builtin_convertvector(exponent, Vec);
  // ln 2 in two parts, the first exact in a float times any exponent here.
  return e * 0.693145751953125f + (e * 1.428606765330187e-06f + 2.0f * s * series);
}

// The gradient preprocessing of rules.preprocess for `count` coordinates of g:
// (log|g| / p, sign g) where |g| >= e^-p, else (-1, e^p g), into two rows.
void preprocess_block(const float* g, int64_t count, float p, float* first,
                      float* second) {
  const float threshold = static_cast<float>(std::exp(-static_cast<double>(p)));
  const float scale = static_cast<float>(std::exp(static_cast<double>(p)));
  const Vec infinity = splat(__builtin_inff());
  for_vectors(count, [&](int64_t at, int64_t width) {
    const Vec v = load(g + at, width);
    const Vec magnitude = v < 0.0f ? -v : v;
    const IVec large = magnitude >= threshold;  // false for NaN, as in torch
    const Vec clamped = large ? magnitude : splat(threshold);
    Vec log = log_approx(clamped);
    log = clamped == infinity ? infinity : log;
    const Vec sign = v > 0.0f ? splat(1.0f) : (v < 0.0f ? splat(-1.0f) : Vec{});
    store(first + at, large ? log / p : splat(-1.0f), width);
    store(second + at, large ? sign : v * scale, width);
  });
}

// A row-major float matrix: row r starts `stride` floats after row r - 1.
struct Rows {
  float* data;
  int64_t stride;
  float* row(int64_t r) const { return data + r * stride; }
  Rows at(int64_t column) const { return {data + column, stride}; }
};

// A single row's stride is never read, but BLAS asks that it be at least the row's
// length, and torch may give a tensor of one row any stride.
Rows rows_of(const at::Tensor& t) {
  const int64_t stride =
      t.size(0) == 1 ? std::max(t.stride(0), t.size(1)) : t.stride(0);
  return {t.data_ptr<float>(), stride};
}

// The first layer's two inputs: rows of preprocessed features (2, n), or raw
// gradients (1, n) preprocessed here, a block at a time, into scratch rows.
struct FirstInputs {
  const float* data;
  int64_t stride;
  bool raw;
  float p;

  Rows block(int64_t first, int64_t count, float* scratch) const {
    if (!raw) return Rows{const_cast<float*>(data) + first, stride};
    preprocess_block(data + first, count, p, scratch, scratch + kBlock);
    return Rows{scratch, kBlock};
  }
};

// A gradient that reached an output; an empty tensor stands for none.
bool present(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

// Rows must be contiguous and apart: neither overlapping nor broadcast (a row
// stride below the row's length), as BLAS reads them with that stride.
void check_rows(const at::Tensor& t, int64_t rows, int64_t n, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 &&
                  t.size(0) == rows && t.size(1) == n &&
                  (n == 1 || t.stride(1) == 1) && (rows == 1 || t.stride(0) >= n),
              what, " must be a float32 CPU (", rows, ", ", n,
              ") tensor with contiguous rows, one after another");
}

// Row-major C (m, n) = op(A) (m, k) op(B) (k, n) + beta C, op transposing where
// asked; column-major BLAS computes it as C^T = op(B)^T op(A)^T.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
          float* c, int64_t ldc) {
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int mm = static_cast<int>(n), nn = static_cast<int>(m),
            kk = static_cast<int>(k), la = static_cast<int>(ldb),
            lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const float alpha = 1.0f;
  sgemm_(&ta, &tb, &mm, &nn, &kk, &alpha, b, &la, a, &lb, &beta, c, &lc);
}

// out[r][j] += sum over the block's coordinates of a[r][.] * b[j][.], for R rows
// of `a` and C rows of `b` held in R * C vector accumulators. With coordinates
// along the vector lanes this is a row of FMAs per 16 coordinates, where BLAS,
// given this shape (a long inner size and a small output), runs at about a
// third of its speed on the other products.
template <int R, int C>
void outer_sum_block(const Rows& a, const Rows& b, int64_t count, float* out,
                     int64_t ldo) {
  Vec acc[R][C] = {};
  const float* a_rows[R];
  const float* b_rows[C];
  for (int r = 0; r < R; ++r) a_rows[r] = a.row(r);
  for (int j = 0; j < C; ++j) b_rows[j] = b.row(j);
  const int64_t full = count - count % kWidth;
  for (int64_t at = 0; at < full; at += kWidth) {
    Vec rows[R];
    for (int r = 0; r < R; ++r) std::memcpy(&rows[r], a_rows[r] + at, sizeof(Vec));
    for (int j = 0; j < C; ++j) {
      Vec column;
      std::memcpy(&column, b_rows[j] + at, sizeof(Vec));
      for (int r = 0; r < R; ++r) acc[r][j] += rows[r] * column;
    }
  }
  if (full < count) {
    const int64_t width = count - full;
    for (int j = 0; j < C; ++j) {
      const Vec column = load(b_rows[j] + full, width);
      for (int r = 0; r < R; ++r) acc[r][j] += load(a_rows[r] + full, width) * column;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < C; ++j) out[r * ldo + j] += sum_lanes(acc[r][j]);
  }
}

// Rows r, r + R, ... of `a` (up to m) against every row of `b`, in R x C blocks
// and R x 1 for the rows of `b` left over; returns the first row not done.
template <int R, int C>
int64_t outer_sum_rows(const Rows& a, int64_t r, int64_t m, const Rows& b, int64_t n,
                       int64_t count, float* out, int64_t ldo) {
  for (; r + R <= m; r += R) {
    int64_t j = 0;
    for (; j + C <= n; j += C) {
      outer_sum_block<R, C>(Rows{a.row(r), a.stride},
                            Rows{b.row(j), b.stride}, count, out + r * ldo + j, ldo);
    }
    for (; j < n; ++j) {
      outer_sum_block<R, 1>(Rows{a.row(r), a.stride}, Rows{b.row(j), b.stride},
                            count, out + r * ldo + j, ldo);
    }
  }
  return r;
}

// out (m, n) += a (m, count) b^T (count, n), rows of a and b as given: 5 x 5
// blocks, then 2 x 8 for the first layer's two features, then single rows.
void outer_sum(const Rows& a, int64_t m, const Rows& b, int64_t n, int64_t count,
               float* out, int64_t ldo) {
  int64_t r = outer_sum_rows<5, 5>(a, 0, m, b, n, count, out, ldo);
  r = outer_sum_rows<2, 8>(a, r, m, b, n, count, out, ldo);
  outer_sum_rows<1, 8>(a, r, m, b, n, count, out, ldo);
}

// An (rows, n) float tensor whose rows start on whole vectors (torch aligns its
// allocations to 64 bytes), so that no full-vector load or store of a block
// straddles two cache lines; the rows are padded to a multiple of 16 floats.
at::Tensor aligned_rows(int64_t rows, int64_t n, const at::TensorOptions& options) {
  const int64_t padded = (n + kWidth - 1) / kWidth * kWidth;
  return at::empty({rows, padded}, options).narrow(1, 0, n);
}

// Runs block(first, count) over blocks of kBlock coordinates, split between
// threads, with `scratch` floats of the calling thread's own to work in.
template <typename Body>
void for_each_block(int64_t n, int64_t scratch, const Body& block) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    // MKL would otherwise start threads of its own inside each of ours, several
    // times slower; this thread's setting is put back before it leaves.
    const int previous = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
#if defined(__x86_64__) || defined(__i386__)
    // Denormal numbers (below 1.2e-38) are read and written as zero: gradients
    // that small are common late in an unroll, and each one costs the core a
    // hundred cycles. Put back as it was before the thread leaves.
    const unsigned int control = _mm_getcsr();
    _mm_setcsr(control | 0x8040);  // flush-to-zero and denormals-are-zero
#endif
    // Uninitialised: every scratch value is written before it is read.
    float* const buffer = thread_scratch(scratch);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * kBlock;
      block(first, std::min(kBlock, n - first), buffer);
    }
#if defined(__x86_64__) || defined(__i386__)
    _mm_sfence();  // the streamed stores are seen by every thread from here on
    _mm_setcsr(control);
#endif
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  });
}

// Per-thread sums of the weights' gradient, added up once all blocks are done.
struct ThreadSums {
  std::vector<std::vector<float>> sums;
  explicit ThreadSums(int64_t size)
      : sums(at::get_num_threads(), std::vector<float>(size, 0.0f)) {}
  float* mine() { return sums[at::get_thread_num()].data(); }
  void total(float* into) const {
    std::fill(into, into + sums[0].size(), 0.0f);
    for (const auto& part : sums) {
      for (size_t k = 0; k < part.size(); ++k) into[k] += part[k];
    }
  }
};

// The cell forward on `count` coordinates: gate products `z` (i, f, g, o rows
// of each unit) plus the bias and, for the first layer, its two input features
// times `w_features` (2, 4H), summed here as a matrix product with an inner size
// of 2 runs far below the machine's speed. Writes the activated gates, c' = f c
// + i g and h' = o tanh(c'). The sigmoids and the tanh share reciprocals in
// pairs: with p = 1 + exp(-z), 1 / (p_i p_f) gives both i and f; each p is at
// most 1 + 2^36, so a product of two stays finite. h' goes in a second pass
// over the unit's row, o kept in its spent row of z: one long chain of
// dependent steps per vector left the core's out-of-order window too short to
// overlap vectors (the pass ran 10-15% slower in one).
void cell_forward(const Rows& z, const float* bias, const float* features,
                  int64_t feature_stride, const float* w_features, const Rows& c,
                  const Rows& act, const Rows& c_new, const Rows& h_new,
                  int64_t hidden, int64_t count) {
  for (int64_t u = 0; u < hidden; ++u) {
    float* const o_row = z.row(3 * hidden + u);
    for_vectors(count, [&](int64_t at, int64_t width) {
      Vec sum[4];
      Vec x0{}, x1{};
      if (features != nullptr) {
        x0 = load(features + at, width);
        x1 = load(features + feature_stride + at, width);
      }
      for (int k = 0; k < 4; ++k) {
        const int64_t j = k * hidden + u;
        sum[k] = load(z.row(j) + at, width) + bias[j];
        if (features != nullptr) {
          sum[k] += w_features[j] * x0 + w_features[4 * hidden + j] * x1;
        }
      }
      const Vec pi = 1.0f + exp2_approx(sum[0] * -kLog2e);
      const Vec pf = 1.0f + exp2_approx(sum[1] * -kLog2e);
      const Vec eg = exp2_approx(sum[2] * (-2.0f * kLog2e));
      const Vec po = 1.0f + exp2_approx(sum[3] * -kLog2e);
      const Vec pg = 1.0f + eg;
      const Vec r_if = reciprocal(pi * pf);
      const Vec r_go = reciprocal(pg * po);
      const Vec i = pf * r_if, f = pi * r_if;
      const Vec g = (1.0f - eg) * po * r_go, o = pg * r_go;
      store_stream(act.row(u) + at, i, width);
      store_stream(act.row(hidden + u) + at, f, width);
      store_stream(act.row(2 * hidden + u) + at, g, width);
      store_stream(act.row(3 * hidden + u) + at, o, width);
      store(o_row + at, o, width);
      store(c_new.row(u) + at, f * load(c.row(u) + at, width) + i * g, width);
    });
    for_vectors(count, [&](int64_t at, int64_t width) {
      const Vec cell = load(c_new.row(u) + at, width);
      store(h_new.row(u) + at, load(o_row + at, width) * tanh_approx(cell), width);
    });
  }
}

// The cell backward on `count` coordinates: from the gradient of h' (`dh`, plus
// `dh_later` from later steps where given) and of c' (`dc`, or none), the
// gradients of the gate sums `dz` and of the old cell; adds each gate's sum of
// dz, the bias gradient, into `grad_bias`.
void cell_backward(const Rows& act, const Rows& c, const Rows& c_new, const Rows& dh,
                   const float* dh_later, int64_t later_stride, const float* dc,
                   int64_t dc_stride, const Rows& dz, const Rows& dc_old,
                   float* grad_bias, int64_t hidden, int64_t count) {
  for (int64_t u = 0; u < hidden; ++u) {
    Vec bias_sum[4] = {};
    for_vectors(count, [&](int64_t at, int64_t width) {
      const Vec i = load(act.row(u) + at, width);
      const Vec f = load(act.row(hidden + u) + at, width);
      const Vec g = load(act.row(2 * hidden + u) + at, width);
      const Vec o = load(act.row(3 * hidden + u) + at, width);
      const Vec tc = tanh_approx(load(c_new.row(u) + at, width));
      Vec grad_h = load(dh.row(u) + at, width);
      if (dh_later != nullptr) grad_h += load(dh_later + u * later_stride + at, width);
      Vec grad_c = grad_h * o * (1.0f - tc * tc);
      if (dc != nullptr) grad_c += load(dc + u * dc_stride + at, width);
      const Vec gates[4] = {
          grad_c * g * i * (1.0f - i),
          grad_c * load(c.row(u) + at, width) * f * (1.0f - f),
          grad_c * i * (1.0f - g * g),
          grad_h * tc * o * (1.0f - o),
      };
      for (int k = 0; k < 4; ++k) {
        store(dz.row(k * hidden + u) + at, gates[k], width);
        bias_sum[k] += gates[k];  // lanes past `width` are zero
      }
      store(dc_old.row(u) + at, grad_c * f, width);
    });
    for (int k = 0; k < 4; ++k) grad_bias[k * hidden + u] += sum_lanes(bias_sum[k]);
  }
}

struct Sizes {
  int64_t depth, hidden, n;
  int64_t inputs(int64_t l) const { return l == 0 ? 2 : hidden; }
  int64_t fan_in(int64_t l) const { return inputs(l) + hidden; }
};

// The first layer's inputs of `features`, preprocessed with `p` if raw.
FirstInputs first_inputs(const at::Tensor& features, double p) {
  const Rows rows = rows_of(features);
  return {rows.data, rows.stride, features.size(0) == 1, static_cast<float>(p)};
}

Sizes check_inputs(const at::Tensor& features, const std::vector<at::Tensor>& h,
                   const std::vector<at::Tensor>& c,
                   const std::vector<at::Tensor>& weights,
                   const at::Tensor& head) {
  TORCH_CHECK(features.dim() == 2 && (features.size(0) == 1 || features.size(0) == 2),
              "features must be (2, n) preprocessed or (1, n) raw gradients, not ",
              features.sizes());
  const Sizes s{static_cast<int64_t>(h.size()), head.numel(), features.size(1)};
  TORCH_CHECK(s.depth > 0 && c.size() == h.size() && weights.size() == h.size(),
              "h, c and weights need one entry per layer");
  check_rows(features, features.size(0), s.n, "features");
  TORCH_CHECK(head.is_contiguous(), "head must be contiguous");
  for (int64_t l = 0; l < s.depth; ++l) {
    check_rows(h[l], s.hidden, s.n, "h");
    check_rows(c[l], s.hidden, s.n, "c");
    TORCH_CHECK(weights[l].is_contiguous() && weights[l].dim() == 2 &&
                    weights[l].size(0) == s.fan_in(l) &&
                    weights[l].size(1) == 4 * s.hidden,
                "weights of layer ", l, " must be contiguous (", s.fan_in(l), ", ",
                4 * s.hidden, ")");
  }
  return s;
}

}  // namespace

// Forward of one step for one batch of n coordinates.
// features: the preprocessed gradient (2, n), or the raw gradient (1, n), which
// is preprocessed here with preprocess_p, block by block; h[l], c[l]: (H, n)
// with contiguous rows; weights[l]: the layer's (K_l, 4H) block of theta, K_l =
// 2 + H for the first layer and 2H after, input rows first; biases[l]: (4H,);
// head: (H,) and head_bias (1,).
// Returns the updates (n,), then each layer's new h, then each new c, then each
// layer's activated gates (4H, n) for backward.
std::vector<at::Tensor> lstm_train_forward(const at::Tensor& features,
                                           const std::vector<at::Tensor>& h,
                                           const std::vector<at::Tensor>& c,
                                           const std::vector<at::Tensor>& weights,
                                           const std::vector<at::Tensor>& biases,
                                           const at::Tensor& head,
                                           const at::Tensor& head_bias, double scale,
                                           double preprocess_p) {
  const Sizes s = check_inputs(features, h, c, weights, head);
  const FirstInputs inputs0 = first_inputs(features, preprocess_p);
  const int64_t depth = s.depth, hidden = s.hidden, gates = 4 * hidden;
  TORCH_CHECK(biases.size() == h.size(), "biases need one entry per layer");
  std::vector<const float*> bias(depth), w_features(depth);
  for (int64_t l = 0; l < depth; ++l) {
    TORCH_CHECK(biases[l].is_contiguous() && biases[l].numel() == gates,
                "biases of layer ", l, " must be contiguous (", gates, ",)");
    bias[l] = biases[l].data_ptr<float>();
  }

  const auto options = features.options();
  std::vector<at::Tensor> h_new, c_new, acts;
  for (int64_t l = 0; l < depth; ++l) {
    h_new.push_back(aligned_rows(hidden, s.n, options));
    c_new.push_back(aligned_rows(hidden, s.n, options));
    acts.push_back(aligned_rows(gates, s.n, options));
  }
  at::Tensor updates = at::empty({s.n}, options);
  const float* w_out = head.data_ptr<float>();
  const float b_out = head_bias.item<float>();
  const float out_scale = static_cast<float>(scale);

  for_each_block(s.n, (gates + 2) * kBlock, [&](int64_t first, int64_t count,
                                                float* z) {
    const Rows sums{z, kBlock};
    const Rows x0 = inputs0.block(first, count, z + gates * kBlock);
    for (int64_t l = 0; l < depth; ++l) {
      // Gate products W_h^T h (+ W_x^T x above the first layer) for the block.
      const float* w = weights[l].data_ptr<float>();
      const Rows old_h = rows_of(h[l]).at(first);
      const int64_t inputs = s.inputs(l);
      gemm(true, false, gates, count, hidden, w + inputs * gates, gates, old_h.data,
           old_h.stride, 0.0f, z, kBlock);
      if (l > 0) {
        const Rows x = rows_of(h_new[l - 1]).at(first);
        gemm(true, false, gates, count, inputs, w, gates, x.data, x.stride, 1.0f, z,
             kBlock);
      }
      cell_forward(sums, bias[l], l == 0 ? x0.data : nullptr, x0.stride, w,
                   rows_of(c[l]).at(first),
                   rows_of(acts[l]).at(first), rows_of(c_new[l]).at(first),
                   rows_of(h_new[l]).at(first), hidden, count);
    }

    // The linear head on the last layer's h, times the output scale.
    const Rows top = rows_of(h_new[depth - 1]).at(first);
    float* out = updates.data_ptr<float>() + first;
    for_vectors(count, [&](int64_t at, int64_t width) {
      Vec sum = splat(b_out);
      for (int64_t u = 0; u < hidden; ++u) {
        sum += w_out[u] * load(top.row(u) + at, width);
      }
      store(out + at, sum * out_scale, width);
    });
  });

  std::vector<at::Tensor> out{updates};
  out.insert(out.end(), h_new.begin(), h_new.end());
  out.insert(out.end(), c_new.begin(), c_new.end());
  out.insert(out.end(), acts.begin(), acts.end());
  return out;
}

// Backward of lstm_train_forward. Takes its inputs and outputs again, and the
// gradients of the updates (n,) and of each new h and c (empty where none
// reached them). Writes the gradient of the weights into grad_weights,
// grad_biases, grad_head and grad_head_bias (contiguous views of one flat
// gradient, written over, not added to). Returns the gradient of the features
// ((2, n), undefined unless want_features), then of each old h, then of each
// old c.
std::vector<at::Tensor> lstm_train_backward(
    const at::Tensor& features, const std::vector<at::Tensor>& h,
    const std::vector<at::Tensor>& c, const std::vector<at::Tensor>& h_new,
    const std::vector<at::Tensor>& c_new, const std::vector<at::Tensor>& acts,
    const std::vector<at::Tensor>& weights, const at::Tensor& head, double scale,
    const at::Tensor& grad_updates, const std::vector<at::Tensor>& grad_h_new,
    const std::vector<at::Tensor>& grad_c_new,
    const std::vector<at::Tensor>& grad_weights,
    const std::vector<at::Tensor>& grad_biases, const at::Tensor& grad_head,
    const at::Tensor& grad_head_bias, bool want_features, double preprocess_p) {
  const Sizes s = check_inputs(features, h, c, weights, head);
  const FirstInputs inputs0 = first_inputs(features, preprocess_p);
  TORCH_CHECK(!(inputs0.raw && want_features),
              "the gradient of raw features is not computed");
  const int64_t depth = s.depth, hidden = s.hidden, gates = 4 * hidden;
  TORCH_CHECK(grad_updates.is_contiguous() && grad_updates.numel() == s.n,
              "grad_updates must be contiguous (", s.n, ",)");
  for (int64_t l = 0; l < depth; ++l) {
    check_rows(h_new[l], hidden, s.n, "h_new");
    check_rows(c_new[l], hidden, s.n, "c_new");
    check_rows(acts[l], gates, s.n, "acts");
    if (present(grad_h_new[l])) check_rows(grad_h_new[l], hidden, s.n, "grad_h");
    if (present(grad_c_new[l])) check_rows(grad_c_new[l], hidden, s.n, "grad_c");
  }

  const auto options = features.options();
  std::vector<at::Tensor> grad_h_old, grad_c_old;
  for (int64_t l = 0; l < depth; ++l) {
    grad_h_old.push_back(aligned_rows(hidden, s.n, options));
    grad_c_old.push_back(aligned_rows(hidden, s.n, options));
  }
  at::Tensor grad_features;
  if (want_features) grad_features = aligned_rows(2, s.n, options);

  // Each thread's sums: every layer's weights and biases, then the head's.
  std::vector<int64_t> offsets{0};
  for (int64_t l = 0; l < depth; ++l) {
    offsets.push_back(offsets.back() + s.fan_in(l) * gates + gates);
  }
  const int64_t head_offset = offsets.back();
  ThreadSums sums(head_offset + hidden + 1);
  const float* w_out = head.data_ptr<float>();
  const float* d_updates = grad_updates.data_ptr<float>();
  const float out_scale = static_cast<float>(scale);

  // Scratch per block: dz (4H rows), dh (H rows) and the layer's input gradient.
  const int64_t scratch =
      (gates + 2 * hidden + std::max<int64_t>(hidden, 2) + 2) * kBlock;
  for_each_block(s.n, scratch, [&](int64_t first, int64_t count, float* buffer) {
    const Rows dz{buffer, kBlock};
    Rows dh{buffer + gates * kBlock, kBlock};
    Rows dx{buffer + (gates + hidden) * kBlock, kBlock};
    float* features_scratch =
        buffer + (gates + 2 * hidden + std::max<int64_t>(hidden, 2)) * kBlock;
    float* own = sums.mine();

    // The head: its weights' gradient, and the top layer's h gradient from it.
    const Rows top = rows_of(h_new[depth - 1]).at(first);
    float* head_grad = own + head_offset;
    const float* grad_out = d_updates + first;
    Vec bias_sum{};
    for_vectors(count, [&](int64_t at, int64_t width) {
      bias_sum += load(grad_out + at, width);
    });
    head_grad[hidden] += sum_lanes(bias_sum) * out_scale;
    for (int64_t u = 0; u < hidden; ++u) {
      Vec sum{};
      for_vectors(count, [&](int64_t at, int64_t width) {
        const Vec g = load(grad_out + at, width) * out_scale;
        sum += load(top.row(u) + at, width) * g;
        store(dh.row(u) + at, w_out[u] * g, width);
      });
      head_grad[u] += sum_lanes(sum);
    }

    for (int64_t l = depth - 1; l >= 0; --l) {
      const int64_t inputs = s.inputs(l);
      const float* w = weights[l].data_ptr<float>();
      float* grad_w = own + offsets[l];
      const at::Tensor& later = grad_h_new[l];
      const at::Tensor& dc = grad_c_new[l];
      const Rows old_h = rows_of(h[l]).at(first);

      cell_backward(rows_of(acts[l]).at(first), rows_of(c[l]).at(first),
                    rows_of(c_new[l]).at(first), dh,
                    present(later) ? later.data_ptr<float>() + first : nullptr,
                    present(later) ? later.stride(0) : 0,
                    present(dc) ? dc.data_ptr<float>() + first : nullptr,
                    present(dc) ? dc.stride(0) : 0, dz,
                    rows_of(grad_c_old[l]).at(first), grad_w + s.fan_in(l) * gates,
                    hidden, count);

      // Weights: dW += [x; h] dz^T over the block, input rows first.
      const Rows x = l == 0 ? inputs0.block(first, count, features_scratch)
                            : rows_of(h_new[l - 1]).at(first);
      outer_sum(x, inputs, dz, gates, count, grad_w, gates);
      outer_sum(old_h, hidden, dz, gates, count, grad_w + inputs * gates, gates);

      // Inputs: dh_old = W_h dz, and dx = W_x dz, the gradient of the layer
      // below's h (or of the features, wanted only in second-order unrolls).
      const Rows into_h = rows_of(grad_h_old[l]).at(first);
      gemm(false, false, hidden, count, gates, w + inputs * gates, gates, dz.data,
           kBlock, 0.0f, into_h.data, into_h.stride);
      if (l > 0) {
        gemm(false, false, inputs, count, gates, w, gates, dz.data, kBlock, 0.0f,
             dx.data, kBlock);
        std::swap(dh.data, dx.data);  // dx is the next layer's dh
      } else if (want_features) {
        const Rows into_x = rows_of(grad_features).at(first);
        gemm(false, false, inputs, count, gates, w, gates, dz.data, kBlock, 0.0f,
             into_x.data, into_x.stride);
      }
    }
  });

  // The threads' sums into the flat gradient's views.
  std::vector<float> total(head_offset + hidden + 1);
  sums.total(total.data());
  for (int64_t l = 0; l < depth; ++l) {
    const int64_t size = s.fan_in(l) * gates;
    TORCH_CHECK(grad_weights[l].is_contiguous() && grad_biases[l].is_contiguous(),
                "gradient views must be contiguous");
    std::memcpy(grad_weights[l].data_ptr<float>(), total.data() + offsets[l],
                sizeof(float) * size);
    std::memcpy(grad_biases[l].data_ptr<float>(), total.data() + offsets[l] + size,
                sizeof(float) * gates);
  }
  std::memcpy(grad_head.data_ptr<float>(), total.data() + head_offset,
              sizeof(float) * hidden);
  grad_head_bias.fill_(total[head_offset + hidden]);

  std::vector<at::Tensor> out{grad_features};
  out.insert(out.end(), grad_h_old.begin(), grad_h_old.end());
  out.insert(out.end(), grad_c_old.begin(), grad_c_old.end());
  return out;
}

namespace {

// Views of the LSTM rule's flat weights theta in the order of LSTMRule.shapes:
// each layer's (K_l, 4H) weight and (4H,) bias, then the head's (H,) weights and
// its bias. Slicing here, not in Python, saves a dozen dispatched calls a step.
struct RuleWeights {
  std::vector<at::Tensor> weights, biases;
  at::Tensor head, head_bias;
};

RuleWeights split_theta(const at::Tensor& theta, int64_t depth, int64_t hidden) {
  const Sizes layout{depth, hidden, 0};
  const int64_t gates = 4 * hidden;
  int64_t size = hidden + 1;
  for (int64_t l = 0; l < depth; ++l) size += (layout.fan_in(l) + 1) * gates;
  TORCH_CHECK(theta.dim() == 1 && theta.is_contiguous() && theta.numel() == size &&
                  theta.scalar_type() == at::kFloat,
              "theta must be a contiguous float32 (", size, ",) tensor for ", depth,
              " layers of ", hidden, " units (the state's last size), not ",
              theta.scalar_type(), " ", theta.sizes());
  RuleWeights out;
  int64_t offset = 0;
  for (int64_t l = 0; l < depth; ++l) {
    const int64_t fan_in = layout.fan_in(l);
    const at::Tensor weight = theta.narrow(0, offset, fan_in * gates);
    out.weights.push_back(weight.view({fan_in, gates}));
    offset += fan_in * gates;
    out.biases.push_back(theta.narrow(0, offset, gates));
    offset += gates;
  }
  out.head = theta.narrow(0, offset, hidden);
  out.head_bias = theta.narrow(0, offset + hidden, 1);
  return out;
}

// A (B, D, H) state, or its gradient, as the kernels' (H, B * D) rows: a view
// where each row is contiguous and rows do not overlap, else an aligned copy.
// The kernels' own outputs are such views, so only a step's first state is
// copied.
at::Tensor state_rows(const at::Tensor& state) {
  TORCH_CHECK(state.dim() == 3, "rule state must be (B, D, H), not ", state.sizes());
  const int64_t hidden = state.size(2), count = state.size(0) * state.size(1);
  at::Tensor rows = state.permute({2, 0, 1}).reshape({hidden, count});
  const bool apart = hidden == 1 || rows.stride(0) >= count;  // not broadcast
  if (!(apart && (count == 1 || rows.stride(1) == 1))) {
    rows = aligned_rows(hidden, count, state.options()).copy_(rows);
  }
  return rows;
}

// (H, B * D) rows as the (B, D, H) view that the rule's state is.
at::Tensor state_view(const at::Tensor& rows, int64_t batch, int64_t coordinates) {
  return rows.view({rows.size(0), batch, coordinates}).permute({1, 2, 0});
}

}  // namespace

// One training step of the LSTM rule at flat weights theta, for LSTMTrainStep:
// state is h0, c0, h1, c1, ... as (B, D, H) tensors. Returns the updates (B, D)
// and the new state, (B, D, H) views in the same order, then what backward reads:
// the state's rows, each layer's new h rows, new c rows and activated gates.
std::vector<at::Tensor> lstm_rule_forward(const at::Tensor& theta,
                                          const at::Tensor& features,
                                          const std::vector<at::Tensor>& state,
                                          double scale, double preprocess_p) {
  TORCH_CHECK(!state.empty() && state.size() % 2 == 0,
              "state needs an h and a c per layer");
  const int64_t depth = static_cast<int64_t>(state.size()) / 2;
  TORCH_CHECK(state[0].dim() == 3, "rule state must be (B, D, H), not ",
              state[0].sizes());
  for (const at::Tensor& s : state) {
    TORCH_CHECK(s.sizes() == state[0].sizes(), "every state tensor must be ",
                state[0].sizes(), " as the first is, not ", s.sizes());
  }
  const int64_t batch = state[0].size(0), coordinates = state[0].size(1);
  const int64_t hidden = state[0].size(2);
  TORCH_CHECK(features.dim() == 2 && features.size(1) == batch * coordinates,
              "features must have B * D = ", batch * coordinates,
              " columns, one per coordinate of the (", batch, ", ", coordinates,
              ", H) state, not ", features.sizes());
  std::vector<at::Tensor> h, c;
  for (int64_t l = 0; l < depth; ++l) {
    h.push_back(state_rows(state[2 * l]));
    c.push_back(state_rows(state[2 * l + 1]));
  }
  const RuleWeights w = split_theta(theta, depth, hidden);
  const std::vector<at::Tensor> out = lstm_train_forward(
      features, h, c, w.weights, w.biases, w.head, w.head_bias, scale, preprocess_p);

  std::vector<at::Tensor> result{out[0].view({batch, coordinates})};
  for (int64_t l = 0; l < depth; ++l) {
    result.push_back(state_view(out[1 + l], batch, coordinates));
    result.push_back(state_view(out[1 + depth + l], batch, coordinates));
  }
  for (int64_t l = 0; l < depth; ++l) {
    result.push_back(h[l]);
    result.push_back(c[l]);
  }
  result.insert(result.end(), out.begin() + 1, out.end());
  return result;
}

// Backward of lstm_rule_forward: from its saved tensors (as it returned them)
// and the gradients of the updates and of each new state tensor (None where
// none reached them), for `batch` problems of `coordinates` each. Returns the
// gradient of theta, of the features (undefined unless want_features), then of
// each old state tensor as (B, D, H) views.
std::vector<at::Tensor> lstm_rule_backward(
    const at::Tensor& theta, const at::Tensor& features,
    const std::vector<at::Tensor>& saved,
    const std::optional<at::Tensor>& grad_updates,
    const std::vector<std::optional<at::Tensor>>& grad_state, int64_t batch,
    int64_t coordinates, double scale, bool want_features, double preprocess_p) {
  const int64_t depth = static_cast<int64_t>(grad_state.size()) / 2;
  TORCH_CHECK(depth > 0 && saved.size() == static_cast<size_t>(5 * depth),
              "saved tensors do not match the state's layers");
  const int64_t hidden = saved[0].size(0), count = saved[0].size(1);
  std::vector<at::Tensor> h, c, h_new, c_new, acts, grad_h, grad_c;
  const at::Tensor none = at::empty({0}, features.options());
  for (int64_t l = 0; l < depth; ++l) {
    h.push_back(saved[2 * l]);
    c.push_back(saved[2 * l + 1]);
    h_new.push_back(saved[2 * depth + l]);
    c_new.push_back(saved[3 * depth + l]);
    acts.push_back(saved[4 * depth + l]);
    const auto& dh = grad_state[2 * l];
    const auto& dc = grad_state[2 * l + 1];
    grad_h.push_back(dh.has_value() ? state_rows(*dh) : none);
    grad_c.push_back(dc.has_value() ? state_rows(*dc) : none);
  }
  const at::Tensor d_updates =
      grad_updates.has_value()
          ? grad_updates->reshape({count}).contiguous()  // may be broadcast
          : at::zeros({count}, features.options());

  // Every entry of the gradient is written by the kernel.
  const at::Tensor grad_theta = at::empty_like(theta);
  const RuleWeights w = split_theta(theta, depth, hidden);
  const RuleWeights views = split_theta(grad_theta, depth, hidden);
  const std::vector<at::Tensor> out = lstm_train_backward(
      features, h, c, h_new, c_new, acts, w.weights, w.head, scale, d_updates, grad_h,
      grad_c, views.weights, views.biases, views.head, views.head_bias,
      want_features, preprocess_p);

  std::vector<at::Tensor> result{grad_theta, out[0]};
  for (int64_t l = 0; l < depth; ++l) {
    result.push_back(state_view(out[1 + l], batch, coordinates));
    result.push_back(state_view(out[1 + depth + l], batch, coordinates));
  }
  return result;
}

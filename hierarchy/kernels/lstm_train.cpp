// The coordinatewise LSTM optimiser's training step: forward and backward, each
// one call, for meta-training on the CPU.
//
// Autograd through LSTMRule.update runs a dozen elementwise kernels per layer in
// each direction and keeps about 600 floats per coordinate per step for
// backward. Here the gate products are torch's matrix multiplies over the
// feature-major (units, coordinates) layout, and everything between them is one
// fused pass per layer: the activations, the cell and the hidden state forward;
// the gate gradients and the cell's gradient backward. Forward keeps the four
// activated gates of each layer (4H floats per coordinate); tanh(c) is computed
// again in backward from the new cell, which is an output and kept anyway.
// float32 only; the sigmoid and tanh are exact to float rounding (about 1e-7).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef float Vec __attribute__((vector_size(64)));
typedef int32_t IVec __attribute__((vector_size(64)));
constexpr int64_t kWidth = 16;
constexpr float kLog2e = 1.4426950408889634f;

inline Vec splat(float value) { return Vec{} + value; }

// The first `count` floats at `from`, zeros after them: the last, short vector of
// a row is read and written through these, so no row needs padding.
inline Vec load(const float* from, int64_t count) {
  Vec v{};
  if (count == kWidth) {
    std::memcpy(&v, from, sizeof(Vec));  // one vector load, not a call
  } else {
    std::memcpy(&v, from, sizeof(float) * count);
  }
  return v;
}

inline void store(float* to, Vec v, int64_t count) {
  if (count == kWidth) {
    std::memcpy(to, &v, sizeof(Vec));
  } else {
    std::memcpy(to, &v, sizeof(float) * count);
  }
}

// 2^z, as in lstm_step.cpp: z clamped to [-36, 36], a degree-6 polynomial for the
// fraction and the integer part written into the exponent.
inline Vec exp2_approx(Vec z) {
  z = z < -36.0f ? splat(-36.0f) : z;
  z = z > 36.0f ? splat(36.0f) : z;
  const Vec shifted = z + 12582912.0f;
  const Vec r = z - (shifted - 12582912.0f);
  Vec p = splat(0.00015403530393381606f);
  p = p * r + 0.0013333558146428441f;
  p = p * r + 0.009618129107628477f;
  p = p * r + 0.055504108664821576f;
  p = p * r + 0.2402265069591007f;
  p = p * r + 0.6931471805599453f;
  p = p * r + 1.0f;
  const IVec bits = (reinterpret_cast<const IVec&>(shifted) << 23) + (127 << 23);
  return p * reinterpret_cast<const Vec&>(bits);
}

inline Vec sigmoid(Vec z) { return 1.0f / (1.0f + exp2_approx(z * -kLog2e)); }

inline Vec tanh_approx(Vec z) {
  const Vec e = exp2_approx(z * (-2.0f * kLog2e));
  return (1.0f - e) / (1.0f + e);
}

// A (rows, n) float matrix whose rows are `stride` floats apart.
struct Rows {
  float* data;
  int64_t stride;
  float* row(int64_t r) const { return data + r * stride; }
};

Rows rows_of(const at::Tensor& t) {
  return {t.data_ptr<float>(), t.stride(0)};
}

// A gradient that reached an output; an empty tensor stands for none.
bool present(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

void check_rows(const at::Tensor& t, int64_t rows, int64_t n, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 &&
                  t.size(0) == rows && t.size(1) == n && t.stride(1) == 1,
              what, " must be a float32 CPU (", rows, ", ", n,
              ") tensor with contiguous rows");
}

// Runs body(unit, first, count) over every unit and every run of up to kWidth
// coordinates, split between threads by blocks of coordinates.
template <typename Body>
void for_each_vector(int64_t hidden, int64_t n, const Body& body) {
  const int64_t vectors = (n + kWidth - 1) / kWidth;
  at::parallel_for(0, vectors, 64, [&](int64_t begin, int64_t end) {
    for (int64_t u = 0; u < hidden; ++u) {
      for (int64_t v = begin; v < end; ++v) {
        const int64_t first = v * kWidth;
        body(u, first, std::min(kWidth, n - first));
      }
    }
  });
}

// Activations in place over the gate products (i, f, g, o rows of each unit)
// plus the bias, then c' = f c + i g and h' = o tanh(c'). Sigmoids and tanh share
// divisions in pairs: with p = 1 + exp(-z), 1 / (p_i p_f) gives both i and f.
// Each p is at most 1 + 2^36, so a product of two stays finite.
//
// `features` (2, n), if given, are the first layer's two inputs with their
// weights `w_features` (2, 4H): their products are summed here too, as a matrix
// multiply with an inner size of 2 runs far below the machine's speed.
void cell_forward(const at::Tensor& gates, const float* bias, const float* features,
                  const float* w_features, const Rows& c, const Rows& c_new,
                  const Rows& h_new, int64_t hidden, int64_t n) {
  const Rows z = rows_of(gates);
  const int64_t gate_count = 4 * hidden;
  for_each_vector(hidden, n, [&](int64_t u, int64_t at, int64_t count) {
    float* row[4];
    Vec sum[4];
    Vec x0{}, x1{};
    if (features != nullptr) {
      x0 = load(features + at, count);
      x1 = load(features + n + at, count);
    }
    for (int k = 0; k < 4; ++k) {
      const int64_t j = k * hidden + u;
      row[k] = z.row(j) + at;
      sum[k] = load(row[k], count) + bias[j];
      if (features != nullptr) {
        sum[k] += w_features[j] * x0 + w_features[gate_count + j] * x1;
      }
    }
    float* zi = row[0];
    float* zf = row[1];
    float* zg = row[2];
    float* zo = row[3];
    const Vec pi = 1.0f + exp2_approx(sum[0] * -kLog2e);
    const Vec pf = 1.0f + exp2_approx(sum[1] * -kLog2e);
    const Vec eg = exp2_approx(sum[2] * (-2.0f * kLog2e));
    const Vec po = 1.0f + exp2_approx(sum[3] * -kLog2e);
    const Vec pg = 1.0f + eg;
    const Vec r_if = 1.0f / (pi * pf);
    const Vec r_go = 1.0f / (pg * po);
    const Vec i = pf * r_if, f = pi * r_if;
    const Vec g = (1.0f - eg) * po * r_go, o = pg * r_go;
    const Vec cell = f * load(c.row(u) + at, count) + i * g;
    store(zi, i, count);
    store(zf, f, count);
    store(zg, g, count);
    store(zo, o, count);
    store(c_new.row(u) + at, cell, count);
    store(h_new.row(u) + at, o * tanh_approx(cell), count);
  });
}

// Where the gradient of a layer's new h comes from: rows from the layer above
// or the head's outer product head[u] * grad_out[j], plus rows from later steps.
struct HiddenGrad {
  const float* above = nullptr;  // (H, n) rows, `stride` apart
  int64_t stride = 0;
  const float* head = nullptr;   // (H,) with grad_out (n,), for the top layer
  const float* grad_out = nullptr;
  const float* later = nullptr;  // (H, n) rows, `later_stride` apart, or null
  int64_t later_stride = 0;

  Vec at(int64_t u, int64_t j, int64_t count) const {
    Vec grad = head != nullptr ? head[u] * load(grad_out + j, count)
                               : load(above + u * stride + j, count);
    if (later != nullptr) grad += load(later + u * later_stride + j, count);
    return grad;
  }
};

// Gradients of the gate sums and of the old cell from those of h' and c'
// (dc may be null: no gradient reached the new cell from later steps).
void cell_backward(const at::Tensor& act, const Rows& c, const Rows& c_new,
                   const HiddenGrad& dh, const float* dc, int64_t dc_stride,
                   const at::Tensor& dgates, const Rows& dc_old, int64_t hidden,
                   int64_t n) {
  const Rows a = rows_of(act);
  const Rows dz = rows_of(dgates);
  for_each_vector(hidden, n, [&](int64_t u, int64_t at, int64_t count) {
    const Vec i = load(a.row(u) + at, count);
    const Vec f = load(a.row(hidden + u) + at, count);
    const Vec g = load(a.row(2 * hidden + u) + at, count);
    const Vec o = load(a.row(3 * hidden + u) + at, count);
    const Vec tc = tanh_approx(load(c_new.row(u) + at, count));
    const Vec grad_h = dh.at(u, at, count);
    Vec grad_c = grad_h * o * (1.0f - tc * tc);
    if (dc != nullptr) grad_c += load(dc + u * dc_stride + at, count);
    store(dz.row(u) + at, grad_c * g * i * (1.0f - i), count);
    store(dz.row(hidden + u) + at,
          grad_c * load(c.row(u) + at, count) * f * (1.0f - f), count);
    store(dz.row(2 * hidden + u) + at, grad_c * i * (1.0f - g * g), count);
    store(dz.row(3 * hidden + u) + at, grad_h * tc * o * (1.0f - o), count);
    store(dc_old.row(u) + at, grad_c * f, count);
  });
}

}  // namespace

// Forward of one step for one batch of n coordinates.
// features: (2, n); h[l], c[l]: (H, n) with contiguous rows; weights[l]: the
// layer's (K_l, 4H) block of theta, K_l = 2 + H for the first layer and 2H after,
// input rows first; biases[l]: (4H,); head: (H,) and head_bias (1,).
// Returns the updates (n,), then each layer's new h, then each new c, then each
// layer's activated gates (4H, n) for backward.
std::vector<at::Tensor> lstm_train_forward(const at::Tensor& features,
                                           const std::vector<at::Tensor>& h,
                                           const std::vector<at::Tensor>& c,
                                           const std::vector<at::Tensor>& weights,
                                           const std::vector<at::Tensor>& biases,
                                           const at::Tensor& head,
                                           const at::Tensor& head_bias, double scale) {
  const int64_t depth = static_cast<int64_t>(h.size());
  TORCH_CHECK(depth > 0 && c.size() == h.size() && weights.size() == h.size() &&
                  biases.size() == h.size(),
              "h, c, weights and biases need one entry per layer");
  const int64_t hidden = head.numel();
  const int64_t n = features.size(1);
  check_rows(features, 2, n, "features");
  TORCH_CHECK(features.stride(0) == n, "features must be contiguous");

  std::vector<at::Tensor> h_new, c_new, acts;
  at::Tensor x = features;
  for (int64_t l = 0; l < depth; ++l) {
    check_rows(h[l], hidden, n, "h");
    check_rows(c[l], hidden, n, "c");
    const int64_t inputs = x.size(0);
    TORCH_CHECK(weights[l].size(0) == inputs + hidden &&
                    weights[l].size(1) == 4 * hidden,
                "weights of layer ", l, " must be (", inputs + hidden, ", ",
                4 * hidden, ")");

    // Gate products W_x^T x + W_h^T h into one buffer; the bias is added in
    // the pass that follows.
    TORCH_CHECK(biases[l].is_contiguous() && biases[l].numel() == 4 * hidden,
                "biases of layer ", l, " must be contiguous (", 4 * hidden, ",)");
    const at::Tensor w_t = weights[l].t();
    at::Tensor gates = at::mm(w_t.narrow(1, inputs, hidden), h[l]);
    at::Tensor w_features;
    if (l == 0) {
      w_features = weights[l].narrow(0, 0, inputs).contiguous();
    } else {
      gates.addmm_(w_t.narrow(1, 0, inputs), x);
    }

    at::Tensor hn = at::empty({hidden, n}, features.options());
    at::Tensor cn = at::empty({hidden, n}, features.options());
    cell_forward(gates, biases[l].data_ptr<float>(),
                 l == 0 ? x.data_ptr<float>() : nullptr,
                 l == 0 ? w_features.data_ptr<float>() : nullptr, rows_of(c[l]),
                 rows_of(cn), rows_of(hn), hidden, n);
    h_new.push_back(hn);
    c_new.push_back(cn);
    acts.push_back(gates);
    x = hn;
  }

  // The linear head on the last layer's h, times the output scale.
  at::Tensor updates = at::addmm(head_bias.unsqueeze(1), head.unsqueeze(0), x)
                           .squeeze(0)
                           .mul_(scale);

  std::vector<at::Tensor> out{updates};
  out.insert(out.end(), h_new.begin(), h_new.end());
  out.insert(out.end(), c_new.begin(), c_new.end());
  out.insert(out.end(), acts.begin(), acts.end());
  return out;
}

// Backward of lstm_train_forward. Takes its inputs and outputs again, and the
// gradients of the updates (n,) and of each new h and c (empty where none
// reached them). Writes the gradient of the weights into grad_weights,
// grad_biases, grad_head and grad_head_bias (views of one flat gradient, written
// over, not added to). Returns the gradient of the features ((2, n), undefined
// unless want_features), then of each old h, then of each old c.
std::vector<at::Tensor> lstm_train_backward(
    const at::Tensor& features, const std::vector<at::Tensor>& h,
    const std::vector<at::Tensor>& c, const std::vector<at::Tensor>& h_new,
    const std::vector<at::Tensor>& c_new, const std::vector<at::Tensor>& acts,
    const std::vector<at::Tensor>& weights, const at::Tensor& head, double scale,
    const at::Tensor& grad_updates, const std::vector<at::Tensor>& grad_h_new,
    const std::vector<at::Tensor>& grad_c_new,
    const std::vector<at::Tensor>& grad_weights,
    const std::vector<at::Tensor>& grad_biases, const at::Tensor& grad_head,
    const at::Tensor& grad_head_bias, bool want_features) {
  const int64_t depth = static_cast<int64_t>(h.size());
  const int64_t hidden = head.numel();
  const int64_t n = features.size(1);
  const at::Tensor top = h_new[depth - 1];

  // The head's weights. Its share of the last h's gradient, head[u] * grad_out,
  // is formed inside that layer's pass.
  const at::Tensor grad_out = (grad_updates.reshape({1, n}) * scale).contiguous();
  at::Tensor into = grad_head.view({hidden, 1});
  at::mm_out(into, top, grad_out.t());
  into = grad_head_bias;
  at::sum_out(into, grad_out, {1});
  const at::Tensor head_weights = head.contiguous();
  HiddenGrad grad_h;
  grad_h.head = head_weights.data_ptr<float>();
  grad_h.grad_out = grad_out.data_ptr<float>();

  std::vector<at::Tensor> grad_h_old(depth), grad_c_old(depth);
  at::Tensor grad_features, grad_in;
  for (int64_t l = depth - 1; l >= 0; --l) {
    const at::Tensor x = l == 0 ? features : h_new[l - 1];
    const int64_t inputs = x.size(0);
    check_rows(acts[l], 4 * hidden, n, "acts");
    check_rows(c_new[l], hidden, n, "c_new");
    if (present(grad_h_new[l])) {
      check_rows(grad_h_new[l], hidden, n, "grad_h");
      grad_h.later = grad_h_new[l].data_ptr<float>();
      grad_h.later_stride = grad_h_new[l].stride(0);
    } else {
      grad_h.later = nullptr;
    }
    const at::Tensor& dc = grad_c_new[l];
    const bool has_dc = present(dc);
    if (has_dc) check_rows(dc, hidden, n, "grad_c");

    // Gate gradients, and the old cell's, in one pass.
    at::Tensor dgates = at::empty({4 * hidden, n}, features.options());
    at::Tensor dc_old = at::empty({hidden, n}, features.options());
    cell_backward(acts[l], rows_of(c[l]), rows_of(c_new[l]), grad_h,
                  has_dc ? dc.data_ptr<float>() : nullptr, has_dc ? dc.stride(0) : 0,
                  dgates, rows_of(dc_old), hidden, n);
    grad_c_old[l] = dc_old;

    // Weights: dW = [x; h] dz^T, input rows first; bias: the sum of dz.
    into = grad_weights[l].narrow(0, 0, inputs);
    at::mm_out(into, x, dgates.t());
    into = grad_weights[l].narrow(0, inputs, hidden);
    at::mm_out(into, h[l], dgates.t());
    into = grad_biases[l];
    at::sum_out(into, dgates, {1});

    // Inputs: [dx; dh_old] = W dz. dx is the gradient of the layer below's h.
    // The first layer's inputs are the features, wanted only in second-order
    // unrolls.
    const bool inputs_wanted = l > 0 || want_features;
    grad_in = at::mm(inputs_wanted ? weights[l] : weights[l].narrow(0, inputs, hidden),
                     dgates);
    const int64_t skip = inputs_wanted ? inputs : 0;
    grad_h_old[l] = grad_in.narrow(0, skip, hidden);
    if (l > 0) {
      grad_h = HiddenGrad();
      grad_h.above = grad_in.data_ptr<float>();
      grad_h.stride = grad_in.stride(0);
    } else if (want_features) {
      grad_features = grad_in.narrow(0, 0, inputs);
    }
  }

  std::vector<at::Tensor> out{grad_features};
  out.insert(out.end(), grad_h_old.begin(), grad_h_old.end());
  out.insert(out.end(), grad_c_old.begin(), grad_c_old.end());
  return out;
}

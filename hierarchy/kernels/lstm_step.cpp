// The coordinatewise LSTM optimiser's inference step as one fused CPU kernel.
//
// LSTMRule.step_ in eager torch makes a dozen passes over memory per layer (the
// gate product, each activation, the cell and hidden updates). Here a tile of 64
// coordinates goes through every layer and the head while it sits in the L1
// cache: each unit's four gate sums are accumulated in registers and squashed
// there, and only the state is read and written in memory. Built on first use
// by hierarchy/kernels/__init__.py; float32 only.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec.h"

namespace {

using namespace hierarchy_kernels;


// A tile is kVectors vectors of kWidth floats (vec.h).
constexpr int64_t kVectors = 4;
constexpr int64_t kTile = kWidth * kVectors;

inline Vec load(const float* from) {
  Vec v;
  std::memcpy(&v, from, sizeof(Vec));
  return v;
}

inline void store(float* to, Vec v) { std::memcpy(to, &v, sizeof(Vec)); }

// One LSTM cell update; returns h and overwrites c. The gate sums come in base 2
// and negated: i, f, o times -log2(e) and g times -2 log2(e) (the weights were
// scaled so), so e_i = 2^i is exp(-i) and e_g is exp(-2g). With sigmoid z =
// 1 / (1 + exp(-z)) and tanh z = (1 - exp(-2z)) / (1 + exp(-2z)), the new
// c = sigmoid(f) c + sigmoid(i) tanh(g) and h = sigmoid(o) tanh(c) take one
// division each instead of five in all.
inline Vec cell_update(Vec i, Vec f, Vec g, Vec o, Vec& c) {
  const Vec pi = 1.0f + exp2_approx(i);
  const Vec pf = 1.0f + exp2_approx(f);
  const Vec eg = exp2_approx(g);
  const Vec pg = 1.0f + eg;
  c = (c * pi * pg + (1.0f - eg) * pf) / (pf * pi * pg);
  const Vec ec = exp2_approx(c * -2.8853900817779268f);  // exp(-2c)
  return (1.0f - ec) / ((1.0f + exp2_approx(o)) * (1.0f + ec));
}

struct Layer {
  const float* weight;  // (4H, K) row-major: gate rows i, f, g, o of each unit
  const float* bias;    // (4H,)
  int64_t fan_in;       // K
  float* h;             // (H, n) with row stride `stride`, columns contiguous
  float* c;
  int64_t stride;
};

// One tile: rows of `x` are [input features (2); h of layer 0; ...; h of the
// last layer], kTile coordinates each, and `cells` holds every layer's c. Layer
// l reads the rows starting at its input and writes its new h over its old h
// once all its gates are summed.
void tile_step(const std::vector<Layer>& layers, int64_t hidden, float* x,
               float* cells, float* fresh) {
  for (size_t l = 0; l < layers.size(); ++l) {
    const Layer& layer = layers[l];
    const float* input = x + (l == 0 ? 0 : 2 + (l - 1) * hidden) * kTile;
    for (int64_t u = 0; u < hidden; ++u) {
      const float* w[4];
      Vec gate[4][kVectors];
      for (int g = 0; g < 4; ++g) {
        w[g] = layer.weight + (g * hidden + u) * layer.fan_in;
        const Vec bias = splat(layer.bias[g * hidden + u]);
        for (int v = 0; v < kVectors; ++v) gate[g][v] = bias;
      }
      for (int64_t k = 0; k < layer.fan_in; ++k) {
        Vec row[kVectors];
        const float* from = input + k * kTile;
        for (int v = 0; v < kVectors; ++v) row[v] = load(from + v * kWidth);
        for (int g = 0; g < 4; ++g) {
          const Vec weight = splat(w[g][k]);
          for (int v = 0; v < kVectors; ++v) gate[g][v] += weight * row[v];
        }
      }
      float* c = cells + (l * hidden + u) * kTile;
      for (int v = 0; v < kVectors; ++v) {
        Vec cell = load(c + v * kWidth);
        const Vec h =
            cell_update(gate[0][v], gate[1][v], gate[2][v], gate[3][v], cell);
        store(c + v * kWidth, cell);
        store(fresh + u * kTile + v * kWidth, h);
      }
    }
    std::memcpy(x + (2 + l * hidden) * kTile, fresh, sizeof(float) * hidden * kTile);
  }
}

}  // namespace

// Advance the state in place and write the updates, for one problem.
// features: (2, n) preprocessed gradient; h[l], c[l]: (H, n) views whose rows
// share one stride and whose columns are contiguous; weights[l], biases[l]: the
// layer's (4H, K_l) and (4H,) from kernel_weights (transposed and scaled to base
// 2); head: (H,) weights of the linear head; updates: (n,) output.
void lstm_step(const torch::Tensor& features, const std::vector<torch::Tensor>& h,
               const std::vector<torch::Tensor>& c,
               const std::vector<torch::Tensor>& weights,
               const std::vector<torch::Tensor>& biases, const torch::Tensor& head,
               double head_bias, double scale, torch::Tensor& updates) {
  const int64_t n = features.size(1);
  const int64_t hidden = head.size(0);
  auto is_float = [](const torch::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == torch::kFloat;
  };
  TORCH_CHECK(is_float(features) && features.is_contiguous() && features.size(0) == 2,
              "features must be a contiguous float32 (2, n) CPU tensor");
  TORCH_CHECK(is_float(updates) && updates.is_contiguous() && updates.numel() == n,
              "updates must be a contiguous float32 CPU tensor of n elements");
  TORCH_CHECK(is_float(head) && head.is_contiguous(), "head must be float32");
  TORCH_CHECK(!h.empty() && h.size() == c.size() && h.size() == weights.size() &&
                  h.size() == biases.size(),
              "h, c, weights and biases need one entry per layer");
  std::vector<Layer> layers;
  for (size_t l = 0; l < h.size(); ++l) {
    const int64_t fan_in = (l == 0 ? 2 : hidden) + hidden;
    for (const torch::Tensor* t : {&h[l], &c[l]}) {
      TORCH_CHECK(is_float(*t) && t->size(0) == hidden && t->size(1) == n &&
                      t->stride(1) == 1 && t->stride(0) == h[l].stride(0),
                  "h and c must be float32 (H, n) views with contiguous rows of "
                  "one stride");
    }
    TORCH_CHECK(is_float(weights[l]) && weights[l].is_contiguous() &&
                    weights[l].size(0) == 4 * hidden && weights[l].size(1) == fan_in,
                "weights[", l, "] must be a contiguous float32 (4H, K) tensor");
    TORCH_CHECK(is_float(biases[l]) && biases[l].is_contiguous() &&
                    biases[l].numel() == 4 * hidden,
                "biases[", l, "] must be a contiguous float32 (4H,) tensor");
    layers.push_back({weights[l].data_ptr<float>(), biases[l].data_ptr<float>(),
                      fan_in, h[l].data_ptr<float>(), c[l].data_ptr<float>(),
                      h[l].stride(0)});
  }
  const float* feats = features.data_ptr<float>();
  const float* w_out = head.data_ptr<float>();
  float* out = updates.data_ptr<float>();
  const int64_t depth = static_cast<int64_t>(layers.size());
  const int64_t rows = 2 + depth * hidden;
  const int64_t tiles = (n + kTile - 1) / kTile;

  at::parallel_for(0, tiles, 16, [&](int64_t first, int64_t last) {
    // On whole vectors (vec.h), so that no tile load straddles two cache lines.
    float* const x = thread_scratch((rows + 2 * depth * hidden) * kTile);
    float* const cells = x + rows * kTile;
    float* const fresh = cells + depth * hidden * kTile;
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t start = tile * kTile;
      const size_t bytes = sizeof(float) * std::min(kTile, n - start);

      // Gather the tile (a short last tile is padded with zeros), step it, and
      // scatter the state back.
      if (start + kTile > n) {
        std::fill(x, x + rows * kTile, 0.0f);
        std::fill(cells, cells + depth * hidden * kTile, 0.0f);
      }
      for (int64_t f = 0; f < 2; ++f) {
        std::memcpy(x + f * kTile, feats + f * n + start, bytes);
      }
      for (int64_t l = 0; l < depth; ++l) {
        const Layer& layer = layers[l];
        for (int64_t u = 0; u < hidden; ++u) {
          const int64_t row = (l * hidden + u) * kTile;
          std::memcpy(x + 2 * kTile + row, layer.h + u * layer.stride + start, bytes);
          std::memcpy(cells + row, layer.c + u * layer.stride + start, bytes);
        }
      }

      tile_step(layers, hidden, x, cells, fresh);

      for (int64_t l = 0; l < depth; ++l) {
        const Layer& layer = layers[l];
        for (int64_t u = 0; u < hidden; ++u) {
          const int64_t row = (l * hidden + u) * kTile;
          std::memcpy(layer.h + u * layer.stride + start, x + 2 * kTile + row, bytes);
          std::memcpy(layer.c + u * layer.stride + start, cells + row, bytes);
        }
      }

      // The linear head on the last layer's h.
      const float* top = x + (2 + (depth - 1) * hidden) * kTile;
      float sum[kTile];
      for (int64_t j = 0; j < kTile; ++j) sum[j] = static_cast<float>(head_bias);
      for (int64_t u = 0; u < hidden; ++u) {
        for (int64_t j = 0; j < kTile; ++j) sum[j] += w_out[u] * top[u * kTile + j];
      }
      for (int64_t j = 0; j < kTile; ++j) sum[j] *= static_cast<float>(scale);
      std::memcpy(out + start, sum, bytes);
    }
  });
}

// The training step's forward and backward, from lstm_train.cpp.
std::vector<torch::Tensor> lstm_train_forward(
    const torch::Tensor& features, const std::vector<torch::Tensor>& h,
    const std::vector<torch::Tensor>& c, const std::vector<torch::Tensor>& weights,
    const std::vector<torch::Tensor>& biases, const torch::Tensor& head,
    const torch::Tensor& head_bias, double scale, double preprocess_p);
std::vector<torch::Tensor> lstm_train_backward(
    const torch::Tensor& features, const std::vector<torch::Tensor>& h,
    const std::vector<torch::Tensor>& c, const std::vector<torch::Tensor>& h_new,
    const std::vector<torch::Tensor>& c_new, const std::vector<torch::Tensor>& acts,
    const std::vector<torch::Tensor>& weights, const torch::Tensor& head,
    double scale, const torch::Tensor& grad_updates,
    const std::vector<torch::Tensor>& grad_h_new,
    const std::vector<torch::Tensor>& grad_c_new,
    const std::vector<torch::Tensor>& grad_weights,
    const std::vector<torch::Tensor>& grad_biases, const torch::Tensor& grad_head,
    const torch::Tensor& grad_head_bias, bool want_features, double preprocess_p);

std::vector<torch::Tensor> lstm_rule_forward(const torch::Tensor& theta,
                                             const torch::Tensor& features,
                                             const std::vector<torch::Tensor>& state,
                                             double scale, double preprocess_p);
std::vector<torch::Tensor> lstm_rule_backward(
    const torch::Tensor& theta, const torch::Tensor& features,
    const std::vector<torch::Tensor>& saved,
    const std::optional<torch::Tensor>& grad_updates,
    const std::vector<std::optional<torch::Tensor>>& grad_state, int64_t batch,
    int64_t coordinates, double scale, bool want_features, double preprocess_p);

// The loss and gradient of B MLP classifiers, from mlp.cpp.
std::vector<torch::Tensor> mlp_value_and_grad(const torch::Tensor& params,
                                              const torch::Tensor& images,
                                              const torch::Tensor& labels,
                                              const torch::Tensor& batches,
                                              int64_t step,
                                              const std::vector<int64_t>& sizes,
                                              int64_t activation);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("lstm_step", &lstm_step, "Fused LSTM optimiser step, in place");
  module.def("lstm_train_forward", &lstm_train_forward,
             "LSTM optimiser step for training: updates, new state, saved gates");
  module.def("lstm_train_backward", &lstm_train_backward,
             "Gradients of lstm_train_forward's inputs");
  module.def("lstm_rule_forward", &lstm_rule_forward,
             "LSTM rule's training step at flat weights on (B, D, H) state");
  module.def("lstm_rule_backward", &lstm_rule_backward,
             "Gradients of lstm_rule_forward's inputs");
  module.def("mlp_value_and_grad", &mlp_value_and_grad,
             "Loss and gradient of B MLP classifiers on their minibatches");
}

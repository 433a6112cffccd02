// The loss and gradient of B MLP classifiers on their own minibatches, in one
// call: MLPProblem.value_and_grad's backpropagation, written out with the aten
// operations autograd runs, in its order, so that both are bit for bit autograd's.
//
// The arithmetic is torch's own; what this saves is the cost of dispatching some
// thirty small operations from Python at every step of an unroll, a third of a
// millisecond for one MNIST network on two CPU cores, more than its arithmetic.

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cstdint>
#include <vector>

namespace {

enum Activation : int64_t { kSigmoid = 0, kRelu = 1, kTanh = 2 };

at::Tensor activate(const at::Tensor& x, int64_t activation) {
  switch (activation) {
    case kSigmoid:
      return at::sigmoid(x);
    case kRelu:
      return at::relu(x);
    default:
      return at::tanh(x);
  }
}

// The activation's backward from its output, as autograd computes it.
at::Tensor activate_backward(const at::Tensor& grad, const at::Tensor& out,
                             int64_t activation) {
  switch (activation) {
    case kSigmoid:
      return at::sigmoid_backward(grad, out);
    case kRelu:
      return at::threshold_backward(grad, out, 0);
    default:
      return at::tanh_backward(grad, out);
  }
}

}  // namespace

// params (B, D) flat weights, each layer's (in, out) weight then (out,) bias;
// images (N, in) and labels (N,) of the split; batches (steps, B, n) indices
// into them, of which row `step` is this step's (the caller wraps it, as a
// Python step may not fit in int64); sizes: the layer widths,
// input first; activation: 0 sigmoid, 1 relu, 2 tanh. Returns the mean
// cross-entropy of each network (B,) and its gradient (B, D), with no graph.
std::vector<at::Tensor> mlp_value_and_grad(const at::Tensor& params,
                                           const at::Tensor& images,
                                           const at::Tensor& labels,
                                           const at::Tensor& batches, int64_t step,
                                           const std::vector<int64_t>& sizes,
                                           int64_t activation) {
  TORCH_CHECK(sizes.size() >= 2, "sizes needs an input and an output width");
  TORCH_CHECK(activation >= kSigmoid && activation <= kTanh,
              "activation must be 0 (sigmoid), 1 (relu) or 2 (tanh), not ",
              activation);
  const c10::AutoGradMode no_grad(false);
  const int64_t depth = static_cast<int64_t>(sizes.size()) - 1;

  // The minibatch: images (B, n, in) and labels (B * n,).
  const at::Tensor index = batches.select(0, step);
  const at::Tensor rows = index.reshape({-1});
  const int64_t batch = index.size(0), n = index.size(1);
  at::Tensor x = images.index_select(0, rows).view({batch, n, -1});
  const at::Tensor targets = labels.index_select(0, rows);

  // Each layer's weight (B, in, out) and bias (B, out), by one split.
  std::vector<int64_t> split_sizes;
  for (int64_t l = 0; l < depth; ++l) {
    split_sizes.push_back(sizes[l] * sizes[l + 1]);
    split_sizes.push_back(sizes[l + 1]);
  }
  const std::vector<at::Tensor> parts =
      params.detach().split_with_sizes(split_sizes, -1);
  std::vector<at::Tensor> weights;
  for (int64_t l = 0; l < depth; ++l) {
    weights.push_back(parts[2 * l].unflatten(-1, {sizes[l], sizes[l + 1]}));
  }

  // Forward, keeping each layer's input, then the loss.
  std::vector<at::Tensor> inputs{x};
  for (int64_t l = 0; l < depth; ++l) {
    x = at::baddbmm(parts[2 * l + 1].unsqueeze(1), x, weights[l]);
    if (l < depth - 1) x = activate(x, activation);
    inputs.push_back(x);
  }
  const at::Tensor log_p = at::log_softmax(x.flatten(0, 1), 1);
  const at::Tensor per_example =
      at::nll_loss_nd(log_p, targets, {}, at::Reduction::None, -100);
  const at::Tensor loss = per_example.view({batch, n}).mean(-1);

  // Backward: the mean, the negative log-likelihood and the log-softmax.
  at::Tensor grad = at::ones_like(loss).unsqueeze(-1).expand({batch, n}).div(n);
  grad = at::nll_loss_backward(grad.reshape({-1}), log_p, targets, {},
                               at::Reduction::None, -100, log_p.new_empty({}));
  grad = at::_log_softmax_backward_data(grad, log_p, 1, log_p.scalar_type());
  grad = grad.view({batch, n, -1});

  // Each layer from the top: its bias and weight gradients, then its input's.
  std::vector<at::Tensor> grads(2 * depth);
  for (int64_t l = depth - 1; l >= 0; --l) {
    if (l < depth - 1) grad = activate_backward(grad, inputs[l + 1], activation);
    grads[2 * l + 1] = grad.sum(1, true).squeeze(1);
    grads[2 * l] = inputs[l].transpose(1, 2).bmm(grad).flatten(-2);
    if (l > 0) grad = grad.bmm(weights[l].transpose(1, 2));
  }
  return {loss, at::cat(grads, -1)};
}

// Fused CPU kernels of TranscriptFormer's encoder layers, compiled on first use.
//
// 1. Softmax self-attention of short sequences with narrow heads, fused per (cell, head).
//    The input is the packed projection of a pre-norm encoder layer, laid out as
//    (cells, tokens, 3, heads, head_dim): queries, keys and values of every head side by
//    side, exactly as F.linear(x, in_proj_weight) returns them. Every (cell, head) pair
//    is one independent problem of a few dozen tokens whose scores fit in the L1 cache,
//    so the products, the softmax and the weighted sum run in one pass over it instead
//    of as batched GEMMs over thousands of tiny matrices with the scores written to
//    memory in between. The output is (cells, tokens, heads * head_dim), ready for the
//    output projection; the gradient of the packed input is written in the input's
//    layout. Only the log-sum-exp of every row of scores is saved for the backward
//    pass, which recomputes the weights: cheaper than writing and reading back
//    cells * heads * tokens^2 weights.
// 2. Bias and GELU of the feed-forward block, gelu(h + bias), in one pass, and its
//    backward pass (the gradient of h and of the bias) in another, instead of the bias
//    copied into the product's output, the GELU, its gradient and the bias reduction as
//    four passes over the widest activation of the layer.
// 3. Dropout from random 16-bit chunks: x * (chunk >= threshold ? scale : 0) in one
//    pass, for the forward (on the input) and the backward (on the gradient), so that
//    no boolean or floating-point mask is built; the random bits are the only state.
//
// Work is split into pieces of fixed size, each computed by one thread in a fixed
// order, so results do not depend on the number of threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// exp(x) for x <= 0 (softmax arguments after subtracting the row maximum, minus a
// square), written as plain arithmetic so that the compiler vectorises the loops it is
// used in. Range reduction x = n ln2 + r with |r| <= ln2 / 2 and a degree-6 polynomial
// for exp(r) (the Cephes coefficients): relative error about 2e-7. Arguments below -87
// give 1.6e-38 instead of a smaller or subnormal value.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  // round to nearest by adding and subtracting 1.5 * 2^23 (vectorises without any
  // special floating-point flags, unlike floor or nearbyint)
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

inline double exp_nonpositive(double x) { return std::exp(x); }

// The standard normal distribution function Phi(u) and density phi(u), from which
// GELU(u) = u Phi(u) and GELU'(u) = Phi(u) + u phi(u). erf is evaluated with formula
// 7.1.26 of Abramowitz and Stegun (absolute error below 1.5e-7, sharing exp(-u^2 / 2)
// with the density); the GELU then differs from PyTorch's by at most 4e-7 (at |u| = 8).
inline void normal_cdf_pdf(float u, float& cdf, float& pdf) {
  const float x = std::fabs(u) * 0.70710678118654752f;
  const float t = 1.0f / (1.0f + 0.3275911f * x);
  const float e = exp_nonpositive(-x * x);
  float poly = 1.061405429f;
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  const float tail = 0.5f * poly * t * e;  // 1 - Phi(|u|)
  cdf = u >= 0.0f ? 1.0f - tail : tail;
  pdf = e * 0.39894228040143268f;
}

inline void normal_cdf_pdf(double u, double& cdf, double& pdf) {
  cdf = 0.5 * std::erfc(-u * 0.70710678118654752);
  pdf = std::exp(-0.5 * u * u) * 0.39894228040143268;
}

// Rows of one piece of work of the GELU kernels.
constexpr int64_t kGeluRows = 64;

template <typename T>
void bias_gelu_forward_kernel(const T* h, const T* bias, T* out, int64_t rows, int64_t width) {
  at::parallel_for(0, (rows + kGeluRows - 1) / kGeluRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin * kGeluRows; r < std::min(rows, end * kGeluRows); ++r) {
      const T* __restrict__ hr = h + r * width;
      T* __restrict__ outr = out + r * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const T u = hr[j] + bias[j];
        T cdf, pdf;
        normal_cdf_pdf(u, cdf, pdf);
        outr[j] = u * cdf;
      }
    }
  });
}

template <typename T>
void bias_gelu_backward_kernel(const T* grad, const T* h, const T* bias, T* grad_h,
                               T* grad_bias, int64_t rows, int64_t width) {
  const int64_t pieces = (rows + kGeluRows - 1) / kGeluRows;
  std::vector<T> partial(pieces * width, T(0));
  at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
    for (int64_t piece = begin; piece < end; ++piece) {
      T* __restrict__ sums = partial.data() + piece * width;
      for (int64_t r = piece * kGeluRows; r < std::min(rows, (piece + 1) * kGeluRows); ++r) {
        const T* __restrict__ gr = grad + r * width;
        const T* __restrict__ hr = h + r * width;
        T* __restrict__ outr = grad_h + r * width;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          const T u = hr[j] + bias[j];
          T cdf, pdf;
          normal_cdf_pdf(u, cdf, pdf);
          const T g = gr[j] * (cdf + u * pdf);
          outr[j] = g;
          sums[j] += g;
        }
      }
    }
  });
  std::fill(grad_bias, grad_bias + width, T(0));
  for (int64_t piece = 0; piece < pieces; ++piece) {
    const T* sums = partial.data() + piece * width;
    for (int64_t j = 0; j < width; ++j) grad_bias[j] += sums[j];
  }
}

// Elements of one piece of work of the dropout kernel.
constexpr int64_t kDropoutChunk = 1 << 14;

template <typename T>
void dropout_kernel(const T* x, const int16_t* bits, T* out, int64_t n, int16_t threshold,
                    T scale) {
  at::parallel_for(0, (n + kDropoutChunk - 1) / kDropoutChunk, 1, [&](int64_t begin, int64_t end) {
    const int64_t stop = std::min(n, end * kDropoutChunk);
    const T* __restrict__ in = x;
    const int16_t* __restrict__ b = bits;
    T* __restrict__ o = out;
#pragma omp simd
    for (int64_t i = begin * kDropoutChunk; i < stop; ++i) {
      o[i] = in[i] * (b[i] >= threshold ? scale : T(0));
    }
  });
}

// Lanes of a 256-bit vector; rows of the transposed operands are padded to a multiple.
template <typename T>
constexpr int64_t kLanes = 32 / sizeof(T);

inline int64_t padded(int64_t n, int64_t lanes) { return (n + lanes - 1) / lanes * lanes; }

// row[j] = factor * sum_d a[d] * mt[d * stride + j] for every j < stride, accumulated in
// registers one vector of columns at a time (stride is a multiple of the lanes).
template <typename T, int64_t D>
inline void row_times(const T* __restrict__ a, const T* __restrict__ mt, int64_t stride,
                      T* __restrict__ row, T factor) {
  constexpr int64_t L = kLanes<T>;
  for (int64_t j0 = 0; j0 < stride; j0 += L) {
    T part[L] = {};
    for (int64_t d = 0; d < D; ++d) {
      const T ad = a[d];
      const T* __restrict__ col = mt + d * stride + j0;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) part[l] += ad * col[l];
    }
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) row[j0 + l] = part[l] * factor;
  }
}

// Sizes and strides of one call, in elements.
struct Layout {
  int64_t cells, tokens, heads, head_dim;
  int64_t token_stride;  // between consecutive tokens of the packed input (3 * width)
  int64_t cell_stride;   // between consecutive cells of the packed input
  int64_t width;         // heads * head_dim, the row length of the output
};

template <typename T, int64_t D>
void forward_kernel(const T* qkv, T* out, T* lse, const Layout& s, T scale) {
  const int64_t t_n = s.tokens, d_n = D, problems = s.cells * s.heads;
  at::parallel_for(0, problems, 1, [&](int64_t begin, int64_t end) {
    const int64_t t_pad = padded(t_n, kLanes<T>);
    std::vector<T> keys_t(d_n * t_pad, T(0)), values(t_n * d_n), row(t_pad);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t cell = b / s.heads, head = b % s.heads;
      const T* base = qkv + cell * s.cell_stride + head * d_n;
      const T* q = base;
      const T* k = base + s.width;
      const T* v = base + 2 * s.width;
      for (int64_t j = 0; j < t_n; ++j) {
        for (int64_t d = 0; d < d_n; ++d) {
          keys_t[d * t_pad + j] = k[j * s.token_stride + d];
          values[j * d_n + d] = v[j * s.token_stride + d];
        }
      }
      for (int64_t i = 0; i < t_n; ++i) {
        row_times<T, D>(q + i * s.token_stride, keys_t.data(), t_pad, row.data(), scale);
        T top = row[0];
#pragma omp simd reduction(max : top)
        for (int64_t j = 1; j < t_n; ++j) top = std::max(top, row[j]);
#pragma omp simd
        for (int64_t j = 0; j < t_n; ++j) row[j] = exp_nonpositive(row[j] - top);
        T total = 0;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < t_n; ++j) total += row[j];
        const T inv = T(1) / total;
        lse[b * t_n + i] = top + std::log(total);
        T sum[D] = {};  // in registers: the head size is a compile-time constant
        for (int64_t j = 0; j < t_n; ++j) {
          const T p = row[j] * inv;
          const T* __restrict__ vj = values.data() + j * d_n;
#pragma omp simd
          for (int64_t d = 0; d < d_n; ++d) sum[d] += p * vj[d];
        }
        T* __restrict__ oi = out + (cell * t_n + i) * s.width + head * d_n;
        for (int64_t d = 0; d < d_n; ++d) oi[d] = sum[d];
      }
    }
  });
}

template <typename T, int64_t D>
void backward_kernel(const T* grad_out, const T* qkv, const T* lse, T* grad_qkv,
                     const Layout& s, T scale) {
  const int64_t t_n = s.tokens, d_n = D, problems = s.cells * s.heads;
  at::parallel_for(0, problems, 1, [&](int64_t begin, int64_t end) {
    const int64_t t_pad = padded(t_n, kLanes<T>);
    std::vector<T> queries(t_n * d_n), keys(t_n * d_n), values_t(d_n * t_pad, T(0));
    std::vector<T> keys_t(d_n * t_pad, T(0)), grad_k(t_n * d_n), grad_v(t_n * d_n);
    std::vector<T> row(t_pad), weights(t_pad);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t cell = b / s.heads, head = b % s.heads;
      const int64_t offset = cell * s.cell_stride + head * d_n;
      const T* base = qkv + offset;
      for (int64_t j = 0; j < t_n; ++j) {
        for (int64_t d = 0; d < d_n; ++d) {
          queries[j * d_n + d] = base[j * s.token_stride + d];
          keys[j * d_n + d] = keys_t[d * t_pad + j] = base[j * s.token_stride + s.width + d];
          values_t[d * t_pad + j] = base[j * s.token_stride + 2 * s.width + d];
        }
      }
      std::fill(grad_k.begin(), grad_k.end(), T(0));
      std::fill(grad_v.begin(), grad_v.end(), T(0));
      T* gq = grad_qkv + offset;
      for (int64_t i = 0; i < t_n; ++i) {
        const T* __restrict__ go = grad_out + (cell * t_n + i) * s.width + head * d_n;
        // the weights of row i again, from the scores and the saved log-sum-exp
        T* __restrict__ wi = weights.data();
        row_times<T, D>(queries.data() + i * d_n, keys_t.data(), t_pad, wi, scale);
        const T row_lse = lse[b * t_n + i];
#pragma omp simd
        for (int64_t j = 0; j < t_n; ++j) wi[j] = exp_nonpositive(wi[j] - row_lse);
        // gradient of the weights of row i: go . v_j for every key j
        row_times<T, D>(go, values_t.data(), t_pad, row.data(), T(1));
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < t_n; ++j) dot += wi[j] * row[j];
        // through the softmax (and the scale) to the scores
        for (int64_t j = 0; j < t_n; ++j) row[j] = wi[j] * (row[j] - dot) * scale;
        T sum[D] = {};
        const T* __restrict__ qi = queries.data() + i * d_n;
        for (int64_t j = 0; j < t_n; ++j) {
          const T g = row[j], p = wi[j];
          const T* __restrict__ kj = keys.data() + j * d_n;
          T* __restrict__ gkj = grad_k.data() + j * d_n;
          T* __restrict__ gvj = grad_v.data() + j * d_n;
#pragma omp simd
          for (int64_t d = 0; d < d_n; ++d) {
            sum[d] += g * kj[d];
            gkj[d] += g * qi[d];
            gvj[d] += p * go[d];
          }
        }
        T* __restrict__ gqi = gq + i * s.token_stride;
        for (int64_t d = 0; d < d_n; ++d) gqi[d] = sum[d];
      }
      for (int64_t j = 0; j < t_n; ++j) {
        T* gkj = gq + j * s.token_stride + s.width;
        T* gvj = gq + j * s.token_stride + 2 * s.width;
        for (int64_t d = 0; d < d_n; ++d) {
          gkj[d] = grad_k[j * d_n + d];
          gvj[d] = grad_v[j * d_n + d];
        }
      }
    }
  });
}

Layout layout_of(const torch::Tensor& qkv, int64_t heads) {
  TORCH_CHECK(qkv.dim() == 3, "packed projection must be (cells, tokens, 3 * width)");
  TORCH_CHECK(qkv.is_contiguous(), "packed projection must be contiguous");
  const int64_t width = qkv.size(2) / 3;
  TORCH_CHECK(width * 3 == qkv.size(2) && width % heads == 0,
              "the width must be three times a multiple of the number of heads");
  return Layout{qkv.size(0), qkv.size(1), heads, width / heads, 3 * width,
                qkv.size(1) * 3 * width, width};
}

std::vector<torch::Tensor> attention_forward(const torch::Tensor& qkv, int64_t heads,
                                             double scale) {
  const Layout s = layout_of(qkv, heads);
  auto out = torch::empty({s.cells, s.tokens, s.width}, qkv.options());
  auto lse = torch::empty({s.cells * s.heads, s.tokens}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "fused_attention_forward", [&] {
    const auto run = [&](auto kernel) {
      kernel(qkv.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), s,
             static_cast<scalar_t>(scale));
    };
    switch (s.head_dim) {
      case 4: run(forward_kernel<scalar_t, 4>); break;
      case 8: run(forward_kernel<scalar_t, 8>); break;
      default: TORCH_CHECK(false, "head size must be 4 or 8");
    }
  });
  return {out, lse};
}

torch::Tensor attention_backward(const torch::Tensor& grad_out, const torch::Tensor& qkv,
                                 const torch::Tensor& lse, int64_t heads, double scale) {
  const Layout s = layout_of(qkv, heads);
  auto grad = grad_out.contiguous();
  TORCH_CHECK(grad.sizes() == torch::IntArrayRef({s.cells, s.tokens, s.width}),
              "gradient of the output has the wrong shape");
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == s.cells * s.heads * s.tokens,
              "saved log-sum-exp has the wrong shape");
  auto grad_qkv = torch::empty_like(qkv);
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "fused_attention_backward", [&] {
    const auto run = [&](auto kernel) {
      kernel(grad.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
             grad_qkv.data_ptr<scalar_t>(), s, static_cast<scalar_t>(scale));
    };
    switch (s.head_dim) {
      case 4: run(backward_kernel<scalar_t, 4>); break;
      case 8: run(backward_kernel<scalar_t, 8>); break;
      default: TORCH_CHECK(false, "head size must be 4 or 8");
    }
  });
  return grad_qkv;
}

void check_bias_gelu(const torch::Tensor& h, const torch::Tensor& bias) {
  TORCH_CHECK(h.is_contiguous() && h.dim() >= 1, "the product must be contiguous");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == h.size(-1) && bias.is_contiguous() &&
                  bias.scalar_type() == h.scalar_type(),
              "the bias must be a vector of the product's width and dtype");
}

torch::Tensor bias_gelu_forward(const torch::Tensor& h, const torch::Tensor& bias) {
  check_bias_gelu(h, bias);
  auto out = torch::empty_like(h);
  const int64_t width = h.size(-1), rows = width ? h.numel() / width : 0;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "bias_gelu_forward", [&] {
    bias_gelu_forward_kernel<scalar_t>(h.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                                       out.data_ptr<scalar_t>(), rows, width);
  });
  return out;
}

std::vector<torch::Tensor> bias_gelu_backward(const torch::Tensor& grad_out,
                                              const torch::Tensor& h,
                                              const torch::Tensor& bias) {
  check_bias_gelu(h, bias);
  auto grad = grad_out.contiguous();
  TORCH_CHECK(grad.sizes() == h.sizes(), "gradient of the output has the wrong shape");
  auto grad_h = torch::empty_like(h);
  auto grad_bias = torch::empty_like(bias);
  const int64_t width = h.size(-1), rows = width ? h.numel() / width : 0;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "bias_gelu_backward", [&] {
    bias_gelu_backward_kernel<scalar_t>(grad.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                                        bias.data_ptr<scalar_t>(), grad_h.data_ptr<scalar_t>(),
                                        grad_bias.data_ptr<scalar_t>(), rows, width);
  });
  return {grad_h, grad_bias};
}

torch::Tensor dropout_apply(const torch::Tensor& x, const torch::Tensor& bits, int64_t threshold,
                            double scale) {
  auto input = x.contiguous();
  TORCH_CHECK(bits.scalar_type() == torch::kInt64 && bits.is_contiguous() &&
                  bits.numel() * 4 >= input.numel(),
              "dropout needs one random 64-bit integer per four elements");
  TORCH_CHECK(threshold >= -32768 && threshold <= 32767, "dropout threshold out of range");
  auto out = torch::empty_like(input);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dropout_apply", [&] {
    dropout_kernel<scalar_t>(input.data_ptr<scalar_t>(),
                             reinterpret_cast<const int16_t*>(bits.data_ptr<int64_t>()),
                             out.data_ptr<scalar_t>(), input.numel(),
                             static_cast<int16_t>(threshold), static_cast<scalar_t>(scale));
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_forward", &attention_forward, "fused attention, forward");
  m.def("attention_backward", &attention_backward, "fused attention, backward");
  m.def("bias_gelu_forward", &bias_gelu_forward, "gelu(h + bias)");
  m.def("bias_gelu_backward", &bias_gelu_backward, "gradients of gelu(h + bias)");
  m.def("dropout_apply", &dropout_apply, "x * (16-bit chunk >= threshold ? scale : 0)");
}

// Fused CPU kernels of TranscriptFormer's encoder layers, compiled on first use.
//
// 1. Softmax self-attention of short sequences with narrow heads.
//    The input is the packed projection of a pre-norm encoder layer, laid out as
//    (cells, tokens, 3, heads, head_dim): queries, keys and values of every head side by
//    side, exactly as F.linear(x, in_proj_weight) returns them. The heads of a cell are
//    computed together, one head per vector lane (in groups of eight), so that the
//    products, the softmax and the weighted sums of a few dozen tokens run in one pass
//    over data that fits in the L1 cache, with whole vectors as accumulators and no
//    reduction across lanes, instead of as batched GEMMs over thousands of tiny matrices
//    with the scores written to memory in between. The output is (cells, tokens,
//    heads * head_dim), ready for the output projection; the gradient of the packed
//    input is written in the input's layout. Only the log-sum-exp of every row of scores
//    is saved for the backward pass, which recomputes the weights: cheaper than writing
//    and reading back cells * heads * tokens^2 weights.
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
#include <ATen/OpMathType.h>
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
// for exp(r) (the Cephes coefficients): relative error about 2e-7. Arguments below -75
// give exactly 0 (exp(-75) is 3e-33): results of that size, multiplied on, would
// become subnormal numbers, which many CPUs compute in slow microcode, in this kernel
// and in every product that reads its output.
inline float exp_nonpositive(float x) {
  const bool negligible = x < -75.0f;
  x = negligible ? -75.0f : x;
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
  return negligible ? 0.0f : p * two_n;
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

// Sizes and strides of one call, in elements.
struct Layout {
  int64_t cells, tokens, heads, head_dim;
  int64_t token_stride;  // between consecutive tokens of the packed input (3 * width)
  int64_t cell_stride;   // between consecutive cells of the packed input
  int64_t width;         // heads * head_dim, the row length of the output
};

// Heads computed side by side, one per vector lane: every step of the attention of one
// head (scores, softmax, weighted sums) is the same step for the other heads of the cell,
// so with the heads in the lanes the softmax needs no reduction across lanes and every
// accumulator is a whole vector. A cell with fewer heads pads the group with zeros.
constexpr int64_t kHeadGroup = 8;

// The attention kernel reads bfloat16 as its 16 bits (uint16_t) and converts them with
// plain integer arithmetic, inlined: widening shifts the bits up, narrowing rounds to
// the nearest even value and keeps NaN a NaN, as PyTorch does.
inline float widen(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}
inline float widen(float value) { return value; }
inline double widen(double value) { return value; }

inline void narrow(float value, uint16_t& out) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  out = value != value ? static_cast<uint16_t>(0x7fc0) : static_cast<uint16_t>(rounded);
}
inline void narrow(float value, float& out) { out = value; }
inline void narrow(double value, double& out) { out = value; }

// The element type a kernel sees for a tensor of scalar_t.
template <typename scalar_t>
struct Storage { using type = scalar_t; };
template <>
struct Storage<at::BFloat16> { using type = uint16_t; };

template <typename scalar_t>
using storage_t = typename Storage<scalar_t>::type;

template <typename scalar_t>
storage_t<scalar_t>* elements(const torch::Tensor& t) {
  return reinterpret_cast<storage_t<scalar_t>*>(t.data_ptr<scalar_t>());
}

// One group of heads of one cell, transposed from (token, head, dim) to
// (token, dim, head) and converted from the storage type S to the compute type T: src
// points at the first head of the group in token 0.
template <typename S, typename T, int64_t D>
inline void gather_group(const S* src, int64_t token_stride, int64_t tokens, int64_t in_group,
                         T* __restrict__ dst) {
  constexpr int64_t G = kHeadGroup;
  for (int64_t j = 0; j < tokens; ++j) {
    const S* row = src + j * token_stride;
    T* out = dst + j * D * G;
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t d = 0; d < D; ++d) {
        out[d * G + g] = g < in_group ? widen(row[g * D + d]) : T(0);
      }
    }
  }
}

// The inverse of gather_group for the heads that exist.
template <typename S, typename T, int64_t D>
inline void scatter_group(const T* __restrict__ src, int64_t tokens, int64_t in_group,
                          S* dst, int64_t token_stride) {
  constexpr int64_t G = kHeadGroup;
  for (int64_t j = 0; j < tokens; ++j) {
    const T* in = src + j * D * G;
    S* row = dst + j * token_stride;
    for (int64_t g = 0; g < in_group; ++g) {
      for (int64_t d = 0; d < D; ++d) narrow(in[d * G + g], row[g * D + d]);
    }
  }
}

// out[g] = factor * sum_d a[d * G + g] * b[d * G + g]: one score per head of the group.
template <typename T, int64_t D>
inline void head_dots(const T* __restrict__ a, const T* __restrict__ b, T factor,
                      T* __restrict__ out) {
  constexpr int64_t G = kHeadGroup;
  T acc[G] = {};
  for (int64_t d = 0; d < D; ++d) {
#pragma omp simd
    for (int64_t g = 0; g < G; ++g) acc[g] += a[d * G + g] * b[d * G + g];
  }
#pragma omp simd
  for (int64_t g = 0; g < G; ++g) out[g] = acc[g] * factor;
}

template <typename S, typename T, int64_t D>
void forward_kernel(const S* qkv, S* out, T* lse, const Layout& s, T scale) {
  constexpr int64_t G = kHeadGroup;
  const int64_t t_n = s.tokens, groups = (s.heads + G - 1) / G;
  at::parallel_for(0, s.cells * groups, 1, [&](int64_t begin, int64_t end) {
    const int64_t block = t_n * D * G;
    std::vector<T> buffer(3 * block + t_n * G + block);
    T* q = buffer.data();
    T* k = q + block;
    T* v = k + block;
    T* weights = v + block;         // (key, head) of one query
    T* result = weights + t_n * G;  // (token, dim, head), the normalised output
    for (int64_t b = begin; b < end; ++b) {
      const int64_t cell = b / groups, h0 = (b % groups) * G;
      const int64_t in_group = std::min(G, s.heads - h0);
      const S* base = qkv + cell * s.cell_stride + h0 * D;
      gather_group<S, T, D>(base, s.token_stride, t_n, in_group, q);
      gather_group<S, T, D>(base + s.width, s.token_stride, t_n, in_group, k);
      gather_group<S, T, D>(base + 2 * s.width, s.token_stride, t_n, in_group, v);
      for (int64_t i = 0; i < t_n; ++i) {
        const T* qi = q + i * D * G;
        T top[G];
        head_dots<T, D>(qi, k, scale, weights);
#pragma omp simd
        for (int64_t g = 0; g < G; ++g) top[g] = weights[g];
        for (int64_t j = 1; j < t_n; ++j) {
          T* wj = weights + j * G;
          head_dots<T, D>(qi, k + j * D * G, scale, wj);
#pragma omp simd
          for (int64_t g = 0; g < G; ++g) top[g] = std::max(top[g], wj[g]);
        }
        T total[G] = {};
        T acc[D * G] = {};
        for (int64_t j = 0; j < t_n; ++j) {
          T* wj = weights + j * G;
          const T* vj = v + j * D * G;
#pragma omp simd
          for (int64_t g = 0; g < G; ++g) {
            wj[g] = exp_nonpositive(wj[g] - top[g]);
            total[g] += wj[g];
          }
          for (int64_t d = 0; d < D; ++d) {
#pragma omp simd
            for (int64_t g = 0; g < G; ++g) acc[d * G + g] += wj[g] * vj[d * G + g];
          }
        }
        T inv[G];
        for (int64_t g = 0; g < G; ++g) inv[g] = T(1) / total[g];
        T* ri = result + i * D * G;
        for (int64_t d = 0; d < D; ++d) {
#pragma omp simd
          for (int64_t g = 0; g < G; ++g) ri[d * G + g] = acc[d * G + g] * inv[g];
        }
        for (int64_t g = 0; g < in_group; ++g) {
          lse[(cell * s.heads + h0 + g) * t_n + i] = top[g] + std::log(total[g]);
        }
      }
      scatter_group<S, T, D>(result, t_n, in_group, out + cell * t_n * s.width + h0 * D,
                             s.width);
    }
  });
}

template <typename S, typename T, int64_t D>
void backward_kernel(const S* grad_out, const S* qkv, const T* lse, S* grad_qkv,
                     const Layout& s, T scale) {
  constexpr int64_t G = kHeadGroup;
  const int64_t t_n = s.tokens, groups = (s.heads + G - 1) / G;
  at::parallel_for(0, s.cells * groups, 1, [&](int64_t begin, int64_t end) {
    const int64_t block = t_n * D * G, square = t_n * t_n * G;
    std::vector<T> buffer(5 * block + t_n * G + 2 * square);
    T* q = buffer.data();
    T* k = q + block;
    T* v = k + block;
    T* go = v + block;               // gradient of the output, (token, dim, head)
    T* grad = go + block;            // gradient of q, k or v of the group, in turn
    T* row_lse = grad + block;       // (query, head)
    T* weights = row_lse + t_n * G;  // (query, key, head)
    T* grad_s = weights + square;    // gradient of the scores, (query, key, head)
    for (int64_t b = begin; b < end; ++b) {
      const int64_t cell = b / groups, h0 = (b % groups) * G;
      const int64_t in_group = std::min(G, s.heads - h0);
      const int64_t offset = cell * s.cell_stride + h0 * D;
      gather_group<S, T, D>(qkv + offset, s.token_stride, t_n, in_group, q);
      gather_group<S, T, D>(qkv + offset + s.width, s.token_stride, t_n, in_group, k);
      gather_group<S, T, D>(qkv + offset + 2 * s.width, s.token_stride, t_n, in_group, v);
      gather_group<S, T, D>(grad_out + cell * t_n * s.width + h0 * D, s.width, t_n, in_group,
                            go);
      for (int64_t i = 0; i < t_n; ++i) {
        for (int64_t g = 0; g < G; ++g) {
          row_lse[i * G + g] = g < in_group ? lse[(cell * s.heads + h0 + g) * t_n + i] : T(0);
        }
      }
      // rows: the weights again (from the scores and the saved log-sum-exp; padded heads
      // get weight 1 and gradient 0), the gradient of the scores, and that of the queries
      S* dst = grad_qkv + offset;
      for (int64_t i = 0; i < t_n; ++i) {
        const T* qi = q + i * D * G;
        const T* goi = go + i * D * G;
        const T* li = row_lse + i * G;
        T* wi = weights + i * t_n * G;
        T* si = grad_s + i * t_n * G;
        T dot[G] = {};
        for (int64_t j = 0; j < t_n; ++j) {
          T* wij = wi + j * G;
          T* sij = si + j * G;
          head_dots<T, D>(qi, k + j * D * G, scale, wij);
          head_dots<T, D>(goi, v + j * D * G, T(1), sij);
#pragma omp simd
          for (int64_t g = 0; g < G; ++g) {
            wij[g] = exp_nonpositive(std::min(wij[g] - li[g], T(0)));
            dot[g] += wij[g] * sij[g];
          }
        }
        T acc[D * G] = {};
        for (int64_t j = 0; j < t_n; ++j) {
          T* sij = si + j * G;
          const T* kj = k + j * D * G;
#pragma omp simd
          for (int64_t g = 0; g < G; ++g) sij[g] = wi[j * G + g] * (sij[g] - dot[g]) * scale;
          for (int64_t d = 0; d < D; ++d) {
#pragma omp simd
            for (int64_t g = 0; g < G; ++g) acc[d * G + g] += sij[g] * kj[d * G + g];
          }
        }
        T* gi = grad + i * D * G;
        for (int64_t d = 0; d < D * G; ++d) gi[d] = acc[d];
      }
      scatter_group<S, T, D>(grad, t_n, in_group, dst, s.token_stride);
      // columns: the gradients of the keys and of the values
      for (int pass = 0; pass < 2; ++pass) {
        const T* coef = pass == 0 ? grad_s : weights;
        const T* rows = pass == 0 ? q : go;
        for (int64_t j = 0; j < t_n; ++j) {
          T acc[D * G] = {};
          for (int64_t i = 0; i < t_n; ++i) {
            const T* cij = coef + (i * t_n + j) * G;
            const T* ri = rows + i * D * G;
            for (int64_t d = 0; d < D; ++d) {
#pragma omp simd
              for (int64_t g = 0; g < G; ++g) acc[d * G + g] += cij[g] * ri[d * G + g];
            }
          }
          T* gj = grad + j * D * G;
          for (int64_t d = 0; d < D * G; ++d) gj[d] = acc[d];
        }
        scatter_group<S, T, D>(grad, t_n, in_group, dst + (pass + 1) * s.width, s.token_stride);
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
  auto lse = torch::empty({s.cells * s.heads, s.tokens},
                          qkv.options().dtype(at::toOpMathType(qkv.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "fused_attention_forward", [&] {
    using compute_t = at::opmath_type<scalar_t>;
    const auto run = [&](auto kernel) {
      kernel(elements<scalar_t>(qkv), elements<scalar_t>(out), lse.data_ptr<compute_t>(), s,
             static_cast<compute_t>(scale));
    };
    switch (s.head_dim) {
      case 4: run(forward_kernel<storage_t<scalar_t>, compute_t, 4>); break;
      case 8: run(forward_kernel<storage_t<scalar_t>, compute_t, 8>); break;
      default: TORCH_CHECK(false, "head size must be 4 or 8");
    }
  });
  return {out, lse};
}

torch::Tensor attention_backward(const torch::Tensor& grad_out, const torch::Tensor& qkv,
                                 const torch::Tensor& lse, int64_t heads, double scale) {
  const Layout s = layout_of(qkv, heads);
  auto grad = grad_out.to(qkv.scalar_type()).contiguous();
  TORCH_CHECK(grad.sizes() == torch::IntArrayRef({s.cells, s.tokens, s.width}),
              "gradient of the output has the wrong shape");
  TORCH_CHECK(lse.is_contiguous() && lse.numel() == s.cells * s.heads * s.tokens &&
                  lse.scalar_type() == at::toOpMathType(qkv.scalar_type()),
              "saved log-sum-exp has the wrong shape or dtype");
  auto grad_qkv = torch::empty_like(qkv);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "fused_attention_backward", [&] {
    using compute_t = at::opmath_type<scalar_t>;
    const auto run = [&](auto kernel) {
      kernel(elements<scalar_t>(grad), elements<scalar_t>(qkv), lse.data_ptr<compute_t>(),
             elements<scalar_t>(grad_qkv), s, static_cast<compute_t>(scale));
    };
    switch (s.head_dim) {
      case 4: run(backward_kernel<storage_t<scalar_t>, compute_t, 4>); break;
      case 8: run(backward_kernel<storage_t<scalar_t>, compute_t, 8>); break;
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

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
// 2. Bias and GELU of the feed-forward block, gelu(h + bias), in one pass that also
//    writes its derivative, and its backward pass (the gradient of h, a product with
//    the saved derivative, and of the bias) in another, instead of the bias copied into
//    the product's output, the GELU, its gradient (a second evaluation of erf) and the
//    bias reduction as four passes over the widest activation of the layer. Also for
//    bfloat16 products under autocast, computed in float32.
// 3. Dropout from random 16-bit chunks: x * (chunk >= threshold ? scale : 0) in one
//    pass, for the forward (on the input) and the backward (on the gradient), so that
//    no boolean or floating-point mask is built; the random bits are the only state.
//    The dropout of an encoder layer's residual branch also adds the residual in the
//    same pass, reading a bfloat16 branch (under autocast) beside the float32 stream.
// 4. The negative binomial log-likelihood of counts, optionally zero-inflated, with its
//    partial derivatives by the log mean, the log inverse dispersion and the
//    zero-inflation logits, in two passes: one over all elements, vectorised, for the
//    terms that do not involve the gamma function (all of them where the count is zero,
//    which most are), and one over the non-zero counts for lgamma(x + theta) -
//    lgamma(theta) - lgamma(x + 1) and its derivative. Small integer counts take the
//    exact finite forms of these (a product of x terms and a sum of x fractions) in
//    double precision; other counts take lgamma and digamma in double precision, where
//    the direct differences keep float32 accuracy over the whole range of theta. The
//    backward pass is then a product with the saved derivatives, instead of the dozens
//    of elementwise passes autograd records for the same formula.
//
// Work is split into pieces of fixed size, each computed by one thread in a fixed
// order, so results do not depend on the number of threads. The pieces run on torch's
// intra-op threads (at::parallel_for) where the build has OpenMP, as on Linux.

#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

// The small helpers below are called inside loops that the compiler vectorises, which
// it does only where they are inlined. GCC's inliner weighs each call against the size
// of the whole file and may decline as the file grows (the likelihood kernel then runs
// about three times slower), so inlining is required.
#if defined(__GNUC__)
#define STEP_INLINE inline __attribute__((always_inline))
#else
#define STEP_INLINE inline
#endif

// The vectorised loops live in small functions that take their pointers and scalars as
// arguments, called from the lambdas that at::parallel_for runs. Inside a lambda, a
// variable captured by reference is read through the closure, which a store through an
// output pointer might overwrite as far as the compiler knows; built with OpenMP (where
// the lambda is also called from a parallel region and not inlined into its caller),
// GCC then leaves such loops scalar. Arguments are read once, before the loop.

// exp(x) for x <= 0 (softmax arguments after subtracting the row maximum, minus a
// square), written as plain arithmetic so that the compiler vectorises the loops it is
// used in. Range reduction x = n ln2 + r with |r| <= ln2 / 2 and a degree-6 polynomial
// for exp(r) (the Cephes coefficients): relative error about 2e-7. Arguments below -75
// give exactly 0 (exp(-75) is 3e-33): results of that size, multiplied on, would
// become subnormal numbers, which many CPUs compute in slow microcode, in this kernel
// and in every product that reads its output.
STEP_INLINE float exp_nonpositive(float x) {
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

STEP_INLINE double exp_nonpositive(double x) { return std::exp(x); }

// The standard normal distribution function Phi(u) and density phi(u), from which
// GELU(u) = u Phi(u) and GELU'(u) = Phi(u) + u phi(u). erf is evaluated with formula
// 7.1.26 of Abramowitz and Stegun (absolute error below 1.5e-7, sharing exp(-u^2 / 2)
// with the density); the GELU then differs from PyTorch's by at most 4e-7 (at |u| = 8).
STEP_INLINE void normal_cdf_pdf(float u, float& cdf, float& pdf) {
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

STEP_INLINE void normal_cdf_pdf(double u, double& cdf, double& pdf) {
  cdf = 0.5 * std::erfc(-u * 0.70710678118654752);
  pdf = std::exp(-0.5 * u * u) * 0.39894228040143268;
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

// The kernels read bfloat16 as its 16 bits (uint16_t) and convert them with
// plain integer arithmetic, inlined: widening shifts the bits up, narrowing rounds to
// the nearest even value and keeps NaN a NaN, as PyTorch does.
STEP_INLINE float widen(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}
STEP_INLINE float widen(float value) { return value; }
STEP_INLINE double widen(double value) { return value; }

STEP_INLINE void narrow(float value, uint16_t& out) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  out = value != value ? static_cast<uint16_t>(0x7fc0) : static_cast<uint16_t>(rounded);
}
STEP_INLINE void narrow(float value, float& out) { out = value; }
STEP_INLINE void narrow(double value, double& out) { out = value; }

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

// Elements of one piece of work of the dropout kernels.
constexpr int64_t kDropoutChunk = 1 << 14;

// out = x * (chunk >= threshold ? scale : 0) in the compute type T (float32 for bfloat16
// input or output), stored as O: the same values as multiplying in float32 and then
// rounding, as PyTorch's conversion does.
template <typename I, typename O, typename T>
STEP_INLINE void dropout_range(const I* __restrict__ x, const int16_t* __restrict__ bits,
                               O* __restrict__ out, int64_t begin, int64_t end,
                               int16_t threshold, T scale) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    narrow(widen(x[i]) * (bits[i] >= threshold ? scale : T(0)), out[i]);
  }
}

template <typename I, typename O, typename T>
void dropout_kernel(const I* x, const int16_t* bits, O* out, int64_t n, int16_t threshold,
                    T scale) {
  at::parallel_for(0, (n + kDropoutChunk - 1) / kDropoutChunk, 1, [&](int64_t begin, int64_t end) {
    dropout_range(x, bits, out, begin * kDropoutChunk, std::min(n, end * kDropoutChunk),
                  threshold, scale);
  });
}

// Elements of one block of the residual dropout: the products of a block stay in L1
// between its two loops.
constexpr int64_t kResidualBlock = 512;

// out = residual + x * (chunk >= threshold ? scale : 0), x of type I (T or bfloat16).
// The products are written out before the sums in a second loop, so that the compiler
// cannot contract them into fused multiply-adds: the result is then, bit for bit, the
// dropout followed by the addition.
template <typename I, typename T>
STEP_INLINE void dropout_add_block(const T* __restrict__ residual, const I* __restrict__ x,
                                   const int16_t* __restrict__ bits, T* __restrict__ out,
                                   int64_t begin, int64_t end, int16_t threshold, T scale) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    out[i] = widen(x[i]) * (bits[i] >= threshold ? scale : T(0));
  }
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) out[i] = residual[i] + out[i];
}

template <typename I, typename T>
void dropout_add_kernel(const T* residual, const I* x, const int16_t* bits, T* out, int64_t n,
                        int16_t threshold, T scale) {
  at::parallel_for(0, (n + kDropoutChunk - 1) / kDropoutChunk, 1, [&](int64_t begin, int64_t end) {
    const int64_t stop = std::min(n, end * kDropoutChunk);
    for (int64_t start = begin * kDropoutChunk; start < stop; start += kResidualBlock) {
      dropout_add_block(residual, x, bits, out, start, std::min(stop, start + kResidualBlock),
                        threshold, scale);
    }
  });
}

// Rows of one piece of work of the GELU kernels.
constexpr int64_t kGeluRows = 64;

// gelu(h + bias) for one row and, with kDerivative, its derivative by h. derivative may
// be h itself (each element is read before it is overwritten), so neither is restrict.
template <bool kDerivative, typename S, typename T>
STEP_INLINE void bias_gelu_row(const S* h, const T* __restrict__ bias, S* __restrict__ out,
                               S* derivative, int64_t width) {
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) {
    const T u = widen(h[j]) + bias[j];
    T cdf, pdf;
    normal_cdf_pdf(u, cdf, pdf);
    narrow(u * cdf, out[j]);
    if constexpr (kDerivative) narrow(cdf + u * pdf, derivative[j]);
  }
}

// gelu(h + bias) and, where derivative is not null, its derivative by h, from h of type S
// (T, or bfloat16 under autocast) and a bias of the compute type T; the results stored
// as S. Keeping the derivative makes the backward pass one product instead of a second
// evaluation of erf.
template <typename S, typename T>
void bias_gelu_forward_kernel(const S* h, const T* bias, S* out, S* derivative, int64_t rows,
                              int64_t width) {
  at::parallel_for(0, (rows + kGeluRows - 1) / kGeluRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin * kGeluRows; r < std::min(rows, end * kGeluRows); ++r) {
      if (derivative == nullptr) {
        bias_gelu_row<false>(h + r * width, bias, out + r * width, derivative, width);
      } else {
        bias_gelu_row<true>(h + r * width, bias, out + r * width, derivative + r * width,
                            width);
      }
    }
  });
}

// The gradient of h (grad times the saved derivative, stored as S) and of the bias (its
// sum over the rows in T, per piece of rows and then over the pieces in order, so that it
// does not depend on the number of threads).
template <typename S, typename T>
STEP_INLINE void bias_gelu_backward_row(const S* __restrict__ grad,
                                        const S* __restrict__ derivative,
                                        S* __restrict__ grad_h, T* __restrict__ sums,
                                        int64_t width) {
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) {
    const T g = widen(grad[j]) * widen(derivative[j]);
    narrow(g, grad_h[j]);
    sums[j] += g;
  }
}

template <typename S, typename T>
void bias_gelu_backward_kernel(const S* grad, const S* derivative, S* grad_h, T* grad_bias,
                               int64_t rows, int64_t width) {
  const int64_t pieces = (rows + kGeluRows - 1) / kGeluRows;
  std::vector<T> partial(pieces * width, T(0));
  T* const partial_sums = partial.data();
  at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
    for (int64_t piece = begin; piece < end; ++piece) {
      for (int64_t r = piece * kGeluRows; r < std::min(rows, (piece + 1) * kGeluRows); ++r) {
        bias_gelu_backward_row(grad + r * width, derivative + r * width, grad_h + r * width,
                               partial_sums + piece * width, width);
      }
    }
  });
  std::fill(grad_bias, grad_bias + width, T(0));
  for (int64_t piece = 0; piece < pieces; ++piece) {
    const T* sums = partial.data() + piece * width;
    for (int64_t j = 0; j < width; ++j) grad_bias[j] += sums[j];
  }
}

// Rows of one piece of work of the LayerNorm kernels.
constexpr int64_t kNormRows = 64;

// LayerNorm of rows of x (T: float32 or float64) with the result stored as O (T, or
// bfloat16 under autocast, where the next operation is a bfloat16 product). The mean and
// the reciprocal standard deviation of every row are kept for the backward pass.
template <typename T, typename O>
STEP_INLINE void layer_norm_row(const T* __restrict__ x, const T* __restrict__ gamma,
                                const T* __restrict__ beta, O* __restrict__ out,
                                T* __restrict__ mean, T* __restrict__ rstd, int64_t width,
                                T eps) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < width; ++j) sum += x[j];
  const T m = sum / width;
  T squares = 0;
#pragma omp simd reduction(+ : squares)
  for (int64_t j = 0; j < width; ++j) squares += (x[j] - m) * (x[j] - m);
  const T s = T(1) / std::sqrt(squares / width + eps);
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) narrow((x[j] - m) * s * gamma[j] + beta[j], out[j]);
  *mean = m;
  *rstd = s;
}

template <typename T, typename O>
void layer_norm_forward_kernel(const T* x, const T* gamma, const T* beta, O* out, T* mean,
                               T* rstd, int64_t rows, int64_t width, T eps) {
  at::parallel_for(0, (rows + kNormRows - 1) / kNormRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin * kNormRows; r < std::min(rows, end * kNormRows); ++r) {
      layer_norm_row(x + r * width, gamma, beta, out + r * width, mean + r, rstd + r, width,
                     eps);
    }
  });
}

// The gradient of one row's input, with its terms of the weight and bias gradients added
// to sum_gamma and sum_beta.
template <typename T, typename O>
STEP_INLINE void layer_norm_backward_row(const O* __restrict__ grad, const T* __restrict__ x,
                                         T m, T s, const T* __restrict__ gamma,
                                         T* __restrict__ grad_x, T* __restrict__ sum_gamma,
                                         T* __restrict__ sum_beta, int64_t width) {
  T a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t j = 0; j < width; ++j) {
    const T g = widen(grad[j]);
    const T xhat = (x[j] - m) * s;
    a += g * gamma[j];
    b += g * gamma[j] * xhat;
    sum_gamma[j] += g * xhat;
    sum_beta[j] += g;
  }
  a /= width;
  b /= width;
#pragma omp simd
  for (int64_t j = 0; j < width; ++j) {
    const T xhat = (x[j] - m) * s;
    grad_x[j] = s * (widen(grad[j]) * gamma[j] - a - xhat * b);
  }
}

// Gradients of the input, the weight and the bias from the gradient of the output (of
// type O). The weight and bias gradients are summed per piece of rows and then over the
// pieces in order, so they do not depend on the number of threads.
template <typename T, typename O>
void layer_norm_backward_kernel(const O* grad, const T* x, const T* mean, const T* rstd,
                                const T* gamma, T* grad_x, T* grad_gamma, T* grad_beta,
                                int64_t rows, int64_t width) {
  const int64_t pieces = (rows + kNormRows - 1) / kNormRows;
  std::vector<T> partial(2 * pieces * width, T(0));
  T* const partial_sums = partial.data();
  at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
    for (int64_t piece = begin; piece < end; ++piece) {
      T* sum_gamma = partial_sums + 2 * piece * width;
      for (int64_t r = piece * kNormRows; r < std::min(rows, (piece + 1) * kNormRows); ++r) {
        layer_norm_backward_row(grad + r * width, x + r * width, mean[r], rstd[r], gamma,
                                grad_x + r * width, sum_gamma, sum_gamma + width, width);
      }
    }
  });
  std::fill(grad_gamma, grad_gamma + width, T(0));
  std::fill(grad_beta, grad_beta + width, T(0));
  for (int64_t piece = 0; piece < pieces; ++piece) {
    const T* sums = partial.data() + 2 * piece * width;
    for (int64_t j = 0; j < width; ++j) {
      grad_gamma[j] += sums[j];
      grad_beta[j] += sums[width + j];
    }
  }
}

// Whole groups of eight heads of eight dimensions move between the projection's layout
// and the kernel's as 8 x 8 transposes in registers (AVX; bfloat16 also needs AVX2 to
// widen), instead of one value at a time; elsewhere the loops below do it.
#if defined(__AVX__)
static_assert(kHeadGroup == 8, "the block moves transpose 8 x 8 blocks");

// Stores the transpose of the 8 x 8 block whose rows are r: out[c * 8 + i] = r[i][c].
STEP_INLINE void store_transposed(__m256 (&r)[8], float* __restrict__ out) {
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 0-3, then rows 4-7
    const __m256 a = t[4 * h], b = t[4 * h + 1], c = t[4 * h + 2], d = t[4 * h + 3];
    r[4 * h] = _mm256_shuffle_ps(a, c, _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * h + 1] = _mm256_shuffle_ps(a, c, _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * h + 2] = _mm256_shuffle_ps(b, d, _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * h + 3] = _mm256_shuffle_ps(b, d, _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + 8 * i, _mm256_permute2f128_ps(r[i], r[4 + i], 0x20));
    _mm256_storeu_ps(out + 8 * (i + 4), _mm256_permute2f128_ps(r[i], r[4 + i], 0x31));
  }
}

// out[c * 8 + r] = in[r * 8 + c] for an 8 x 8 block of rows of 8 contiguous values.
STEP_INLINE void transpose_8x8(const float* __restrict__ in, float* __restrict__ out) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + 8 * i);
  store_transposed(r, out);
}

#if defined(__AVX2__)
// The same from bfloat16 bits, widened to float32 on the way (exactly, as widen does).
STEP_INLINE void transpose_8x8(const uint16_t* __restrict__ in, float* __restrict__ out) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 8 * i));
    r[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
  store_transposed(r, out);
}
#endif
#endif

// Whether groups of storage type S move as 8 x 8 blocks (float32 compute, 8 dimensions).
template <typename S, typename T, int64_t D>
constexpr bool kBlockMoves =
    std::is_same<T, float>::value && D == 8 &&
#if defined(__AVX2__)
    (std::is_same<S, float>::value || std::is_same<S, uint16_t>::value);
#elif defined(__AVX__)
    std::is_same<S, float>::value;
#else
    false;
#endif

// One group of heads of one cell, transposed from (token, head, dim) to
// (token, dim, head) and converted from the storage type S to the compute type T: src
// points at the first head of the group in token 0.
template <typename S, typename T, int64_t D>
STEP_INLINE void gather_group(const S* src, int64_t token_stride, int64_t tokens, int64_t in_group,
                              T* __restrict__ dst) {
  constexpr int64_t G = kHeadGroup;
  if constexpr (kBlockMoves<S, T, D>) {
    if (in_group == G) {
      for (int64_t j = 0; j < tokens; ++j) transpose_8x8(src + j * token_stride, dst + j * D * G);
      return;
    }
  }
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
STEP_INLINE void scatter_group(const T* __restrict__ src, int64_t tokens, int64_t in_group,
                               S* dst, int64_t token_stride) {
  constexpr int64_t G = kHeadGroup;
  if constexpr (kBlockMoves<S, T, D>) {
    if (in_group == G) {
      for (int64_t j = 0; j < tokens; ++j) {
        S* row = dst + j * token_stride;
        if constexpr (std::is_same<S, T>::value) {
          transpose_8x8(src + j * D * G, row);
        } else {  // bfloat16: transpose in float32, then narrow the row
          T block[D * G];
          transpose_8x8(src + j * D * G, block);
#pragma omp simd
          for (int64_t e = 0; e < D * G; ++e) narrow(block[e], row[e]);
        }
      }
      return;
    }
  }
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
STEP_INLINE void head_dots(const T* __restrict__ a, const T* __restrict__ b, T factor,
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

// Keys whose scores are computed together. One score is a chain of D dependent
// multiply-adds on one accumulator; computing several keys at once gives the core
// independent chains to overlap, where one chain at a time waits on each addition.
// Every score is summed over the dimensions in the same order as by head_dots.
constexpr int64_t kKeyBlock = 4;

// out[jj * G + g] = factor * sum_d a[d * G + g] * b[(jj * D + d) * G + g] for the
// kKeyBlock keys stored one after another at b.
template <typename T, int64_t D>
STEP_INLINE void head_dots_block(const T* __restrict__ a, const T* __restrict__ b, T factor,
                                 T* __restrict__ out) {
  constexpr int64_t G = kHeadGroup, J = kKeyBlock;
  T acc[J * G] = {};
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t jj = 0; jj < J; ++jj) {
#pragma omp simd
      for (int64_t g = 0; g < G; ++g) acc[jj * G + g] += a[d * G + g] * b[(jj * D + d) * G + g];
    }
  }
#pragma omp simd
  for (int64_t e = 0; e < J * G; ++e) out[e] = acc[e] * factor;
}

// The scores of query a against all `tokens` keys at b, one row of G per key.
template <typename T, int64_t D>
STEP_INLINE void head_scores(const T* __restrict__ a, const T* __restrict__ b, int64_t tokens,
                             T factor, T* __restrict__ out) {
  constexpr int64_t G = kHeadGroup, J = kKeyBlock;
  int64_t j = 0;
  for (; j + J <= tokens; j += J) head_dots_block<T, D>(a, b + j * D * G, factor, out + j * G);
  for (; j < tokens; ++j) head_dots<T, D>(a, b + j * D * G, factor, out + j * G);
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
        head_scores<T, D>(qi, k, t_n, scale, weights);
#pragma omp simd
        for (int64_t g = 0; g < G; ++g) top[g] = weights[g];
        for (int64_t j = 1; j < t_n; ++j) {
          const T* wj = weights + j * G;
#pragma omp simd
          for (int64_t g = 0; g < G; ++g) top[g] = std::max(top[g], wj[g]);
        }
        // the exponentials of the whole row first: independent of one another, so they
        // overlap, where inside the weighted sum each waited for its own polynomial
        for (int64_t j = 0; j < t_n; ++j) {
          T* wj = weights + j * G;
#pragma omp simd
          for (int64_t g = 0; g < G; ++g) wj[g] = exp_nonpositive(wj[g] - top[g]);
        }
        T total[G] = {};
        T acc[D * G] = {};
        for (int64_t j = 0; j < t_n; ++j) {
          const T* wj = weights + j * G;
          const T* vj = v + j * D * G;
#pragma omp simd
          for (int64_t g = 0; g < G; ++g) total[g] += wj[g];
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

// The saved log-sum-exp of a group's rows, (query, head), zero for padded heads.
template <typename T>
STEP_INLINE void gather_row_lse(const T* __restrict__ lse, int64_t t_n, int64_t in_group,
                                T* __restrict__ row_lse) {
  for (int64_t i = 0; i < t_n; ++i) {
    for (int64_t g = 0; g < kHeadGroup; ++g) {
      row_lse[i * kHeadGroup + g] = g < in_group ? lse[g * t_n + i] : T(0);
    }
  }
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
      gather_row_lse(lse + (cell * s.heads + h0) * t_n, t_n, in_group, row_lse);
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
        head_scores<T, D>(qi, k, t_n, scale, wi);
        head_scores<T, D>(goi, v, t_n, T(1), si);
        for (int64_t j = 0; j < t_n; ++j) {
          T* wij = wi + j * G;
          T* sij = si + j * G;
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

// h: float32, float64 or bfloat16; the bias: a vector of h's width, of h's dtype or
// float32 for bfloat16 h (a float32 parameter under autocast).
void check_bias_gelu(const torch::Tensor& h, const torch::Tensor& bias) {
  TORCH_CHECK(h.is_contiguous() && h.dim() >= 1, "the product must be contiguous");
  const auto type = h.scalar_type();
  TORCH_CHECK(type == torch::kFloat || type == torch::kDouble || type == torch::kBFloat16,
              "bias + GELU takes float32, float64 or bfloat16");
  const auto bias_type = type == torch::kBFloat16 ? torch::kFloat : type;
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == h.size(-1) && bias.is_contiguous() &&
                  bias.scalar_type() == bias_type,
              "the bias must be a vector of the product's width and dtype (float32 for "
              "a bfloat16 product)");
}

// gelu(h + bias) and, where asked for (for the backward pass), its derivative by h, both
// of h's dtype; without it the second tensor is empty.
// With derivative_in_h the derivative is written over h (which the caller then no longer
// reads as the product), saving a buffer of h's size.
std::vector<torch::Tensor> bias_gelu_forward(const torch::Tensor& h, const torch::Tensor& bias,
                                             bool with_derivative, bool derivative_in_h) {
  check_bias_gelu(h, bias);
  auto out = torch::empty_like(h);
  auto derivative = !with_derivative  ? torch::empty({0}, h.options())
                    : derivative_in_h ? h
                                      : torch::empty_like(h);
  const int64_t width = h.size(-1), rows = width ? h.numel() / width : 0;
  if (h.scalar_type() == torch::kBFloat16) {
    bias_gelu_forward_kernel(elements<at::BFloat16>(h), bias.data_ptr<float>(),
                             elements<at::BFloat16>(out),
                             with_derivative ? elements<at::BFloat16>(derivative) : nullptr,
                             rows, width);
  } else {
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "bias_gelu_forward", [&] {
      bias_gelu_forward_kernel(h.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                               out.data_ptr<scalar_t>(),
                               with_derivative ? derivative.data_ptr<scalar_t>() : nullptr,
                               rows, width);
    });
  }
  return {out, derivative};
}

// The gradients of h (of its dtype) and of the bias (of the bias's dtype).
std::vector<torch::Tensor> bias_gelu_backward(const torch::Tensor& grad_out,
                                              const torch::Tensor& derivative,
                                              const torch::Tensor& bias) {
  check_bias_gelu(derivative, bias);
  auto grad = grad_out.to(derivative.scalar_type()).contiguous();
  TORCH_CHECK(grad.sizes() == derivative.sizes(), "gradient of the output has the wrong shape");
  auto grad_h = torch::empty_like(derivative);
  auto grad_bias = torch::empty_like(bias);
  const int64_t width = derivative.size(-1), rows = width ? derivative.numel() / width : 0;
  if (derivative.scalar_type() == torch::kBFloat16) {
    bias_gelu_backward_kernel(elements<at::BFloat16>(grad), elements<at::BFloat16>(derivative),
                              elements<at::BFloat16>(grad_h), grad_bias.data_ptr<float>(), rows,
                              width);
  } else {
    AT_DISPATCH_FLOATING_TYPES(derivative.scalar_type(), "bias_gelu_backward", [&] {
      bias_gelu_backward_kernel(grad.data_ptr<scalar_t>(), derivative.data_ptr<scalar_t>(),
                                grad_h.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>(),
                                rows, width);
    });
  }
  return {grad_h, grad_bias};
}

void check_dropout_bits(const torch::Tensor& bits, int64_t n, int64_t threshold) {
  TORCH_CHECK(bits.scalar_type() == torch::kInt64 && bits.is_contiguous() &&
                  bits.numel() * 4 >= n,
              "dropout needs one random 64-bit integer per four elements");
  TORCH_CHECK(threshold >= -32768 && threshold <= 32767, "dropout threshold out of range");
}

const int16_t* dropout_chunks(const torch::Tensor& bits) {
  return reinterpret_cast<const int16_t*>(bits.data_ptr<int64_t>());
}

// x * (chunk >= threshold ? scale : 0) written into out: of x's dtype, or bfloat16 for
// float32 x (the gradient of a bfloat16 branch of residual_dropout).
void dropout_apply(const torch::Tensor& x, const torch::Tensor& bits, int64_t threshold,
                   double scale, torch::Tensor& out) {
  auto input = x.contiguous();
  check_dropout_bits(bits, input.numel(), threshold);
  TORCH_CHECK(out.is_contiguous() && out.sizes() == input.sizes(),
              "the dropout output must be contiguous and shaped like the input");
  const auto in_type = input.scalar_type(), out_type = out.scalar_type();
  TORCH_CHECK(in_type == out_type || (in_type == torch::kFloat && out_type == torch::kBFloat16),
              "dropout writes the input's dtype, or bfloat16 from float32");
  const auto n = input.numel();
  const auto t = static_cast<int16_t>(threshold);
  const auto* chunks = dropout_chunks(bits);
  if (in_type == torch::kDouble) {
    dropout_kernel(input.data_ptr<double>(), chunks, out.data_ptr<double>(), n, t, scale);
  } else if (in_type == torch::kBFloat16) {
    dropout_kernel(elements<at::BFloat16>(input), chunks, elements<at::BFloat16>(out), n, t,
                   static_cast<float>(scale));
  } else if (out_type == torch::kBFloat16) {
    dropout_kernel(input.data_ptr<float>(), chunks, elements<at::BFloat16>(out), n, t,
                   static_cast<float>(scale));
  } else {
    TORCH_CHECK(in_type == torch::kFloat, "dropout takes float32, float64 or bfloat16");
    dropout_kernel(input.data_ptr<float>(), chunks, out.data_ptr<float>(), n, t,
                   static_cast<float>(scale));
  }
}

// residual + x * (chunk >= threshold ? scale : 0), in the residual's dtype (float32 or
// float64); x has that dtype too, or is bfloat16 under a float32 residual.
torch::Tensor dropout_add(const torch::Tensor& residual, const torch::Tensor& x,
                          const torch::Tensor& bits, int64_t threshold, double scale) {
  auto base = residual.contiguous();
  auto input = x.contiguous();
  TORCH_CHECK(base.sizes() == input.sizes(), "the residual and the branch differ in shape");
  check_dropout_bits(bits, input.numel(), threshold);
  const auto base_type = base.scalar_type(), in_type = input.scalar_type();
  TORCH_CHECK(base_type == in_type || (base_type == torch::kFloat && in_type == torch::kBFloat16),
              "the branch must have the residual's dtype, or be bfloat16 under float32");
  auto out = torch::empty_like(base);
  const auto n = input.numel();
  const auto t = static_cast<int16_t>(threshold);
  const auto* chunks = dropout_chunks(bits);
  if (base_type == torch::kDouble) {
    dropout_add_kernel(base.data_ptr<double>(), input.data_ptr<double>(), chunks,
                       out.data_ptr<double>(), n, t, scale);
  } else if (in_type == torch::kBFloat16) {
    dropout_add_kernel(base.data_ptr<float>(), elements<at::BFloat16>(input), chunks,
                       out.data_ptr<float>(), n, t, static_cast<float>(scale));
  } else {
    TORCH_CHECK(base_type == torch::kFloat, "residual dropout takes float32 or float64");
    dropout_add_kernel(base.data_ptr<float>(), input.data_ptr<float>(), chunks,
                       out.data_ptr<float>(), n, t, static_cast<float>(scale));
  }
  return out;
}

// LayerNorm over the last dimension of x (float32 or float64), written into out: of x's
// dtype, or bfloat16 for float32 x. Returns the row means and reciprocal deviations.
std::vector<torch::Tensor> layer_norm_forward(const torch::Tensor& x, const torch::Tensor& gamma,
                                              const torch::Tensor& beta, double eps,
                                              torch::Tensor& out) {
  TORCH_CHECK(x.is_contiguous() && x.dim() >= 1, "the input must be contiguous");
  const int64_t width = x.size(-1), rows = width ? x.numel() / width : 0;
  const auto type = x.scalar_type();
  TORCH_CHECK(type == torch::kFloat || type == torch::kDouble,
              "LayerNorm takes float32 or float64 input");
  for (const auto* t : {&gamma, &beta}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == width && t->is_contiguous() &&
                    t->scalar_type() == type,
                "the weight and bias must be vectors of the input's width and dtype");
  }
  TORCH_CHECK(out.is_contiguous() && out.sizes() == x.sizes() &&
                  (out.scalar_type() == type ||
                   (type == torch::kFloat && out.scalar_type() == torch::kBFloat16)),
              "the output must be shaped like the input, of its dtype or bfloat16");
  auto mean = torch::empty({rows}, x.options());
  auto rstd = torch::empty({rows}, x.options());
  if (type == torch::kDouble) {
    layer_norm_forward_kernel(x.data_ptr<double>(), gamma.data_ptr<double>(),
                              beta.data_ptr<double>(), out.data_ptr<double>(),
                              mean.data_ptr<double>(), rstd.data_ptr<double>(), rows, width, eps);
  } else if (out.scalar_type() == torch::kBFloat16) {
    layer_norm_forward_kernel(x.data_ptr<float>(), gamma.data_ptr<float>(),
                              beta.data_ptr<float>(), elements<at::BFloat16>(out),
                              mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, width,
                              static_cast<float>(eps));
  } else {
    layer_norm_forward_kernel(x.data_ptr<float>(), gamma.data_ptr<float>(),
                              beta.data_ptr<float>(), out.data_ptr<float>(),
                              mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, width,
                              static_cast<float>(eps));
  }
  return {mean, rstd};
}

std::vector<torch::Tensor> layer_norm_backward(const torch::Tensor& grad_out,
                                               const torch::Tensor& x, const torch::Tensor& mean,
                                               const torch::Tensor& rstd,
                                               const torch::Tensor& gamma) {
  auto grad = grad_out.contiguous();
  TORCH_CHECK(grad.sizes() == x.sizes(), "gradient of the output has the wrong shape");
  const int64_t width = x.size(-1), rows = width ? x.numel() / width : 0;
  const auto type = x.scalar_type();
  TORCH_CHECK(grad.scalar_type() == type ||
                  (type == torch::kFloat && grad.scalar_type() == torch::kBFloat16),
              "the gradient must have the input's dtype, or bfloat16 for float32 input");
  auto grad_x = torch::empty_like(x);
  auto grad_gamma = torch::empty_like(gamma);
  auto grad_beta = torch::empty_like(gamma);
  if (type == torch::kDouble) {
    layer_norm_backward_kernel(grad.data_ptr<double>(), x.data_ptr<double>(),
                               mean.data_ptr<double>(), rstd.data_ptr<double>(),
                               gamma.data_ptr<double>(), grad_x.data_ptr<double>(),
                               grad_gamma.data_ptr<double>(), grad_beta.data_ptr<double>(),
                               rows, width);
  } else if (grad.scalar_type() == torch::kBFloat16) {
    layer_norm_backward_kernel(elements<at::BFloat16>(grad), x.data_ptr<float>(),
                               mean.data_ptr<float>(), rstd.data_ptr<float>(),
                               gamma.data_ptr<float>(), grad_x.data_ptr<float>(),
                               grad_gamma.data_ptr<float>(), grad_beta.data_ptr<float>(),
                               rows, width);
  } else {
    layer_norm_backward_kernel(grad.data_ptr<float>(), x.data_ptr<float>(),
                               mean.data_ptr<float>(), rstd.data_ptr<float>(),
                               gamma.data_ptr<float>(), grad_x.data_ptr<float>(),
                               grad_gamma.data_ptr<float>(), grad_beta.data_ptr<float>(),
                               rows, width);
  }
  return {grad_x, grad_gamma, grad_beta};
}

// log(1 + u) for 0 <= u <= 1 as 2 atanh(s), s = u / (2 + u) <= 1/3, from its series to
// s^15 (relative error below 2e-9): no cancellation for small u, and plain arithmetic
// that the compiler vectorises.
STEP_INLINE float log1p_unit(float u) {
  const float s = u / (2.0f + u);
  const float s2 = s * s;
  float p = 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}
STEP_INLINE double log1p_unit(double u) { return std::log1p(u); }

// digamma(z) for z > 0: the recurrence up to z >= 10, then the asymptotic series to
// z^-10 (truncation error below 3e-14).
STEP_INLINE double digamma_positive(double z) {
  double shift = 0.0;
  while (z < 10.0) {
    shift -= 1.0 / z;
    z += 1.0;
  }
  const double r = 1.0 / z, r2 = r * r;
  const double tail =
      r2 * (-1.0 / 12 + r2 * (1.0 / 120 + r2 * (-1.0 / 252 + r2 * (1.0 / 240 + r2 * (-1.0 / 132)))));
  return shift + std::log(z) - 0.5 * r + tail;
}

// Counts up to this value take the exact finite forms of the gamma-function terms.
constexpr int64_t kSmallCount = 16;
// lgamma(x + 1) = log(x!) of integer counts below this value comes from a table.
constexpr int64_t kFactorialTable = 4096;

const std::vector<double>& log_factorials() {
  static const std::vector<double> table = [] {
    std::vector<double> t(kFactorialTable);
    t[0] = 0.0;
    for (int64_t n = 1; n < kFactorialTable; ++n) t[n] = t[n - 1] + std::log(static_cast<double>(n));
    return t;
  }();
  return table;
}

// Rows of one piece of work of the likelihood kernel.
constexpr int64_t kLikelihoodRows = 16;

// sigmoid(delta) - softplus(delta), the derivative of log NB(0) / theta by log theta.
// Where delta is very negative both terms are about exp(delta) and their difference is
// about -exp(2 delta) / 2: there the series sum_{k>=2} (-1)^(k+1) (k-1)/k e^k in
// e = exp(delta) keeps its relative precision (to below 4e-9 for e < 1/16, that is for
// delta < -log 16). (Conditions are single comparisons, which the compiler vectorises.)
template <typename T>
STEP_INLINE T sigmoid_minus_softplus(T delta, T e, T sig, T sp) {
  const T series = -e * e *
      (T(0.5) - e * (T(2.0 / 3) - e * (T(0.75) - e * (T(0.8) - e * (T(5.0 / 6) -
                                                                   e * (T(6.0 / 7) - e * T(0.875)))))));
  return delta < T(-2.772588722239781) ? series : sig - sp;
}

// Pass 1 of the likelihood kernel over one row: every term but those of pass 2, with
// theta = exp(log theta), delta = log mu - log theta, log NB(0) = -theta * softplus(delta)
// and x log(mu / (theta + mu)) = -x softplus(-delta). Pass 2 adds
// lgamma(x + theta) - lgamma(theta) - x log theta - lgamma(x + 1) to the value and
// theta d/dtheta [lgamma(x + theta) - lgamma(theta)] - x to the log-theta derivative:
// split so, the large terms that cancel for large theta (x log theta, x) cancel exactly.
template <typename T, bool ZeroInflated, bool Grads>
STEP_INLINE void likelihood_row_pass(const T* __restrict__ xr, const T* __restrict__ mr,
                                     const T* __restrict__ ltr, const T* __restrict__ tr,
                                     const T* __restrict__ pr, T* __restrict__ vr,
                                     T* __restrict__ dmr, T* __restrict__ dtr,
                                     T* __restrict__ dpr, int64_t genes) {
#pragma omp simd
  for (int64_t j = 0; j < genes; ++j) {
    const T xv = xr[j], th = tr[j], lm = mr[j], lt = ltr[j];
    const T delta = lm - lt;
    const T e = exp_nonpositive(-std::fabs(delta));
    const T l1 = log1p_unit(e);
    const T sp = std::max(delta, T(0)) + l1;
    const T inv = T(1) / (T(1) + e);
    const T sig = (delta < T(0) ? e : T(1)) * inv;      // sigmoid(delta)
    const T sig_neg = (delta < T(0) ? T(1) : e) * inv;  // sigmoid(-delta)
    const T log_nb0 = -th * sp;
    // softplus(-delta) - log theta, without subtracting log theta from itself
    const T sp_neg_less = (delta < T(0) ? -lm : -lt) + l1;
    const T th_dsp = th * sigmoid_minus_softplus(delta, e, sig, sp);
    T value = log_nb0 - xv * sp_neg_less;
    T dm = -th * sig + xv * sig_neg;
    T dt = th_dsp + xv * sig;
    if constexpr (ZeroInflated) {
      const T pl = pr[j];
      const T ep = exp_nonpositive(-std::fabs(pl));
      const T log_norm = std::max(pl, T(0)) + log1p_unit(ep);  // softplus(pi)
      const T sig_pi = (pl >= T(0) ? T(1) : ep) / (T(1) + ep);
      const T a = pl - log_nb0;
      const T ea = exp_nonpositive(-std::fabs(a));
      const T inv_a = T(1) / (T(1) + ea);
      const T w_pi = (a >= T(0) ? T(1) : ea) * inv_a;  // posterior share of the extra zero
      const T w_nb = (a >= T(0) ? ea : T(1)) * inv_a;
      const T at_zero = std::max(pl, log_nb0) + log1p_unit(ea) - log_norm;
      value = xv < T(0.5) ? at_zero : value - log_norm;
      if constexpr (Grads) dpr[j] = xv < T(0.5) ? w_pi - sig_pi : -sig_pi;
      dm = xv < T(0.5) ? w_nb * (-th * sig) : dm;
      dt = xv < T(0.5) ? w_nb * th_dsp : dt;
    }
    vr[j] = value;
    if constexpr (Grads) {
      dmr[j] = dm;
      dtr[j] = dt;
    }
  }
}

// Pass 2 for one count x > 0: lgamma(x + theta) - lgamma(theta) - x log theta
// (``excess``) and theta d/dtheta [lgamma(x + theta) - lgamma(theta)] - x
// (``d_excess``), in double precision. Integer counts up to kSmallCount use
// Gamma(x + theta) / Gamma(theta) = theta^x prod_{0<k<x} (1 + k / theta); theta of at least
// 10 uses Stirling's series of the difference (truncation below 1e-10), where the direct
// difference of two large lgamma values would lose digits; other values use lgamma and
// digamma directly.
STEP_INLINE void gamma_terms(double x, double theta, double log_theta, double& excess,
                             double& d_excess) {
  (void)log_theta;  // used by the direct branch only
  if (x >= 1.0 && x <= static_cast<double>(kSmallCount) && x == std::floor(x)) {
    const int64_t n = static_cast<int64_t>(x);
    double product = 1.0, fractions = 0.0;
    for (int64_t k = 1; k < n; ++k) {
      const double kd = static_cast<double>(k);
      product *= 1.0 + kd / theta;
      fractions -= kd / (theta + kd);
    }
    excess = std::log(product);
    d_excess = fractions;
  } else if (theta >= 10.0) {
    const double u = 1.0 / theta, v = 1.0 / (x + theta);
    const double d1 = -x * u * v;  // v - u, and below v^n - u^n for n = 2, 3, 4, 6
    const double d2 = d1 * (v + u), sq = v * v + u * u;
    const double d3 = d1 * (sq + v * u);
    const double d5 = d1 * (sq * sq - v * v * u * u + v * u * sq);  // v^5 - u^5
    const double l = std::log1p(x * u);
    excess = -x + (x + theta - 0.5) * l + d1 / 12.0 - d3 / 360.0 + d5 / 1260.0;
    const double d4 = d2 * sq, d6 = d2 * (sq * sq - v * v * u * u);
    d_excess = theta * (l - d1 / 2.0 - d2 / 12.0 + d4 / 120.0 - d6 / 252.0) - x;
  } else {
    excess = std::lgamma(x + theta) - std::lgamma(theta) - x * log_theta;
    d_excess = theta * (digamma_positive(x + theta) - digamma_positive(theta)) - x;
  }
}

// log p(x) and its derivatives; d_theta is by log theta, pi is null for the plain
// negative binomial. theta and log_theta are read at row * theta_stride + gene (a
// stride of 0 for one value per gene). The derivative outputs are null where no
// gradient is needed.
template <typename T>
void count_log_prob_kernel(const T* x, const T* log_mu, const T* log_theta, const T* theta,
                           int64_t theta_stride, const T* pi, T* out, T* d_mu, T* d_theta,
                           T* d_pi, int64_t rows, int64_t genes) {
  const bool grads = d_mu != nullptr;
  const bool zero_inflated = pi != nullptr;
  const std::vector<double>& factorials = log_factorials();
  const int64_t pieces = (rows + kLikelihoodRows - 1) / kLikelihoodRows;
  at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin * kLikelihoodRows; r < std::min(rows, end * kLikelihoodRows); ++r) {
      const int64_t o = r * genes;
      const T* xr = x + o;
      const T* ltr = log_theta + r * theta_stride;
      const T* tr = theta + r * theta_stride;
      const T* pr = zero_inflated ? pi + o : nullptr;
      T* vr = out + o;
      T* dmr = grads ? d_mu + o : nullptr;
      T* dtr = grads ? d_theta + o : nullptr;
      T* dpr = grads && zero_inflated ? d_pi + o : nullptr;
      if (zero_inflated) {
        if (grads) likelihood_row_pass<T, true, true>(xr, log_mu + o, ltr, tr, pr, vr, dmr, dtr, dpr, genes);
        else likelihood_row_pass<T, true, false>(xr, log_mu + o, ltr, tr, pr, vr, dmr, dtr, dpr, genes);
      } else {
        if (grads) likelihood_row_pass<T, false, true>(xr, log_mu + o, ltr, tr, pr, vr, dmr, dtr, dpr, genes);
        else likelihood_row_pass<T, false, false>(xr, log_mu + o, ltr, tr, pr, vr, dmr, dtr, dpr, genes);
      }
      // pass 2: lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) and theta times the
      // derivative of the first difference, where they are not zero
      for (int64_t j = 0; j < genes; ++j) {
        const double xv = static_cast<double>(xr[j]);
        if (zero_inflated ? xv < 0.5 : xv == 0.0) continue;
        double excess, d_excess;
        gamma_terms(xv, static_cast<double>(tr[j]), static_cast<double>(ltr[j]), excess, d_excess);
        const double log_fact = xv == std::floor(xv) && xv >= 0.0 &&
                                        xv < static_cast<double>(kFactorialTable)
                                    ? factorials[static_cast<int64_t>(xv)]
                                    : std::lgamma(xv + 1.0);
        vr[j] = static_cast<T>(static_cast<double>(vr[j]) + excess - log_fact);
        if (grads) dtr[j] = static_cast<T>(static_cast<double>(dtr[j]) + d_excess);
      }
    }
  });
}

std::vector<torch::Tensor> count_log_prob(const torch::Tensor& x, const torch::Tensor& log_mu,
                                          const torch::Tensor& log_theta,
                                          const torch::Tensor& theta,
                                          const c10::optional<torch::Tensor>& pi_logits,
                                          bool grads) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && log_mu.is_contiguous() &&
                  log_mu.sizes() == x.sizes(),
              "counts and log means must be contiguous (cells, genes) tensors of one shape");
  const int64_t rows = x.size(0), genes = x.size(1);
  TORCH_CHECK(log_theta.is_contiguous() && theta.is_contiguous() &&
                  theta.sizes() == log_theta.sizes() &&
                  (log_theta.sizes() == torch::IntArrayRef({genes}) ||
                   log_theta.sizes() == x.sizes()),
              "log inverse dispersions must be contiguous, (genes,) or (cells, genes)");
  const bool zero_inflated = pi_logits.has_value() && pi_logits->defined();
  if (zero_inflated) {
    TORCH_CHECK(pi_logits->is_contiguous() && pi_logits->sizes() == x.sizes(),
                "zero-inflation logits must be a contiguous (cells, genes) tensor");
  }
  for (const torch::Tensor* t : {&log_mu, &log_theta, &theta}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "all inputs must have one dtype");
  }
  TORCH_CHECK(!zero_inflated || pi_logits->scalar_type() == x.scalar_type(),
              "all inputs must have one dtype");
  const int64_t theta_stride = log_theta.dim() == 2 ? genes : 0;
  auto out = torch::empty_like(x);
  torch::Tensor d_mu, d_theta, d_pi;
  if (grads) {
    d_mu = torch::empty_like(x);
    d_theta = torch::empty_like(x);
    if (zero_inflated) d_pi = torch::empty_like(x);
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "count_log_prob", [&] {
    count_log_prob_kernel<scalar_t>(
        x.data_ptr<scalar_t>(), log_mu.data_ptr<scalar_t>(), log_theta.data_ptr<scalar_t>(),
        theta.data_ptr<scalar_t>(), theta_stride,
        zero_inflated ? pi_logits->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(),
        grads ? d_mu.data_ptr<scalar_t>() : nullptr, grads ? d_theta.data_ptr<scalar_t>() : nullptr,
        grads && zero_inflated ? d_pi.data_ptr<scalar_t>() : nullptr, rows, genes);
  });
  return {out, d_mu, d_theta, d_pi};
}

// How many threads at::parallel_for gives a range of `pieces` pieces of work, as the
// kernels above call it: one where the build has no OpenMP, whatever torch's setting.
// at::parallel_for calls its function once per thread that gets a share of the range.
int64_t parallel_threads(int64_t pieces) {
  std::atomic<int64_t> calls{0};
  at::parallel_for(0, pieces, 1, [&](int64_t, int64_t) { calls.fetch_add(1); });
  return calls.load();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_forward", &attention_forward, "fused attention, forward");
  m.def("attention_backward", &attention_backward, "fused attention, backward");
  m.def("bias_gelu_forward", &bias_gelu_forward, "gelu(h + bias) and its derivative");
  m.def("bias_gelu_backward", &bias_gelu_backward, "gradients of gelu(h + bias)");
  m.def("dropout_apply", &dropout_apply, "out = x * (16-bit chunk >= threshold ? scale : 0)");
  m.def("layer_norm_forward", &layer_norm_forward, "LayerNorm of rows, into out");
  m.def("layer_norm_backward", &layer_norm_backward, "gradients of LayerNorm");
  m.def("dropout_add", &dropout_add, "residual + x * (16-bit chunk >= threshold ? scale : 0)");
  m.def("count_log_prob", &count_log_prob, "(zero-inflated) negative binomial log p(x), derivatives");
  m.def("parallel_threads", &parallel_threads, "threads the kernels split a range over");
}

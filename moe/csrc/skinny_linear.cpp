// y = x W^T (+ b) for the few rows of x that decoding and verification multiply (fp32, AVX2 + FMA).
//
// M rows of x, K inputs, O outputs. BLAS kernels are tuned for big products; with 1-32 rows they
// neither stream W at memory speed nor reach the FMA units, and MKL gets slower from 1 row to 2.
// Here W is read from memory once: each thread takes a band of output rows, four at a time, and
// multiplies those four W rows (kept in L1) with every row of x, two at a time (8 accumulators).
// Each y[m, o] is summed in the same order whatever M is, so a row's result does not depend on
// which other rows share the call.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float dot(const float* x, const float* w, int64_t k8, int64_t k) {
  __m256 a = _mm256_setzero_ps();
  for (int64_t i = 0; i < k8; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(w + i), a);
  float s = hsum(a);
  for (int64_t i = k8; i < k; ++i) s += x[i] * w[i];
  return s;
}

// Output rows [o0, o1) of y for all M rows of x.
void band(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t K, int64_t O,
          int64_t o0, int64_t o1) {
  const int64_t k8 = K & ~int64_t(7);
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    const float* w0 = w + o * K;
    const float* w1 = w0 + K;
    const float* w2 = w1 + K;
    const float* w3 = w2 + K;
    for (int64_t m = 0; m < M; m += 2) {
      const bool two = m + 1 < M;
      const float* xa = x + m * K;
      const float* xb = two ? xa + K : xa;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
      for (int64_t i = 0; i < k8; i += 8) {
        const __m256 v0 = _mm256_loadu_ps(w0 + i), v1 = _mm256_loadu_ps(w1 + i);
        const __m256 v2 = _mm256_loadu_ps(w2 + i), v3 = _mm256_loadu_ps(w3 + i);
        const __m256 p = _mm256_loadu_ps(xa + i);
        a0 = _mm256_fmadd_ps(p, v0, a0);
        a1 = _mm256_fmadd_ps(p, v1, a1);
        a2 = _mm256_fmadd_ps(p, v2, a2);
        a3 = _mm256_fmadd_ps(p, v3, a3);
        const __m256 q = _mm256_loadu_ps(xb + i);
        c0 = _mm256_fmadd_ps(q, v0, c0);
        c1 = _mm256_fmadd_ps(q, v1, c1);
        c2 = _mm256_fmadd_ps(q, v2, c2);
        c3 = _mm256_fmadd_ps(q, v3, c3);
      }
      float ra[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
      float rc[4] = {hsum(c0), hsum(c1), hsum(c2), hsum(c3)};
      const float* ws[4] = {w0, w1, w2, w3};
      for (int r = 0; r < 4; ++r) {
        for (int64_t i = k8; i < K; ++i) {
          ra[r] += xa[i] * ws[r][i];
          rc[r] += xb[i] * ws[r][i];
        }
        const float bias = b ? b[o + r] : 0.0f;
        y[m * O + o + r] = ra[r] + bias;
        if (two) y[(m + 1) * O + o + r] = rc[r] + bias;
      }
    }
  }
  for (; o < o1; ++o) {
    const float bias = b ? b[o] : 0.0f;
    for (int64_t m = 0; m < M; ++m) y[m * O + o] = dot(x + m * K, w + o * K, k8, K) + bias;
  }
}

torch::Tensor linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat, "skinny linear is fp32 only");
  TORCH_CHECK(!x.is_cuda() && !w.is_cuda(), "skinny linear runs on the CPU");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && x.size(-1) == w.size(1), "skinny linear: bad shapes");
  const auto xs = x.contiguous();
  const int64_t K = w.size(1), O = w.size(0), M = K ? xs.numel() / K : 0;
  auto sizes = x.sizes().vec();
  sizes.back() = O;
  auto y = torch::empty(sizes, x.options());
  const float* bp = nullptr;
  torch::Tensor bc;
  if (bias.has_value() && bias->defined()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.scalar_type() == torch::kFloat && bc.numel() == O, "skinny linear: bad bias");
    bp = bc.data_ptr<float>();
  }
  const float* xp = xs.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t quads = (O + 3) / 4;
  at::parallel_for(0, quads, 16, [&](int64_t q0, int64_t q1) {
    band(xp, wp, bp, yp, M, K, O, q0 * 4, std::min(O, q1 * 4));
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x W^T + b for a few fp32 rows of x");
}

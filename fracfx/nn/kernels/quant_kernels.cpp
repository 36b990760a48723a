// fracfx fused quantizer kernels (CPU). See docs/kernels.md.
//
// Exactness: every per-element formula is written in the operation order of the eager torch code
// (fracfx/nn/quant.py), in float32, with floating-point contraction off (-ffp-contract=off), so a
// deterministic result is bit-identical to eager torch and a stochastic one is bit-identical to
// the eager formula fed the same noise. The noise is a pure function of (seed, step, element
// index) (Philox4x32-10), so the output does not depend on the thread count or the chunking.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace fracfx_kernels {

constexpr int64_t kChunk = 1 << 15;        // reduction chunk (fixed: results independent of threads)
constexpr int64_t kGrain = 1 << 14;        // elements per parallel task, at least
constexpr int kBlocks = 16;                // Philox blocks per noise tile
constexpr int kTile = kBlocks * 8;         // 8 noise values (16 bits each) per Philox block

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC'11). counter = (block lo, block hi, step lo, step hi),
// key = (seed lo, seed hi). Lane j of a block: 16 bits (j & 1) of output word j >> 1.

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

// noise for elements [base, base + kTile), base a multiple of 8; written to out[kTile]
static inline void noise_tile(uint64_t base, uint32_t s0, uint32_t s1, uint32_t k0, uint32_t k1, float* out) {
  uint32_t c0[kBlocks], c1[kBlocks], c2[kBlocks], c3[kBlocks];
  const uint64_t first = base >> 3;
  for (int l = 0; l < kBlocks; ++l) {
    const uint64_t b = first + (uint64_t)l;
    c0[l] = (uint32_t)b;
    c1[l] = (uint32_t)(b >> 32);
    c2[l] = s0;
    c3[l] = s1;
  }
  uint32_t key0 = k0, key1 = k1;
  for (int r = 0; r < 10; ++r) {
    for (int l = 0; l < kBlocks; ++l) {
      const uint64_t p0 = (uint64_t)kM0 * (uint64_t)c0[l];
      const uint64_t p1 = (uint64_t)kM1 * (uint64_t)c2[l];
      const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1[l] ^ key0;
      const uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3[l] ^ key1;
      c1[l] = (uint32_t)p1;
      c3[l] = (uint32_t)p0;
      c0[l] = n0;
      c2[l] = n2;
    }
    key0 += kW0;
    key1 += kW1;
  }
  for (int l = 0; l < kBlocks; ++l) {
    const uint32_t w[4] = {c0[l], c1[l], c2[l], c3[l]};
    for (int j = 0; j < 8; ++j) {
      const int16_t k = (int16_t)(uint16_t)(w[j >> 1] >> (16 * (j & 1)));
      out[l * 8 + j] = ((float)k + 0.5f) * (1.0f / 65536.0f);
    }
  }
}

struct NoiseKey {
  uint32_t s0, s1, k0, k1;
};

static NoiseKey noise_key(const at::Tensor& key) {
  TORCH_CHECK(key.dtype() == at::kLong && key.numel() == 2, "fracfx: noise key must be an int64 tensor [seed, step]");
  auto k = key.to(at::kCPU).contiguous();
  const uint64_t seed = (uint64_t)k.data_ptr<int64_t>()[0];
  const uint64_t step = (uint64_t)k.data_ptr<int64_t>()[1];
  return NoiseKey{(uint32_t)step, (uint32_t)(step >> 32), (uint32_t)seed, (uint32_t)(seed >> 32)};
}

// ---------------------------------------------------------------------------------------------
// element formulas (same operation order as the eager code)

static inline float fq_one(float x, float lo, float s, float qmax) {
  float v = (x - lo) / s;
  v = v < 0.0f ? 0.0f : v;      // NaN passes through, as torch.clamp
  v = v > qmax ? qmax : v;
  return std::nearbyint(v) * s + lo;
}

static inline float fq_noisy(float x, float lo, float s, float qmax, float u) {
  float v = (x - lo) / s;
  v = v + u;
  v = v < 0.0f ? 0.0f : v;
  v = v > qmax ? qmax : v;
  return std::nearbyint(v) * s + lo;
}

static void span_plain(const float* x, float* y, int64_t n, float lo, float s, float qmax) {
  for (int64_t i = 0; i < n; ++i) y[i] = fq_one(x[i], lo, s, qmax);
}

// elements [begin, end) of the flat tensor, with noise of their global index
static void span_noisy(const float* x, float* y, int64_t begin, int64_t end, float lo, float s, float qmax, const NoiseKey& key) {
  alignas(64) float u[kTile];
  int64_t t = begin - (begin % 8);
  while (t < end) {
    noise_tile((uint64_t)t, key.s0, key.s1, key.k0, key.k1, u);
    const int64_t a = std::max(begin, t), b = std::min(end, t + (int64_t)kTile);
    const float* ut = u + (a - t);
    const float* xt = x + a;
    float* yt = y + a;
    const int64_t m = b - a;
    for (int64_t i = 0; i < m; ++i) yt[i] = fq_noisy(xt[i], lo, s, qmax, ut[i]);
    t += kTile;
  }
}

// ---------------------------------------------------------------------------------------------
// ops

static void check_float(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), "fracfx kernels run on CPU tensors (", what, ")");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "fracfx kernels take float32 (", what, ")");
}

struct MinMax {
  float lo, hi;
  bool nan;
};

static MinMax minmax_span(const float* p, int64_t n) {
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  int nan = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = p[i];
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    nan |= (v != v);
  }
  return MinMax{lo, hi, nan != 0};
}

// per-tensor min and max (NaN if any element is NaN, as torch.aminmax)
std::tuple<at::Tensor, at::Tensor> minmax(const at::Tensor& x_) {
  check_float(x_, "minmax");
  TORCH_CHECK(x_.numel() > 0, "fracfx.minmax of an empty tensor");
  auto x = x_.contiguous();
  const float* p = x.data_ptr<float>();
  const int64_t n = x.numel();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<MinMax> part(chunks);
  at::parallel_for(0, chunks, std::max<int64_t>(1, kGrain / kChunk), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t a = c * kChunk, b = std::min(n, a + kChunk);
      part[c] = minmax_span(p + a, b - a);
    }
  });
  MinMax r = part[0];
  for (int64_t c = 1; c < chunks; ++c) {
    r.lo = part[c].lo < r.lo ? part[c].lo : r.lo;
    r.hi = part[c].hi > r.hi ? part[c].hi : r.hi;
    r.nan = r.nan || part[c].nan;
  }
  if (r.nan) r.lo = r.hi = std::numeric_limits<float>::quiet_NaN();
  auto opts = x.options();
  return {at::scalar_tensor(r.lo, opts), at::scalar_tensor(r.hi, opts)};
}

// min and max of each row of x viewed as (rows, numel / rows)
std::tuple<at::Tensor, at::Tensor> row_minmax(const at::Tensor& x_, int64_t rows) {
  check_float(x_, "row_minmax");
  auto x = x_.contiguous();
  const int64_t n = x.numel();
  TORCH_CHECK(rows > 0 && n % rows == 0 && n > 0, "fracfx.row_minmax: ", n, " elements do not split into ", rows, " rows");
  const int64_t cols = n / rows;
  auto lo = at::empty({rows}, x.options());
  auto hi = at::empty({rows}, x.options());
  const float* p = x.data_ptr<float>();
  float* plo = lo.data_ptr<float>();
  float* phi = hi.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      MinMax m = minmax_span(p + r * cols, cols);
      if (m.nan) m.lo = m.hi = std::numeric_limits<float>::quiet_NaN();
      plo[r] = m.lo;
      phi[r] = m.hi;
    }
  });
  return {lo, hi};
}

// y = fake quant of x viewed as (rows, cols): lo, s and qmax per row (numel 1 = shared by all rows).
// qmax 0 in `row_qmax` leaves that row unquantized (copied). `key` [seed, step]: stochastic
// rounding with Philox noise of each element's flat index.
at::Tensor fake_quant(const at::Tensor& x_, const at::Tensor& lo_, const at::Tensor& s_, double qmax,
                      const std::optional<at::Tensor>& row_qmax_, const std::optional<at::Tensor>& key_) {
  check_float(x_, "fake_quant x");
  check_float(lo_, "fake_quant lo");
  check_float(s_, "fake_quant s");
  auto x = x_.contiguous();
  auto lo = lo_.contiguous();
  auto s = s_.contiguous();
  at::Tensor row_qmax;
  int64_t rows = std::max(lo.numel(), s.numel());
  if (row_qmax_.has_value()) {
    row_qmax = row_qmax_->to(at::kFloat).contiguous();
    rows = std::max(rows, row_qmax.numel());
  }
  const int64_t n = x.numel();
  auto y = at::empty_like(x);
  if (n == 0) return y;
  TORCH_CHECK(lo.numel() == 1 || lo.numel() == rows, "fracfx.fake_quant: lo has ", lo.numel(), " entries for ", rows, " rows");
  TORCH_CHECK(s.numel() == 1 || s.numel() == rows, "fracfx.fake_quant: s has ", s.numel(), " entries for ", rows, " rows");
  TORCH_CHECK(n % rows == 0, "fracfx.fake_quant: ", n, " elements do not split into ", rows, " rows");
  const int64_t cols = n / rows;
  const bool noisy = key_.has_value();
  NoiseKey key{0, 0, 0, 0};
  if (noisy) key = noise_key(*key_);
  const float* px = x.data_ptr<float>();
  float* py = y.data_ptr<float>();
  const float* plo = lo.data_ptr<float>();
  const float* ps = s.data_ptr<float>();
  const float* pq = row_qmax.defined() ? row_qmax.data_ptr<float>() : nullptr;
  const bool lo_rows = lo.numel() > 1, s_rows = s.numel() > 1, q_rows = pq != nullptr && row_qmax.numel() > 1;
  const float q0 = (float)qmax;
  at::parallel_for(0, n, kGrain, [&](int64_t a, int64_t b) {
    while (a < b) {
      const int64_t r = a / cols;
      const int64_t e = std::min(b, (r + 1) * cols);
      const float l = plo[lo_rows ? r : 0], st = ps[s_rows ? r : 0];
      const float q = pq ? pq[q_rows ? r : 0] : q0;
      if (q == 0.0f) {
        std::copy(px + a, px + e, py + a);
      } else if (noisy) {
        span_noisy(px, py, a, e, l, st, q, key);
      } else {
        span_plain(px + a, py + a, e - a, l, st, q);
      }
      a = e;
    }
  });
  return y;
}

// the rounding noise itself (tests, and the reference for the eager fallback)
at::Tensor rounding_noise(int64_t numel, const at::Tensor& key_) {
  NoiseKey key = noise_key(key_);
  auto y = at::empty({numel}, at::TensorOptions().dtype(at::kFloat));
  float* py = y.data_ptr<float>();
  at::parallel_for(0, numel, kGrain, [&](int64_t a, int64_t b) {
    alignas(64) float u[kTile];
    int64_t t = a - (a % 8);
    while (t < b) {
      noise_tile((uint64_t)t, key.s0, key.s1, key.k0, key.k1, u);
      const int64_t lo = std::max(a, t), hi = std::min(b, t + (int64_t)kTile);
      for (int64_t i = lo; i < hi; ++i) py[i] = u[i - t];
      t += kTile;
    }
  });
  return y;
}

}  // namespace fracfx_kernels

TORCH_LIBRARY(fracfx, m) {
  m.def("minmax(Tensor x) -> (Tensor, Tensor)");
  m.def("row_minmax(Tensor x, int rows) -> (Tensor, Tensor)");
  m.def("fake_quant(Tensor x, Tensor lo, Tensor s, float qmax, Tensor? row_qmax=None, Tensor? key=None) -> Tensor");
  m.def("rounding_noise(int numel, Tensor key) -> Tensor");
}

TORCH_LIBRARY_IMPL(fracfx, CPU, m) {
  m.impl("minmax", &fracfx_kernels::minmax);
  m.impl("row_minmax", &fracfx_kernels::row_minmax);
  m.impl("fake_quant", &fracfx_kernels::fake_quant);
  m.impl("rounding_noise", &fracfx_kernels::rounding_noise);
}



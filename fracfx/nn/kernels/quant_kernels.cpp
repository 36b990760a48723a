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
#if defined(__AVX2__)
#include <immintrin.h>
#endif
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

// Noise for the tile of elements [base, base + kTile), base a multiple of kTile, into out[kTile].
// Element i of a tensor belongs to Philox block (i / kTile) * kBlocks + i % kBlocks and takes
// 16 bits (j % 2) of output word j / 2, j = (i % kTile) / kBlocks (the layout keeps every loop
// below a straight SIMD loop over the kBlocks blocks of a tile).
static inline void philox_tile(uint64_t first, uint32_t s0, uint32_t s1, uint32_t k0, uint32_t k1, float* out) {
  // lanes hold 32-bit values in 64-bit slots; the upper halves may carry garbage, which the
  // 32x32->64 multiplies ignore and the final (uint32_t) reads drop
#if defined(__AVX512F__)
  constexpr int V = kBlocks / 8;  // 8 blocks per register (64-bit lanes)
  __m512i a0[V], a1[V], a2[V], a3[V];
  const __m512i iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  for (int v = 0; v < V; ++v) {  // counters built in registers (no store-to-load round trip)
    const __m512i b = _mm512_add_epi64(_mm512_set1_epi64((long long)(first + 8 * v)), iota);
    a0[v] = b;                         // low 32 bits used; the high half is ignored by mul_epu32
    a1[v] = _mm512_srli_epi64(b, 32);
    a2[v] = _mm512_set1_epi64(s0);
    a3[v] = _mm512_set1_epi64(s1);
  }
  const __m512i m0 = _mm512_set1_epi64(kM0), m1 = _mm512_set1_epi64(kM1);
  uint32_t key0 = k0, key1 = k1;
  for (int r = 0; r < 10; ++r) {
    const __m512i q0 = _mm512_set1_epi64(key0), q1 = _mm512_set1_epi64(key1);
    for (int v = 0; v < V; ++v) {
      const __m512i p0 = _mm512_mul_epu32(a0[v], m0);
      const __m512i p1 = _mm512_mul_epu32(a2[v], m1);
      const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p1, 32), a1[v]), q0);
      const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(_mm512_srli_epi64(p0, 32), a3[v]), q1);
      a1[v] = p1;
      a3[v] = p0;
      a0[v] = n0;
      a2[v] = n2;
    }
    key0 += kW0;
    key1 += kW1;
  }
  const __m256 half = _mm256_set1_ps(0.5f), scale = _mm256_set1_ps(1.0f / 65536.0f);
  const __m512i* words[4] = {a0, a1, a2, a3};
  for (int w = 0; w < 4; ++w) {
    for (int v = 0; v < V; ++v) {
      const __m256i x = _mm512_cvtepi64_epi32(words[w][v]);  // the low 32 bits of each lane
      const __m256i k0 = _mm256_srai_epi32(_mm256_slli_epi32(x, 16), 16);
      const __m256i k1 = _mm256_srai_epi32(x, 16);
      _mm256_storeu_ps(out + (2 * w) * kBlocks + 8 * v, _mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(k0), half), scale));
      _mm256_storeu_ps(out + (2 * w + 1) * kBlocks + 8 * v, _mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(k1), half), scale));
    }
  }
#elif defined(__AVX2__)
  constexpr int V = kBlocks / 4;
  __m256i a0[V], a1[V], a2[V], a3[V];
  const __m256i iota = _mm256_setr_epi64x(0, 1, 2, 3);
  for (int v = 0; v < V; ++v) {
    const __m256i b = _mm256_add_epi64(_mm256_set1_epi64x((long long)(first + 4 * v)), iota);
    a0[v] = b;
    a1[v] = _mm256_srli_epi64(b, 32);
    a2[v] = _mm256_set1_epi64x(s0);
    a3[v] = _mm256_set1_epi64x(s1);
  }
  const __m256i m0 = _mm256_set1_epi64x(kM0), m1 = _mm256_set1_epi64x(kM1);
  uint32_t key0 = k0, key1 = k1;
  for (int r = 0; r < 10; ++r) {
    const __m256i q0 = _mm256_set1_epi64x(key0), q1 = _mm256_set1_epi64x(key1);
    for (int v = 0; v < V; ++v) {
      const __m256i p0 = _mm256_mul_epu32(a0[v], m0);
      const __m256i p1 = _mm256_mul_epu32(a2[v], m1);
      const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), a1[v]), q0);
      const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), a3[v]), q1);
      a1[v] = p1;
      a3[v] = p0;
      a0[v] = n0;
      a2[v] = n2;
    }
    key0 += kW0;
    key1 += kW1;
  }
  // low 32 bits of two 4 x 64-bit vectors -> 8 x 32-bit; lane j -> 16-bit k -> (k + 0.5) / 65536
  const __m256i pick = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256 half = _mm256_set1_ps(0.5f), scale = _mm256_set1_ps(1.0f / 65536.0f);
  const __m256i* words[4] = {a0, a1, a2, a3};
  for (int w = 0; w < 4; ++w) {
    for (int v = 0; v < V; v += 2) {
      const __m128i lo = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(words[w][v], pick));
      const __m128i hi = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(words[w][v + 1], pick));
      const __m256i x = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
      const __m256i k0 = _mm256_srai_epi32(_mm256_slli_epi32(x, 16), 16);
      const __m256i k1 = _mm256_srai_epi32(x, 16);
      _mm256_storeu_ps(out + (2 * w) * kBlocks + 4 * v, _mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(k0), half), scale));
      _mm256_storeu_ps(out + (2 * w + 1) * kBlocks + 4 * v, _mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(k1), half), scale));
    }
  }
#else
  uint64_t c0[kBlocks], c1[kBlocks], c2[kBlocks], c3[kBlocks];
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
      const uint64_t p0 = (uint64_t)kM0 * (uint64_t)(uint32_t)c0[l];
      const uint64_t p1 = (uint64_t)kM1 * (uint64_t)(uint32_t)c2[l];
      const uint64_t n0 = (p1 >> 32) ^ c1[l] ^ key0;
      const uint64_t n2 = (p0 >> 32) ^ c3[l] ^ key1;
      c1[l] = p1;
      c3[l] = p0;
      c0[l] = n0;
      c2[l] = n2;
    }
    key0 += kW0;
    key1 += kW1;
  }
  const uint64_t* words[4] = {c0, c1, c2, c3};
  for (int j = 0; j < 8; ++j) {
    const uint64_t* w = words[j >> 1];
    const int shift = 16 * (j & 1);
    float* o = out + j * kBlocks;
    for (int l = 0; l < kBlocks; ++l) {
      const int32_t k = (int32_t)(int16_t)(uint16_t)(w[l] >> shift);
      o[l] = ((float)k + 0.5f) * (1.0f / 65536.0f);
    }
  }
#endif
}

static inline void noise_tile(uint64_t base, uint32_t s0, uint32_t s1, uint32_t k0, uint32_t k1, float* out) {
  philox_tile((base / kTile) * kBlocks, s0, s1, k0, k1, out);
}

struct NoiseKey {
  uint32_t s0, s1, k0, k1;
};

static NoiseKey noise_key(const at::Tensor& counter, int64_t seed_) {
  TORCH_CHECK(counter.numel() == 1 && !at::isFloatingType(counter.scalar_type()), "fracfx: the noise counter must be one integer");
  const uint64_t step = (uint64_t)counter.item<int64_t>();
  const uint64_t seed = (uint64_t)seed_;
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
  int64_t t = begin - (begin % kTile);
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
  constexpr int L = 32;  // independent lanes: a plain SIMD loop, no reassociation needed
  float lo[L], hi[L];
  int32_t nan[L];
  for (int l = 0; l < L; ++l) {
    lo[l] = std::numeric_limits<float>::infinity();
    hi[l] = -std::numeric_limits<float>::infinity();
    nan[l] = 0;
  }
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int l = 0; l < L; ++l) {
      const float v = p[i + l];
      lo[l] = v < lo[l] ? v : lo[l];
      hi[l] = v > hi[l] ? v : hi[l];
      nan[l] |= (int32_t)(v != v);
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    const float v = p[i];
    lo[l] = v < lo[l] ? v : lo[l];
    hi[l] = v > hi[l] ? v : hi[l];
    nan[l] |= (int32_t)(v != v);
  }
  MinMax r{lo[0], hi[0], nan[0] != 0};
  for (int l = 1; l < L; ++l) {
    r.lo = lo[l] < r.lo ? lo[l] : r.lo;
    r.hi = hi[l] > r.hi ? hi[l] : r.hi;
    r.nan = r.nan || nan[l] != 0;
  }
  return r;
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
// qmax 0 in `row_qmax` leaves that row unquantized (copied). With `counter`: stochastic
// rounding, the Philox noise of (seed, counter, each element's flat index).
static void fake_quant_rows(const float* px, float* py, int64_t n, int64_t cols, const float* plo, bool lo_rows, const float* ps, bool s_rows,
                            const float* pq, bool q_rows, float q0, bool noisy, const NoiseKey& key) {
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
}

#if defined(__AVX2__)
// 8 x 8 block: row k of src (stride ss) -> column k of dst (stride ds)
static inline void transpose8(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m256 r[8], t[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(src + k * ss);
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 2; ++k) {
    r[4 * k] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
    r[4 * k + 1] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
    r[4 * k + 2] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
    r[4 * k + 3] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm256_permute2f128_ps(r[k], r[k + 4], 0x20);
    t[k + 4] = _mm256_permute2f128_ps(r[k], r[k + 4], 0x31);
  }
  for (int k = 0; k < 8; ++k) _mm256_storeu_ps(dst + k * ds, t[k]);
}
#endif

// (C, HW) row-major -> (HW, C) row-major (values are copied, never computed on)
static void transpose(const float* src, float* dst, int64_t C, int64_t HW) {
#if defined(__AVX2__)
  if (C % 8 == 0 && HW % 8 == 0) {
    for (int64_t c0 = 0; c0 < C; c0 += 8)
      for (int64_t i0 = 0; i0 < HW; i0 += 8) transpose8(src + c0 * HW + i0, HW, dst + i0 * C + c0, C);
    return;
  }
#endif
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < HW; ++i) dst[i * C + c] = src[c * HW + i];
}

// Stochastic fake quant of a channels-last (N, C, H, W) tensor, one per-tensor grid, in memory
// order: element (n, c, h, w) still gets the noise of its logical (row-major NCHW) index, so the
// result equals the contiguous path's. Per image: its C*H*W noise values (logical order) into a
// buffer, transposed into memory order in a second buffer (both stay in L2 for CIFAR-sized
// images), then the same straight SIMD loop as the contiguous path.
static void fake_quant_channels_last(const float* px, float* py, int64_t N, int64_t C, int64_t HW, float lo, float s, float q,
                                     const NoiseKey& key) {
  const int64_t image = C * HW;
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> u, ut((size_t)image);
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t first = n * image, last = first + image;
      const int64_t t0 = first - (first % kTile);
      u.resize((size_t)(last - t0 + kTile));
      for (int64_t t = t0; t < last; t += kTile) noise_tile((uint64_t)t, key.s0, key.s1, key.k0, key.k1, u.data() + (t - t0));
      const float* un = u.data() + (first - t0);
      transpose(un, ut.data(), C, HW);
      const float* um = ut.data();
      const float* xn = px + first;
      float* yn = py + first;
      for (int64_t j = 0; j < image; ++j) yn[j] = fq_noisy(xn[j], lo, s, q, um[j]);
    }
  });
}

// The output is channels-last where x is a channels-last (and not contiguous) 4-d tensor, else
// contiguous; the fake implementation (kernels/__init__.py) states the same rule for torch.compile.
at::Tensor fake_quant(const at::Tensor& x_, const at::Tensor& lo_, const at::Tensor& s_, double qmax,
                      const std::optional<at::Tensor>& row_qmax_, const std::optional<at::Tensor>& counter_, int64_t seed) {
  check_float(x_, "fake_quant x");
  check_float(lo_, "fake_quant lo");
  check_float(s_, "fake_quant s");
  auto lo = lo_.contiguous();
  auto s = s_.contiguous();
  at::Tensor row_qmax;
  int64_t rows = std::max(lo.numel(), s.numel());
  if (row_qmax_.has_value()) {
    row_qmax = row_qmax_->to(at::kFloat).contiguous();
    rows = std::max(rows, row_qmax.numel());
  }
  const int64_t n = x_.numel();
  const bool channels_last = !x_.is_contiguous() && x_.dim() == 4 && x_.is_contiguous(at::MemoryFormat::ChannelsLast);
  auto y = at::empty_like(x_, channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (n == 0) return y;
  TORCH_CHECK(lo.numel() == 1 || lo.numel() == rows, "fracfx.fake_quant: lo has ", lo.numel(), " entries for ", rows, " rows");
  TORCH_CHECK(s.numel() == 1 || s.numel() == rows, "fracfx.fake_quant: s has ", s.numel(), " entries for ", rows, " rows");
  TORCH_CHECK(n % rows == 0, "fracfx.fake_quant: ", n, " elements do not split into ", rows, " rows");
  const bool noisy = counter_.has_value();
  NoiseKey key{0, 0, 0, 0};
  if (noisy) key = noise_key(*counter_, seed);
  const float* plo = lo.data_ptr<float>();
  const float* ps = s.data_ptr<float>();
  const float* pq = row_qmax.defined() ? row_qmax.data_ptr<float>() : nullptr;
  const bool lo_rows = lo.numel() > 1, s_rows = s.numel() > 1, q_rows = pq != nullptr && row_qmax.numel() > 1;
  const float q0 = (float)qmax;
  const bool one_grid = rows == 1;
  if (!channels_last) {  // row-major: logical order == memory order (a copy first for any other layout)
    auto x = x_.contiguous();
    fake_quant_rows(x.data_ptr<float>(), y.data_ptr<float>(), n, n / rows, plo, lo_rows, ps, s_rows, pq, q_rows, q0, noisy, key);
  } else if (one_grid && !noisy) {  // an elementwise map: memory order
    fake_quant_rows(x_.data_ptr<float>(), y.data_ptr<float>(), n, n, plo, false, ps, false, pq, false, q0, false, key);
  } else if (one_grid) {
    const float q = pq ? pq[0] : q0;
    if (q == 0.0f) {
      y.copy_(x_);
    } else {
      fake_quant_channels_last(x_.data_ptr<float>(), y.data_ptr<float>(), x_.size(0), x_.size(1), x_.size(2) * x_.size(3), plo[0], ps[0], q, key);
    }
  } else {  // per-row grids on a channels-last tensor: in logical order through a contiguous copy
    auto x = x_.contiguous();
    auto out = at::empty_like(x);
    fake_quant_rows(x.data_ptr<float>(), out.data_ptr<float>(), n, n / rows, plo, lo_rows, ps, s_rows, pq, q_rows, q0, noisy, key);
    y.copy_(out);
  }
  return y;
}


// one block of mixed_act_dots: acc[0] += <g, x>, acc[1] += sum g, acc[2 + k] += <g, q_k(x)>
static void dots_block(const float* x, const float* g, int64_t n, float lo, const float* ps, const float* pq, int64_t K, bool clamp,
                       double* acc) {
  int64_t i0 = 0;
#if defined(__AVX2__)
  {
    const int64_t nv = n - n % 8;
    __m256 a = _mm256_setzero_ps(), c = _mm256_setzero_ps();
    for (int64_t i = 0; i < nv; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i), xv = _mm256_loadu_ps(x + i);
      a = _mm256_add_ps(a, _mm256_mul_ps(gv, xv));
      c = _mm256_add_ps(c, gv);
    }
    alignas(32) float ta[8], tc[8];
    _mm256_store_ps(ta, a);
    _mm256_store_ps(tc, c);
    for (int l = 0; l < 8; ++l) {
      acc[0] += ta[l];
      acc[1] += tc[l];
    }
    const __m256 lov = _mm256_set1_ps(lo), zero = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      const __m256 sv = _mm256_set1_ps(ps[k]), qv = _mm256_set1_ps(pq[k]);
      __m256 d = _mm256_setzero_ps();
      for (int64_t i = 0; i < nv; i += 8) {
        __m256 v = _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), lov), sv);
        if (clamp) v = _mm256_min_ps(_mm256_max_ps(v, zero), qv);
        v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        d = _mm256_add_ps(d, _mm256_mul_ps(_mm256_loadu_ps(g + i), v));
      }
      alignas(32) float td[8];
      _mm256_store_ps(td, d);
      for (int l = 0; l < 8; ++l) acc[2 + k] += td[l];
    }
    i0 = nv;
  }
#endif
  for (int64_t i = i0; i < n; ++i) {
    acc[0] += (double)(g[i] * x[i]);
    acc[1] += (double)g[i];
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t i = i0; i < n; ++i) {
      float v = (x[i] - lo) / ps[k];
      if (clamp) {
        v = v < 0.0f ? 0.0f : v;
        v = v > pq[k] ? pq[k] : v;
      }
      acc[2 + k] += (double)(g[i] * std::nearbyint(v));
    }
  }
}

// DFQ activation quantizer, backward: per sample b, the dot products the mask gradient needs,
// out[b] = (<g_b, x_b>, sum g_b, <g_b, q_1(x_b)>, ..., <g_b, q_K(x_b)>) with
// q_k(x) = round(clamp((x - lo) / s_k, 0, qmax_k)) (no clamp when `clamp` is false). One pass
// over x and g for all candidates; each sample is summed by one thread in a fixed order (float
// lanes per block of 1024 elements, blocks added in double), so the result does not depend on
// the thread count.
at::Tensor mixed_act_dots(const at::Tensor& x_, const at::Tensor& g_, const at::Tensor& lo_, const at::Tensor& scales_,
                          const at::Tensor& qmaxes_, bool clamp) {
  check_float(x_, "mixed_act_dots x");
  check_float(g_, "mixed_act_dots g");
  auto x = x_.contiguous();
  auto g = g_.contiguous();
  TORCH_CHECK(x.sizes() == g.sizes() && x.dim() >= 1, "fracfx.mixed_act_dots: x and g must have one shape");
  const float lo = lo_.to(at::kFloat).item<float>();
  auto scales = scales_.to(at::kFloat).contiguous();
  auto qmaxes = qmaxes_.to(at::kFloat).contiguous();
  const int64_t K = scales.numel();
  TORCH_CHECK(qmaxes.numel() == K && K <= 16, "fracfx.mixed_act_dots: at most 16 candidates, one qmax per scale");
  const int64_t rows = x.size(0);
  const int64_t cols = rows ? x.numel() / rows : 0;
  auto out = at::zeros({rows, K + 2}, x.options());
  const float* px = x.data_ptr<float>();
  const float* pg = g.data_ptr<float>();
  const float* ps = scales.data_ptr<float>();
  const float* pq = qmaxes.data_ptr<float>();
  float* po = out.data_ptr<float>();
  constexpr int64_t B = 1024;
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double acc[18] = {0};
      const float* xr = px + r * cols;
      const float* gr = pg + r * cols;
      for (int64_t b0 = 0; b0 < cols; b0 += B) {
        const int64_t n = std::min(B, cols - b0);
        dots_block(xr + b0, gr + b0, n, lo, ps, pq, K, clamp, acc);
      }
      for (int64_t k = 0; k < K + 2; ++k) po[r * (K + 2) + k] = (float)acc[k];
    }
  });
  return out;
}

// the rounding noise itself (tests, and the reference for the eager fallback)
at::Tensor rounding_noise(int64_t numel, const at::Tensor& counter, int64_t seed) {
  NoiseKey key = noise_key(counter, seed);
  auto y = at::empty({numel}, at::TensorOptions().dtype(at::kFloat));
  float* py = y.data_ptr<float>();
  at::parallel_for(0, numel, kGrain, [&](int64_t a, int64_t b) {
    alignas(64) float u[kTile];
    int64_t t = a - (a % kTile);
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
  // flexible_layout: inductor passes x in whatever layout it chose (channels-last gradients) instead of copying it to NCHW
  m.def("fake_quant(Tensor x, Tensor lo, Tensor s, float qmax, Tensor? row_qmax=None, Tensor? counter=None, int seed=0) -> Tensor",
        {at::Tag::flexible_layout});
  m.def("rounding_noise(int numel, Tensor counter, int seed) -> Tensor");
  m.def("mixed_act_dots(Tensor x, Tensor g, Tensor lo, Tensor scales, Tensor qmaxes, bool clamp) -> Tensor");
}

TORCH_LIBRARY_IMPL(fracfx, CPU, m) {
  m.impl("minmax", &fracfx_kernels::minmax);
  m.impl("row_minmax", &fracfx_kernels::row_minmax);
  m.impl("fake_quant", &fracfx_kernels::fake_quant);
  m.impl("rounding_noise", &fracfx_kernels::rounding_noise);
  m.impl("mixed_act_dots", &fracfx_kernels::mixed_act_dots);
}



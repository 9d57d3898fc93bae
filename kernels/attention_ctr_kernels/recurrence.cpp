// Fused CPU kernels for training (see __init__.py): the GRU / AUGRU recurrence.
//
// Recurrence: rows are independent, so each thread of torch's own pool (at::parallel_for) runs
// the whole time loop for its share of the batch (in chunks of up to 256 rows, which keep a
// step's working set in L2): per step two matmuls on those rows (the input projection
// W_i x_t and U h_{t-1}; oneDNN's brgemm micro-kernels, see `gemm`) plus ONE pass that
// computes every gate, the new state and what the backward needs; the backward takes the
// input's and the weights' gradient terms step by step while they are in cache, so no
// [B, L, 3H] tensor is ever written. Given the
// rows' lengths, a row stops at its own (its later outputs repeat its last state): rows are
// sorted longest first, so at every step the running ones are a prefix of each chunk's.
// Eager torch spends ~10 ops and two thread-pool round trips per step on the same work, and
// its backward ~15 extra passes over [L, B, H] tensors. float32 data; with `bf16` (bf16
// autocast) the recurrences' and the head's matmuls take bfloat16-rounded operands and
// accumulate in float32. The matmuls' rounding may depend on how many rows a chunk takes, so
// results are reproducible for a given thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>  // brgemm: oneDNN's small-matmul micro-kernels
#include <torch/library.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // streaming stores (stream_floats); elsewhere plain copies
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>
#include <tuple>
#include <type_traits>

namespace {

constexpr int64_t kRowsPerTask = 16;

// At most this many rows run one time loop together: a step's states, gates and operands then
// stay in L2 (batch 2048 on 2 threads, 1024 rows a loop, ran ~10% slower per row than 256).
constexpr int64_t kMaxRowsPerChunk = 256;

// Rows per chunk for the recurrences: each chunk runs the whole time loop on its own rows, and
// every thread takes the same number of chunks of at most kMaxRowsPerChunk rows (rounded up
// to whole kRowsPerTask blocks).
int64_t rows_per_chunk(int64_t batch) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t share = (batch + threads - 1) / threads;
  const int64_t chunks_per_thread =
      std::max<int64_t>(1, (share + kMaxRowsPerChunk - 1) / kMaxRowsPerChunk);  // 1 for B = 0
  const int64_t rows = (share + chunks_per_thread - 1) / chunks_per_thread;
  return (rows + kRowsPerTask - 1) / kRowsPerTask * kRowsPerTask;
}

// Eigen's float tanh: a 13/6 rational polynomial, |error| < 3e-7. It vectorises; libm's
// tanhf and expf do not.
inline float fast_tanh(float x) {
  const float clamp = 7.90531110763549805f;  // tanh rounds to +-1 in float32 beyond this
  x = x > clamp ? clamp : (x < -clamp ? -clamp : x);
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return x * p / q;
}

inline float fast_sigmoid(float x) { return 0.5f * fast_tanh(0.5f * x) + 0.5f; }

}  // namespace

// BLAS's Fortran sgemm, which torch's own CPU matmuls call (MKL in x86 wheels). Weak: a torch
// without it leaves it null, and `gemm` below then goes through ATen.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc) __attribute__((weak));

// MKL's matmul of bfloat16 operands (raw bits) with float32 accumulation and output (AMX or
// AVX512-BF16 where the CPU has them); Fortran interface as sgemm_. Weak like sgemm_.
extern "C" void gemm_bf16bf16f32(const char* transa, const char* transb, const int* m,
                                 const int* n, const int* k, const float* alpha,
                                 const uint16_t* a, const int* lda, const uint16_t* b,
                                 const int* ldb, const float* beta, float* c, const int* ldc)
    __attribute__((weak));

namespace {

// ATTENTION_CTR_KERNELS_ATEN_GEMM=1 takes the ATen paths even where BLAS is found (tests).
bool blas_switched_off() {
  static const bool off = std::getenv("ATTENTION_CTR_KERNELS_ATEN_GEMM") != nullptr;
  return off;
}

// Whether ATen's float32 brgemm (oneDNN's JIT micro-kernels, chosen by the CPU's instruction
// set) runs here: x86 builds of torch with oneDNN's ukernel API; it throws elsewhere.
// ATTENTION_CTR_KERNELS_NO_BRGEMM=1 keeps the matmuls on BLAS (tests, comparisons).
bool brgemm_available() {
  static const bool available = [] {
    if (std::getenv("ATTENTION_CTR_KERNELS_NO_BRGEMM") != nullptr || blas_switched_off()) {
      return false;
    }
    try {
      const float a[4] = {1, 2, 3, 4}, identity[4] = {1, 0, 0, 1};
      float c[4] = {0, 0, 0, 0};
      at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, identity, c, false);
      return c[0] == 1 && c[1] == 2 && c[2] == 3 && c[3] == 4;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return available;
}

// The transpose of rows [r0, rows) x columns [c0, columns) of src (row stride ld) into dst
// (row stride ld_dst), one output row at a time.
void transpose_rest(const float* __restrict__ src, int64_t r0, int64_t rows, int64_t c0,
                    int64_t columns, int64_t ld, float* __restrict__ dst, int64_t ld_dst) {
  for (int64_t c = c0; c < columns; ++c) {
    float* __restrict__ out = dst + c * ld_dst;
#pragma omp simd
    for (int64_t r = r0; r < rows; ++r) out[r] = src[r * ld + c];
  }
}

// dst [columns, rows] (contiguous) = the transpose of src [rows, columns] (row stride ld).
// With AVX, by 8 x 8 blocks transposed in registers (a strided gather per element took ~5% of
// DIEN's training step: the recurrences' and the head's weight gradients, x^T dL/dz).
void transpose_into(const float* __restrict__ src, int64_t rows, int64_t columns, int64_t ld,
                    float* __restrict__ dst) {
  int64_t full_rows = 0, full_columns = 0;  // the part done by blocks
#if defined(__AVX__)
  full_rows = rows / 8 * 8, full_columns = columns / 8 * 8;
  for (int64_t r = 0; r < full_rows; r += 8) {
    for (int64_t c = 0; c < full_columns; c += 8) {
      const float* in = src + r * ld + c;
      __m256 v[8], t[8];
      for (int k = 0; k < 8; ++k) v[k] = _mm256_loadu_ps(in + k * ld);
      for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(v[k], v[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(v[k], v[k + 1]);
      }
      for (int k = 0; k < 8; k += 4) {
        v[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
        v[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
        v[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
        v[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      float* out = dst + c * rows + r;
      for (int k = 0; k < 4; ++k) {
        _mm256_storeu_ps(out + k * rows, _mm256_permute2f128_ps(v[k], v[k + 4], 0x20));
        _mm256_storeu_ps(out + (k + 4) * rows, _mm256_permute2f128_ps(v[k], v[k + 4], 0x31));
      }
    }
  }
#endif
  transpose_rest(src, 0, full_rows, full_columns, columns, ld, dst, rows);  // right edge
  transpose_rest(src, full_rows, rows, 0, columns, ld, dst, rows);          // bottom rows
}

// The calling thread's scratch buffer `slot` (0 or 1), at least `count` floats.
float* thread_scratch(int slot, int64_t count) {
  thread_local std::vector<float> buffers[2];
  auto& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

// Row-major C [m, n] = op(A) op(B) + beta C, op(A) [m, k] (A^T of a [k, m] A with trans_a),
// op(B) [k, n], row strides lda, ldb, ldc. The recurrences call this hundreds of times per
// step on a thread's rows, single-threaded, so it skips ATen's tensor views and dispatch (~4 us
// of a ~20 us call at [128, 64] x [64, 192]): brgemm where it runs (beta 0 or 1), else BLAS.
// brgemm takes no transposes: a transposed operand is copied first, so the hot paths pass
// weights already transposed (`transposed`). MKL's sgemm ran these shapes at ~90 GFLOP/s per
// core on an AMD EPYC (Zen 5: MKL takes its AVX2 code off Intel), brgemm at ~215.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k > 0 && (beta == 0.f || beta == 1.f) && brgemm_available()) {
    if (trans_a) {  // stored [k, m]
      float* copy = thread_scratch(0, m * k);
      transpose_into(a, k, m, lda, copy);
      a = copy, lda = k;
    }
    if (trans_b) {  // stored [n, k]
      float* copy = thread_scratch(1, k * n);
      transpose_into(b, n, k, ldb, copy);
      b = copy, ldb = n;
    }
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, beta == 1.f, a, b, c, false);
    return;
  }
  static const bool use_blas = sgemm_ != nullptr && !blas_switched_off();
  if (use_blas) {  // BLAS is column-major: C^T = op(B)^T op(A)^T
    const int rows = static_cast<int>(n), columns = static_cast<int>(m);
    const int inner = static_cast<int>(k), ld_b = static_cast<int>(ldb);
    const int ld_a = static_cast<int>(lda), ld_c = static_cast<int>(ldc);
    const float one = 1.f;
    sgemm_(trans_b ? "T" : "N", trans_a ? "T" : "N", &rows, &columns, &inner, &one, b, &ld_b, a,
           &ld_a, &beta, c, &ld_c);
    return;
  }
  const auto options = at::TensorOptions().dtype(at::kFloat);
  auto matrix = [&](const float* data, bool trans, int64_t r, int64_t cols, int64_t ld) {
    auto stored = at::from_blob(const_cast<float*>(data), {trans ? cols : r, trans ? r : cols},
                                {ld, 1}, options);
    return trans ? stored.t() : stored;
  };
  auto out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  const auto left = matrix(a, trans_a, m, k, lda), right = matrix(b, trans_b, k, n, ldb);
  if (beta == 0.f) {
    at::mm_out(out, left, right);
  } else {
    out.mul_(beta).addmm_(left, right);
  }
}

// bfloat16 bits of x[0, n), rounded as torch rounds to bf16 (nearest even).
void to_bf16(int64_t n, const float* __restrict__ x, uint16_t* __restrict__ out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = c10::detail::round_to_nearest_even(x[i]);
}

// A float32 copy of bf16 operand rows (exact), for the ATen fallback of gemm_bf16.
std::vector<float> widened(const uint16_t* x, int64_t rows, int64_t columns, int64_t ld) {
  std::vector<float> out(rows == 0 ? 0 : (rows - 1) * ld + columns);
  for (size_t i = 0; i < out.size(); ++i) out[i] = c10::detail::f32_from_bits(x[i]);
  return out;
}

// As gemm, with bfloat16 operands (rounded by to_bf16) and float32 accumulation and output:
// MKL's gemm_bf16bf16f32, else (no such symbol, or the switch above) the operands widened to
// float32, which computes the same products. Not brgemm: oneDNN's bf16 micro-kernels need AMX
// (cpublas::could_pack(kBFloat16) is false on an AMD EPYC with AVX512-BF16).
void gemm_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const uint16_t* a,
               int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  static const bool use_mkl = gemm_bf16bf16f32 != nullptr && !blas_switched_off();
  if (use_mkl) {
    const int rows = static_cast<int>(n), columns = static_cast<int>(m);
    const int inner = static_cast<int>(k), ld_b = static_cast<int>(ldb);
    const int ld_a = static_cast<int>(lda), ld_c = static_cast<int>(ldc);
    const float one = 1.f;
    gemm_bf16bf16f32(trans_b ? "T" : "N", trans_a ? "T" : "N", &rows, &columns, &inner, &one, b,
                     &ld_b, a, &ld_a, &beta, c, &ld_c);
    return;
  }
  const auto left = widened(a, trans_a ? k : m, trans_a ? m : k, lda);
  const auto right = widened(b, trans_b ? n : k, trans_b ? k : n, ldb);
  gemm(trans_a, trans_b, m, n, k, left.data(), lda, right.data(), ldb, beta, c, ldc);
}

// gemm, or gemm_bf16 on the operands' bf16 copies a16 and b16 (same layout as a and b).
void mixed_gemm(bool bf16, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                const float* a, const uint16_t* a16, int64_t lda, const float* b,
                const uint16_t* b16, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (bf16) {
    gemm_bf16(trans_a, trans_b, m, n, k, a16, lda, b16, ldb, beta, c, ldc);
  } else {
    gemm(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
  }
}

// MKL builds a bf16 matmul for each new shape: a count of rows that changes every step (the
// recurrences' running rows, a head's last block) would build one almost every call. The bf16
// paths round such counts up to a multiple of this, over zeroed rows, within their buffers.
constexpr int64_t kBf16RowStep = 16;

// n rounded up to a multiple of kBf16RowStep, at most `limit`.
int64_t bf16_rows(int64_t n, int64_t limit) {
  return std::min(limit, (n + kBf16RowStep - 1) / kBf16RowStep * kBf16RowStep);
}

// bf16 bits of rows [0, n) of x [., width] into out, rows [n, padded) zeroed.
void to_bf16_rows(int64_t n, int64_t padded, int64_t width, const float* __restrict__ x,
                  uint16_t* __restrict__ out) {
  to_bf16(n * width, x, out);
  std::memset(out + n * width, 0, (padded - n) * width * sizeof(uint16_t));
}

// Row `row` of a bf16 buffer of rows of `width` (null for the empty buffer of a float32 call).
uint16_t* bf16_row(std::vector<uint16_t>& buffer, int64_t row, int64_t width) {
  return buffer.empty() ? nullptr : buffer.data() + row * width;
}

// A weight [r, c] as a contiguous [c, r]: the right-hand operand of x W^T without a transpose.
at::Tensor transposed(const at::Tensor& weight) { return weight.t().contiguous(); }

// A contiguous tensor's bf16 copy (empty unless bf16): a weight, rounded once per call.
std::vector<uint16_t> bf16_copy(const at::Tensor& x, bool bf16) {
  std::vector<uint16_t> out(bf16 ? x.numel() : 0);
  if (bf16) to_bf16(x.numel(), x.data_ptr<float>(), out.data());
  return out;
}

// Asks for the cache lines of `count` floats from p on (a hint: it never faults). The time
// loops read and write their [B, L, .] tensors a row's step at a time, rows apart in the
// caller's order, which the hardware prefetchers do not follow: without this, the first touch
// of each row waits on memory (half of the backward's own time in the GRU's upstream rows).
inline void prefetch_floats(const float* p, int64_t count, bool write = false) {
  for (int64_t k = 0; k < count; k += 16) {
    if (write) {
      __builtin_prefetch(p + k, 1);
    } else {
      __builtin_prefetch(p + k);
    }
  }
}

// dst[0, count) = src[0, count), with non-temporal stores on dst's 64-byte-aligned lines
// where the CPU has them: for what is written once and read back only in the backward (the
// recurrences' saved gates, 4 x the states). An ordinary store that misses reads the line in
// first and evicts the loop's working set; these go around the caches (11% off the GRU's
// forward). The caller ends its pass with `stream_fence`.
inline void stream_floats(float* __restrict__ dst, const float* __restrict__ src, int64_t count) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i < count && (reinterpret_cast<uintptr_t>(dst + i) & 63); ++i) dst[i] = src[i];
  for (; i + 16 <= count; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#elif defined(__AVX__)
  for (; i < count && (reinterpret_cast<uintptr_t>(dst + i) & 31); ++i) dst[i] = src[i];
  for (; i + 8 <= count; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#endif
  for (; i < count; ++i) dst[i] = src[i];
}

// Orders the streamed stores before anything later (they are weakly ordered).
inline void stream_fence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// The recurrences' internal row order: rows sorted by length, longest first (stable), then
// dealt round-robin to the chunks of `chunk` rows. The chunks share the work evenly,
// and in each chunk the rows still running at step t are a prefix: one matmul on them. ->
// order [B] (order[p] = the caller's row at internal position p) and each position's length.
std::pair<at::Tensor, std::vector<int64_t>> internal_order(const at::Tensor& lengths_in,
                                                           int64_t batch, int64_t length,
                                                           int64_t chunk) {
  auto order = at::empty({batch}, at::TensorOptions().dtype(at::kLong));
  int64_t* o = order.data_ptr<int64_t>();
  std::vector<int64_t> steps(batch, length);
  if (lengths_in.numel() == 0) {  // every row runs all L steps
    std::iota(o, o + batch, int64_t{0});
    return {order, steps};
  }
  TORCH_CHECK(lengths_in.dim() == 1 && lengths_in.numel() == batch,
              "attention_ctr CPU kernels: lengths must be [B] = [", batch, "], got ",
              lengths_in.sizes());
  const auto lengths = lengths_in.to(at::kLong).contiguous();
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(len[b] >= 0 && len[b] <= length, "attention_ctr CPU kernels: row ", b,
                "'s length ", len[b], " is outside [0, L = ", length, "]");
  }
  std::vector<int64_t> sorted(batch);
  std::iota(sorted.begin(), sorted.end(), int64_t{0});
  std::stable_sort(sorted.begin(), sorted.end(),
                   [len](int64_t i, int64_t j) { return len[i] > len[j]; });
  const int64_t parts = (batch + chunk - 1) / chunk;
  std::vector<int64_t> filled(parts, 0);
  int64_t part = 0;
  for (const int64_t row : sorted) {
    while (filled[part] == std::min(chunk, batch - part * chunk)) part = (part + 1) % parts;
    const int64_t p = part * chunk + filled[part]++;
    o[p] = row;
    steps[p] = len[row];
    part = (part + 1) % parts;
  }
  return {order, steps};
}

// Step t for the running rows at internal positions [begin, end). projected = this step's
// W_i x_t (no bias) [B, 3H], bias_ih b_i [3H], hidden = U h_{t-1} [B, 3H], bias_hh b_h, states
// [L+1, B, H] and saved [L, B, 4, H] = r_t, the update gate (u_t AUGRU, z_t GRU),
// U_n h_{t-1} + b_hn, h~_t: all in internal order. attention [B, L] (AUGRU: kAugru) and output
// [B, L, H] (written with kOutput) are in the caller's order.
template <bool kAugru, bool kOutput>
void forward_rows(int64_t begin, int64_t end, int64_t t, int64_t batch, int64_t length,
                  int64_t size, const int64_t* __restrict__ order,
                  const float* __restrict__ projected, const float* __restrict__ bias_ih,
                  const float* __restrict__ hidden, const float* __restrict__ bias_hh,
                  const float* __restrict__ attention, float* __restrict__ states,
                  float* __restrict__ saved, float* __restrict__ output,
                  float* __restrict__ gates_row) {
  const int64_t gates = 3 * size;
  for (int64_t p = begin; p < end; ++p) {
    const int64_t b = order[p];
    const float* __restrict__ x = projected + p * gates;
    const float* __restrict__ g = hidden + p * gates;
    const float* __restrict__ h = states + (t * batch + p) * size;
    float* __restrict__ h_next = states + ((t + 1) * batch + p) * size;
    float* __restrict__ s = saved + (t * batch + p) * 4 * size;
    float* __restrict__ out = kOutput ? output + (b * length + t) * size : nullptr;
    if (kOutput && t + 1 < length) prefetch_floats(out + size, size, true);  // its next step
    const float a = kAugru ? attention[b * length + t] : 0.f;
#pragma omp simd
    for (int64_t j = 0; j < size; ++j) {
      const float reset = fast_sigmoid(x[j] + bias_ih[j] + g[j] + bias_hh[j]);
      const float gate =
          fast_sigmoid(x[size + j] + bias_ih[size + j] + g[size + j] + bias_hh[size + j]);
      const float hidden_n = g[2 * size + j] + bias_hh[2 * size + j];
      const float candidate = fast_tanh(x[2 * size + j] + bias_ih[2 * size + j] + reset * hidden_n);
      gates_row[j] = reset;
      gates_row[size + j] = gate;
      gates_row[2 * size + j] = hidden_n;
      gates_row[3 * size + j] = candidate;
      // AUGRU: h_t = h_{t-1} + a_t u_t (h~_t - h_{t-1}); GRU: h_t = h~_t + z_t (h_{t-1} - h~_t)
      const float next = kAugru ? h[j] + a * gate * (candidate - h[j])
                                : candidate + gate * (h[j] - candidate);
      h_next[j] = next;
      if (kOutput) out[j] = next;
    }
    stream_floats(s, gates_row, 4 * size);  // staged in gates_row [4H], then streamed out
  }
  stream_fence();
}

// Backward of step t for the running rows at internal positions [begin, end). grad = dL/dh_t
// = carry + upstream_t (the caller's row b, step t at b * up_row + t * up_step; without
// kUpstream none: the final state's gradient was the initial carry). Writes this step's
// dL/dprojected_t and dL/dhidden_t [B, 3H] (for the input's and U's gradients), dL/da_t, and
// replaces carry by grad (1 - update): dL/dh_{t-1} = that + dL/dhidden_t U (the gemm after this).
// Adds the rows' dL/dprojected and dL/dhidden to `bias_sums` [2, 3H] (the gradients of b_i, b_h).
template <bool kAugru, bool kUpstream>
void backward_rows(int64_t begin, int64_t end, int64_t t, int64_t batch, int64_t length,
                   int64_t size, const int64_t* __restrict__ order,
                   const float* __restrict__ upstream, int64_t up_row, int64_t up_step,
                   const float* __restrict__ states, const float* __restrict__ saved,
                   const float* __restrict__ attention, float* __restrict__ carry,
                   float* __restrict__ d_projected,
                   float* __restrict__ d_hidden, float* __restrict__ d_attention,
                   float* __restrict__ bias_sums) {
  const int64_t gates = 3 * size;
  for (int64_t p = begin; p < end; ++p) {
    const int64_t b = order[p];
    const float* __restrict__ up = kUpstream ? upstream + b * up_row + t * up_step : nullptr;
    if (kUpstream && t > 0) prefetch_floats(up - up_step, size);  // this row's next step (t - 1)
    const float* __restrict__ previous = states + (t * batch + p) * size;
    const float* __restrict__ s = saved + (t * batch + p) * 4 * size;
    if (t > 0) {  // the row's saved gates and state of step t - 1, in memory (streamed out)
      prefetch_floats(s - batch * 4 * size, 4 * size);  // 10% off the backward at batch 2048
      prefetch_floats(previous - batch * size, size);
    }
    float* __restrict__ c = carry + p * size;  // read, then replaced, element by element
    float* __restrict__ dp = d_projected + p * gates;  // this step's, [B, 3H]
    float* __restrict__ dh = d_hidden + p * gates;     // this step's, [B, 3H]
    const float a = kAugru ? attention[b * length + t] : 0.f;
    float* __restrict__ d_bias_ih = bias_sums;
    float* __restrict__ d_bias_hh = bias_sums + gates;  // its r and update parts equal b_i's
    float d_a = 0.f;
#pragma omp simd reduction(+ : d_a)
    for (int64_t j = 0; j < size; ++j) {
      const float grad = kUpstream ? c[j] + up[j] : c[j];
      const float reset = s[j], gate = s[size + j], hidden_n = s[2 * size + j];
      const float candidate = s[3 * size + j];
      const float change = candidate - previous[j];  // h~_t - h_{t-1}
      const float slope = gate * (1.f - gate);
      const float update = kAugru ? a * gate : 1.f - gate;
      const float d_gate = kAugru ? grad * change * a * slope : -grad * change * slope;
      const float d_candidate = grad * update * (1.f - candidate * candidate);
      const float d_reset = d_candidate * hidden_n * reset * (1.f - reset);
      d_a += grad * change * gate;
      dp[j] = d_reset;
      dp[size + j] = d_gate;
      dp[2 * size + j] = d_candidate;
      dh[j] = d_reset;
      dh[size + j] = d_gate;
      dh[2 * size + j] = d_candidate * reset;
      c[j] = grad * (1.f - update);
      d_bias_ih[j] += d_reset;
      d_bias_ih[size + j] += d_gate;
      d_bias_ih[2 * size + j] += d_candidate;
      d_bias_hh[2 * size + j] += d_candidate * reset;
    }
    if (kAugru) d_attention[b * length + t] = d_a;
  }
}

void check(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "attention_ctr CPU kernels: ",
              op, " takes float32 CPU tensors, got ", x.scalar_type(), " on ", x.device());
}

// The rows' inputs need only a unit stride along their last dimension (views such as DIEN's
// history, a slice of one embedding, are read in place).
at::Tensor unit_last_stride(const at::Tensor& x) {
  return x.stride(-1) == 1 ? x : x.contiguous();
}

// Copies step t of the running rows' inputs (internal positions [begin, begin + n)) into
// `rows` [n, I]: the matmul's operand. Prefetches the same rows' step `next` (-1: none).
void gather_step(const float* __restrict__ x, int64_t x_row, int64_t x_step, int64_t inputs,
                 const int64_t* __restrict__ order, int64_t begin, int64_t n, int64_t t,
                 float* __restrict__ rows, int64_t next) {
  for (int64_t i = 0; i < n; ++i) {
    const float* row = x + order[begin + i] * x_row;
    std::memcpy(rows + i * inputs, row + t * x_step, inputs * sizeof(float));
    if (next >= 0) prefetch_floats(row + next * x_step, inputs);
  }
}

// x [B, L, I], weight_ih W_i [3H, I], bias_ih b_i [3H], weight U [3H, H], bias b_h [3H],
// attention [B, L] (empty: GRU), lengths [B] (empty: all L) -> output [B, L, H] (final_only:
// each row's last state [B, H]), and for the backward the internal states [L + 1, B, H]
// (h_0 = 0), saved [L, B, 4, H] and order [B].
// Each step's input projection W_i x_t is computed in the loop, for the running rows only: a
// row stops at its length, and its later outputs repeat its last state. With bf16, the matmuls
// take their operands (x_t, h_{t-1} and the weights) rounded to bfloat16 and accumulate in
// float32, as under bf16 autocast; the states and gates stay float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_forward(
    const at::Tensor& x_in, const at::Tensor& weight_ih_in, const at::Tensor& bias_ih,
    const at::Tensor& weight_in, const at::Tensor& bias, const at::Tensor& attention_in,
    const at::Tensor& lengths, bool final_only, bool bf16) {
  for (const auto* x : {&x_in, &weight_ih_in, &bias_ih, &weight_in, &bias, &attention_in}) {
    check(*x, "gated_forward");
  }
  const auto x = unit_last_stride(x_in);
  const auto weight_ih = weight_ih_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto attention = attention_in.contiguous();
  TORCH_CHECK(x.dim() == 3, "attention_ctr CPU kernels: gated_forward's x must be [B, L, I]");
  const int64_t batch = x.size(0), length = x.size(1), inputs = x.size(2);
  const int64_t size = weight.size(1), gates = 3 * size;
  TORCH_CHECK(weight_ih.size(0) == gates && weight_ih.size(1) == inputs &&
                  weight.size(0) == gates && bias_ih.numel() == gates && bias.numel() == gates,
              "attention_ctr CPU kernels: gated_forward's x [B, L, I], weight_ih [3H, I], "
              "weight [3H, H] and biases [3H] disagree");
  const bool augru = attention.numel() > 0;
  const int64_t chunk = rows_per_chunk(batch);
  const auto internal = internal_order(lengths, batch, length, chunk);
  const at::Tensor& order = internal.first;
  const std::vector<int64_t>& steps = internal.second;
  auto output = final_only ? at::empty({batch, size}, x.options())
                           : at::empty({batch, length, size}, x.options());
  auto states = at::empty({length + 1, batch, size}, x.options());
  states[0].zero_();  // h_0; a running row's later states are written by its steps
  auto saved = at::empty({length, batch, 4, size}, x.options());
  auto projected = at::empty({batch, gates}, x.options());  // one step's W_i x_t
  auto hidden = at::empty({batch, gates}, x.options());     // one step's U h_{t-1}
  auto x_rows = at::empty({batch, inputs}, x.options());    // one step's inputs, in order
  const auto wi_t = transposed(weight_ih), u_t = transposed(weight);  // [I, 3H], [H, 3H]
  const auto wi16 = bf16_copy(wi_t, bf16), u16 = bf16_copy(u_t, bf16);
  std::vector<uint16_t> x16(bf16 ? batch * inputs : 0), h16(bf16 ? batch * size : 0);
  const int64_t* o = order.data_ptr<int64_t>();
  const float* xp = x.data_ptr<float>();
  const int64_t x_row = x.stride(0), x_step = x.stride(1);
  const float* wi = wi_t.data_ptr<float>();
  const float* u = u_t.data_ptr<float>();
  float* p = projected.data_ptr<float>();
  const float* bi = bias_ih.data_ptr<float>();
  float* g = hidden.data_ptr<float>();
  const float* bh = bias.data_ptr<float>();
  const float* a = augru ? attention.data_ptr<float>() : nullptr;
  float* h = states.data_ptr<float>();
  float* s = saved.data_ptr<float>();
  float* out = output.data_ptr<float>();
  float* xr = x_rows.data_ptr<float>();
  // One instance per case (AUGRU or GRU, outputs written or not): a test of either inside the
  // elementwise loop cost ~10% of the forward at batch 2048.
  using RowsForward = decltype(&forward_rows<true, true>);
  const RowsForward variants[2][2] = {{forward_rows<false, false>, forward_rows<false, true>},
                                      {forward_rows<true, false>, forward_rows<true, true>}};
  const RowsForward rows_forward = variants[augru][!final_only];
  // Rows are independent: each chunk runs the whole time loop on its own rows (its matmuls
  // single-threaded inside the parallel region), with no synchronisation between steps.
  at::parallel_for(0, (batch + chunk - 1) / chunk, 1, [&](int64_t first, int64_t last) {
    std::vector<float> gates_row(4 * size);  // one row's saved gates, before streaming
    for (int64_t c = first; c < last; ++c) {
      const int64_t begin = c * chunk, end = std::min(batch, begin + chunk);
      int64_t running = end - begin;
      for (int64_t t = 0; t < length; ++t) {
        while (running > 0 && steps[begin + running - 1] <= t) --running;
        if (running > 0) {
          float* x_t = xr + begin * inputs;
          const float* h_t = h + (t * batch + begin) * size;
          uint16_t* x_t16 = bf16_row(x16, begin, inputs);
          uint16_t* h_t16 = bf16_row(h16, begin, size);
          // bf16: the matmuls run on `rows` >= running rows (zeroed beyond; see kBf16RowStep)
          const int64_t rows = bf16 ? bf16_rows(running, end - begin) : running;
          gather_step(xp, x_row, x_step, inputs, o, begin, running, t, x_t,
                      t + 1 < length ? t + 1 : -1);
          if (bf16) {
            to_bf16_rows(running, rows, inputs, x_t, x_t16);
            to_bf16_rows(running, rows, size, h_t, h_t16);
          }
          mixed_gemm(bf16, false, false, rows, gates, inputs, x_t, x_t16, inputs, wi, wi16.data(),
                     gates, 0.f, p + begin * gates, gates);
          mixed_gemm(bf16, false, false, rows, gates, size, h_t, h_t16, size, u, u16.data(), gates,
                     0.f, g + begin * gates, gates);
          rows_forward(begin, begin + running, t, batch, length, size, o, p, bi, g, bh, a, h, s,
                       out, gates_row.data());
        }
        if (final_only) continue;
        for (int64_t q = begin + running; q < end; ++q) {  // ended rows keep their last state
          float* row_out = out + (o[q] * length + t) * size;
          if (t == 0) {
            std::memset(row_out, 0, size * sizeof(float));
          } else {
            std::memcpy(row_out, row_out - size, size * sizeof(float));
          }
        }
      }
      if (final_only) {  // the state after each row's last step (h_0 for an empty row)
        for (int64_t q = begin; q < end; ++q) {
          std::memcpy(out + o[q] * size, h + (steps[q] * batch + q) * size, size * sizeof(float));
        }
      }
    }
  });
  return {output, states, saved, order};
}

// upstream dL/doutput [B, L, H] (or [B, H] for final_only's output) -> dL/dx [B, L, I], dL/dW_i [3H, I], dL/dU [3H, H], dL/da
// [B, L] (empty for the GRU), dL/db_i [3H], dL/db_h [3H]. Per step and thread, dL/dx_t =
// dL/dprojected_t W_i and the weight gradients' terms are taken while this step's gradients are
// in cache (the weight terms summed per thread, then in order), so no [L, B, 3H] gradient is
// ever written. An ended row's outputs are its last state, so their gradients flow to it.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gated_backward(const at::Tensor& upstream_in, const at::Tensor& x_in, const at::Tensor& states,
               const at::Tensor& saved, const at::Tensor& order, const at::Tensor& lengths,
               const at::Tensor& weight_ih_in, const at::Tensor& weight_in,
               const at::Tensor& attention_in, bool bf16) {
  for (const auto* x : {&upstream_in, &x_in, &states, &saved, &weight_ih_in, &weight_in,
                        &attention_in}) {
    check(*x, "gated_backward");
  }
  const auto upstream = unit_last_stride(upstream_in);
  const auto x = unit_last_stride(x_in);
  const auto weight_ih = weight_ih_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto attention = attention_in.contiguous();
  const int64_t length = saved.size(0), batch = saved.size(1), size = saved.size(3);
  const int64_t gates = 3 * size, inputs = x.size(2);
  const bool augru = attention.numel() > 0;
  const bool final_only = upstream.dim() == 2;
  const int64_t* o = order.data_ptr<int64_t>();
  std::vector<int64_t> steps(batch, length);
  if (lengths.numel()) {
    const auto lengths_long = lengths.to(at::kLong).contiguous();
    const int64_t* len = lengths_long.data_ptr<int64_t>();
    for (int64_t q = 0; q < batch; ++q) steps[q] = len[o[q]];
  }
  // Blocks of kRowsPerTask rows, each with its own bias sums (added up in block order).
  const int64_t blocks = (batch + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t chunk = rows_per_chunk(batch);  // a multiple of kRowsPerTask
  const int64_t parts = (batch + chunk - 1) / chunk;
  auto d_x = at::empty({batch, length, inputs}, upstream.options());
  auto d_projected = at::empty({batch, gates}, upstream.options());  // one step's
  auto d_hidden = at::empty({batch, gates}, upstream.options());     // one step's
  auto d_attention = at::empty({augru ? batch : 0, length}, upstream.options());
  auto bias_sums = at::zeros({blocks, 2, gates}, upstream.options());
  // dL/dh_t carried back: the final state's gradient to start with (final_only), else zero
  auto carry = final_only ? upstream.index_select(0, order) : at::zeros({batch, size}, upstream.options());
  auto x_rows = at::empty({batch, inputs}, upstream.options());    // one step's, in order
  auto d_x_rows = at::empty({batch, inputs}, upstream.options());  // one step's, in order
  // the weights' gradients transposed, dL/dW^T = x^T dL/dprojected: brgemm's transposed
  // operand (see gemm) is then x_t or h_{t-1} [rows, I or H], a third of dL/dprojected_t
  auto weight_ih_sums = at::zeros({parts, inputs, gates}, upstream.options());
  auto weight_sums = at::zeros({parts, size, gates}, upstream.options());
  // bf16: the matmuls' operands rounded to bfloat16 (the gradients too, as autocast's backward)
  const auto wi16 = bf16_copy(weight_ih, bf16), u16 = bf16_copy(weight, bf16);
  std::vector<uint16_t> x16(bf16 ? batch * inputs : 0), h16(bf16 ? batch * size : 0);
  std::vector<uint16_t> dp16(bf16 ? batch * gates : 0), dh16(bf16 ? batch * gates : 0);
  const float* up = upstream.data_ptr<float>();
  const int64_t up_row = upstream.stride(0), up_step = upstream.stride(1);
  const float* xp = x.data_ptr<float>();
  const int64_t x_row = x.stride(0), x_step = x.stride(1);
  const float* wi = weight_ih.data_ptr<float>();
  const float* u = weight.data_ptr<float>();
  const float* h = states.data_ptr<float>();
  const float* s = saved.data_ptr<float>();
  const float* a = augru ? attention.data_ptr<float>() : nullptr;
  float* c = carry.data_ptr<float>();
  float* dp = d_projected.data_ptr<float>();
  float* dh = d_hidden.data_ptr<float>();
  float* dx = d_x.data_ptr<float>();
  float* da = augru ? d_attention.data_ptr<float>() : nullptr;
  float* sums = bias_sums.data_ptr<float>();
  float* xr = x_rows.data_ptr<float>();
  float* dxr = d_x_rows.data_ptr<float>();
  float* dwi = weight_ih_sums.data_ptr<float>();
  float* dw = weight_sums.data_ptr<float>();
  // One instance per case (AUGRU or GRU, per-step upstream gradients or the final state's):
  // a test of either inside the elementwise loop made the AUGRU's backward 1.4x as slow.
  using RowsBackward = decltype(&backward_rows<true, true>);
  const RowsBackward variants[2][2] = {{backward_rows<false, false>, backward_rows<false, true>},
                                       {backward_rows<true, false>, backward_rows<true, true>}};
  const RowsBackward rows_backward = variants[augru][!final_only];
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t part = first; part < last; ++part) {
      const int64_t begin = part * chunk, end = std::min(batch, begin + chunk);
      float* d_weight_ih = dwi + part * inputs * gates;  // transposed, [I, 3H]
      float* d_weight = dw + part * size * gates;        // transposed, [H, 3H]
      int64_t running = 0;
      for (int64_t t = length - 1; t >= 0; --t) {
        while (begin + running < end && steps[begin + running] > t) ++running;
        for (int64_t q = begin + running; q < end; ++q) {  // ended: output_t is its last state
          const int64_t b = o[q];
          if (!final_only) {
            const float* up_q = up + b * up_row + t * up_step;
            float* carry_q = c + q * size;
            for (int64_t j = 0; j < size; ++j) carry_q[j] += up_q[j];
          }
          std::memset(dx + (b * length + t) * inputs, 0, inputs * sizeof(float));
          if (augru) da[b * length + t] = 0.f;
        }
        if (running == 0) continue;
        for (int64_t row = begin; row < begin + running; row += kRowsPerTask) {
          rows_backward(row, std::min(begin + running, row + kRowsPerTask), t, batch, length,
                        size, o, up, up_row, up_step, h, s, a, c, dp, dh, da,
                        sums + row / kRowsPerTask * 2 * gates);
        }
        const float* dp_rows = dp + begin * gates;
        const float* dh_rows = dh + begin * gates;
        float* dx_rows = dxr + begin * inputs;
        float* x_step_rows = xr + begin * inputs;
        uint16_t* dp16_rows = bf16_row(dp16, begin, gates);
        uint16_t* dh16_rows = bf16_row(dh16, begin, gates);
        uint16_t* x16_rows = bf16_row(x16, begin, inputs);
        uint16_t* h16_rows = bf16_row(h16, begin, size);
        // bf16: the matmuls run on `rows` >= running rows, zeroed beyond, which add nothing
        const int64_t rows = bf16 ? bf16_rows(running, end - begin) : running;
        gather_step(xp, x_row, x_step, inputs, o, begin, running, t, x_step_rows, t - 1);
        if (bf16) {
          to_bf16_rows(running, rows, gates, dp_rows, dp16_rows);
          to_bf16_rows(running, rows, inputs, x_step_rows, x16_rows);
        }
        mixed_gemm(bf16, false, false, rows, inputs, gates, dp_rows, dp16_rows, gates, wi,
                   wi16.data(), inputs, 0.f, dx_rows, inputs);  // dL/dx_t = dL/dprojected_t W_i
        for (int64_t i = 0; i < running; ++i) {
          float* dx_row = dx + (o[begin + i] * length + t) * inputs;
          std::memcpy(dx_row, dx_rows + i * inputs, inputs * sizeof(float));
          if (t > 0) prefetch_floats(dx_row - inputs, inputs, true);
        }
        mixed_gemm(bf16, true, false, inputs, gates, rows, x_step_rows, x16_rows, inputs, dp_rows,
                   dp16_rows, gates, 1.f, d_weight_ih, gates);  // += x_t^T dL/dprojected_t
        if (t > 0) {  // h_0 = 0 adds nothing to U's gradient and has no gradient itself
          const float* h_rows = h + (t * batch + begin) * size;
          if (bf16) {
            to_bf16_rows(running, rows, gates, dh_rows, dh16_rows);
            to_bf16_rows(running, rows, size, h_rows, h16_rows);
          }
          mixed_gemm(bf16, true, false, size, gates, rows, h_rows, h16_rows, size, dh_rows,
                     dh16_rows, gates, 1.f, d_weight, gates);  // += h_{t-1}^T dL/dhidden_t
          // dL/dh_{t-1} = carry (now grad (1 - update)) + dL/dhidden_t U (0 on the zeroed rows)
          mixed_gemm(bf16, false, false, rows, size, gates, dh_rows, dh16_rows, gates, u,
                     u16.data(), size, 1.f, c + begin * size, size);
        }
      }
    }
  });
  auto total = bias_sums.sum(0);  // [2, 3H]
  auto d_bias_hh = total[1];
  d_bias_hh.narrow(0, 0, 2 * size).copy_(total[0].narrow(0, 0, 2 * size));
  return {d_x, transposed(weight_ih_sums.sum(0)), transposed(weight_sums.sum(0)), d_attention,
          total[0], d_bias_hh};
}

// Which matmuls the kernels run: "brgemm", "blas" or "aten".
std::string matmul_backend() {
  if (brgemm_available()) return "brgemm";
  return sgemm_ != nullptr && !blas_switched_off() ? "blas" : "aten";
}

}  // namespace

TORCH_LIBRARY(attention_ctr_kernels, m) {
  m.def("matmul_backend() -> str", &matmul_backend);
  m.def("gated_forward(Tensor x, Tensor weight_ih, Tensor bias_ih, Tensor weight, Tensor bias,"
        " Tensor attention, Tensor lengths, bool final_only, bool bf16)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_backward(Tensor upstream, Tensor x, Tensor states, Tensor saved, Tensor order,"
        " Tensor lengths, Tensor weight_ih, Tensor weight, Tensor attention, bool bf16)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(attention_ctr_kernels, CPU, m) {
  m.impl("gated_forward", &gated_forward);
  m.impl("gated_backward", &gated_backward);
}

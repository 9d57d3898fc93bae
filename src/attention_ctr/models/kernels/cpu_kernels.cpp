// Fused CPU kernels for training (see cpu_kernels.py): the GRU / AUGRU recurrence and PReLU.
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
// stay in L2 (larger chunks ran slower per row).
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
// With AVX, by 8 x 8 blocks transposed in registers (a strided gather per element was a
// visible share of DIEN's training step: the recurrences' and the head's weight gradients,
// x^T dL/dz).
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
// step on a thread's rows, single-threaded, so it skips ATen's tensor views and dispatch (a
// large share of a call at these small shapes): brgemm where it runs (beta 0 or 1), else BLAS.
// brgemm takes no transposes: a transposed operand is copied first, so the hot paths pass
// weights already transposed (`transposed`). MKL's sgemm is far slower than brgemm at these
// shapes on AMD CPUs (MKL takes its AVX2 code off Intel).
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
// first and evicts the loop's working set; these go around the caches. The caller ends its
// pass with `stream_fence`.
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
      prefetch_floats(s - batch * 4 * size, 4 * size);  // hides the backward's memory stalls
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
  // elementwise loop slowed the forward.
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
  // a test of either inside the elementwise loop slowed the AUGRU's backward.
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

constexpr int64_t kRowsPerBlock = 256;  // column sums: fixed row blocks, summed in order

// sum = part (first) or sum += part, over `count` values.
void add_into(int64_t count, const float* __restrict__ part, float* __restrict__ sum,
              bool first) {
  if (first) {
    std::memcpy(sum, part, count * sizeof(float));
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) sum[i] += part[i];
}

inline float prelu(float x, float slope) { return x > 0.f ? x : slope * x; }

// Column sums of `width` values a backward pass adds up over rows: each block of
// kRowsPerBlock rows adds into its own row of a [blocks, width] buffer (accumulate(first,
// last, sums)), and the blocks are summed in order, so the result does not depend on threads.
template <typename Accumulate>
at::Tensor block_sums(int64_t rows, int64_t width, const at::TensorOptions& options,
                      const Accumulate& accumulate) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  auto partial = at::zeros({blocks, width}, options);
  float* sums = partial.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * kRowsPerBlock;
      accumulate(first, std::min(rows, first + kRowsPerBlock), sums + block * width);
    }
  });
  return partial.sum(0);
}

void bias_prelu_rows(int64_t begin, int64_t end, int64_t columns, int64_t period,
                     int64_t row_offset, const float* __restrict__ z, const float* __restrict__ bias,
                     const float* __restrict__ slope, const float* __restrict__ addend,
                     float* __restrict__ h, float* __restrict__ out) {
  for (int64_t r = begin; r < end; ++r) {
    const float* __restrict__ zr = z + r * columns;
    float* __restrict__ hr = h + r * columns;
    float* __restrict__ outr = out + r * columns;
    if (addend) {
      const float* __restrict__ ar = addend + ((row_offset + r) % period) * columns;
#pragma omp simd
      for (int64_t c = 0; c < columns; ++c) {
        const float x = zr[c] + bias[c] + ar[c];
        hr[c] = x;
        outr[c] = prelu(x, slope[c]);
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < columns; ++c) {
        const float x = zr[c] + bias[c];
        hr[c] = x;
        outr[c] = prelu(x, slope[c]);
      }
    }
  }
}

// Rows [begin, end) of the PReLU backward; adds this block's column sums to d_bias, d_slope.
void prelu_backward_rows(int64_t begin, int64_t end, int64_t columns,
                         const float* __restrict__ grad, const float* __restrict__ h,
                         const float* __restrict__ slope, float* __restrict__ dz,
                         float* __restrict__ d_bias, float* __restrict__ d_slope) {
  for (int64_t r = begin; r < end; ++r) {
    const float* __restrict__ gr = grad + r * columns;
    const float* __restrict__ hr = h + r * columns;
    float* __restrict__ dr = dz + r * columns;
#pragma omp simd
    for (int64_t c = 0; c < columns; ++c) {
      const bool positive = hr[c] > 0.f;
      const float d = positive ? gr[c] : slope[c] * gr[c];
      dr[c] = d;
      d_bias[c] += d;
      d_slope[c] += positive ? 0.f : gr[c] * hr[c];
    }
  }
}

void prelu_linear_rows(int64_t begin, int64_t end, int64_t columns,
                       const float* __restrict__ z, const float* __restrict__ bias,
                       const float* __restrict__ slope, const float* __restrict__ out_weight,
                       float out_bias, float* __restrict__ h, float* __restrict__ logits) {
  for (int64_t r = begin; r < end; ++r) {
    const float* __restrict__ zr = z + r * columns;
    float* __restrict__ hr = h + r * columns;
    float logit = 0.f;
#pragma omp simd reduction(+ : logit)
    for (int64_t c = 0; c < columns; ++c) {
      const float x = zr[c] + bias[c];
      hr[c] = x;
      logit += prelu(x, slope[c]) * out_weight[c];
    }
    logits[r] = logit + out_bias;
  }
}

// Rows [begin, end) of prelu_linear_backward; `sums` [3C + 1] gets this block's dL/dbias,
// dL/dslope, dL/dw_out and dL/db_out.
void prelu_linear_backward_rows(int64_t begin, int64_t end, int64_t columns,
                                const float* __restrict__ grad, const float* __restrict__ h,
                                const float* __restrict__ slope,
                                const float* __restrict__ out_weight, float* __restrict__ dz,
                                float* __restrict__ sums) {
  float* __restrict__ d_bias = sums;
  float* __restrict__ d_slope = sums + columns;
  float* __restrict__ d_out_weight = sums + 2 * columns;
  float d_out_bias = 0.f;
  for (int64_t r = begin; r < end; ++r) {
    const float g = grad[r];
    const float* __restrict__ hr = h + r * columns;
    float* __restrict__ dr = dz + r * columns;
    d_out_bias += g;
#pragma omp simd
    for (int64_t c = 0; c < columns; ++c) {
      const bool positive = hr[c] > 0.f;
      const float d_activation = g * out_weight[c];
      const float d = positive ? d_activation : slope[c] * d_activation;
      dr[c] = d;
      d_bias[c] += d;
      d_slope[c] += positive ? 0.f : d_activation * hr[c];
      d_out_weight[c] += g * prelu(hr[c], slope[c]);
    }
  }
  sums[3 * columns] += d_out_bias;
}

// out = PReLU(z + bias + addend[r % M]) for z [R, C], bias and slope [C], addend [M, C] with
// R a multiple of M (or empty): the Linear's bias and a broadcast sum fused into one pass.
// -> (out, h = the PReLU's input, saved for the backward).
std::tuple<at::Tensor, at::Tensor> bias_prelu_forward(const at::Tensor& z_in,
                                                      const at::Tensor& bias,
                                                      const at::Tensor& slope,
                                                      const at::Tensor& addend_in) {
  for (const auto* x : {&z_in, &bias, &slope, &addend_in}) check(*x, "bias_prelu_forward");
  const auto z = z_in.contiguous();
  const auto addend = addend_in.contiguous();
  const int64_t rows = z.size(0), columns = z.size(1);
  const int64_t period = addend.numel() ? addend.size(0) : 0;
  TORCH_CHECK(!period || (rows % period == 0 && addend.size(1) == columns),
              "bias_prelu_forward: addend [M, C] must tile z [R, C]");
  auto out = at::empty_like(z);
  auto h = at::empty_like(z);
  const float* zp = z.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const float* sp = slope.data_ptr<float>();
  const float* ap = period ? addend.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    bias_prelu_rows(begin, end, columns, period, 0, zp, bp, sp, ap, hp, op);
  });
  return {out, h};
}

// Backward of bias_prelu_forward: -> (dL/dz [R, C], dL/dbias [C], dL/dslope [C],
// dL/daddend [M, C] (summed over the rows that share it; empty without an addend)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bias_prelu_backward(
    const at::Tensor& grad_in, const at::Tensor& h, const at::Tensor& slope, int64_t period) {
  for (const auto* x : {&grad_in, &h, &slope}) check(*x, "bias_prelu_backward");
  const auto grad = grad_in.contiguous();
  const int64_t rows = h.size(0), columns = h.size(1);
  auto dz = at::empty_like(h);
  const float* gp = grad.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const float* sp = slope.data_ptr<float>();
  float* dp = dz.data_ptr<float>();
  if (!period) {
    auto sums = block_sums(rows, 2 * columns, h.options(), [&](int64_t first, int64_t last,
                                                               float* d_bias) {
      prelu_backward_rows(first, last, columns, gp, hp, sp, dp, d_bias, d_bias + columns);
    });  // [d bias, d slope]
    return {dz, sums.narrow(0, 0, columns), sums.narrow(0, columns, columns),
            at::empty({0, columns}, h.options())};
  }
  // Blocks of addend rows, each with all its tiles' rows: dL/daddend is summed while the
  // block's dL/dz is still in cache.
  const int64_t tiles = rows / period;
  auto d_addend = at::empty({period, columns}, h.options());
  float* da = d_addend.data_ptr<float>();
  auto sums = block_sums(period, 2 * columns, h.options(), [&](int64_t first, int64_t last,
                                                               float* d_bias) {
    for (int64_t tile = 0; tile < tiles; ++tile) {
      prelu_backward_rows(tile * period + first, tile * period + last, columns, gp, hp, sp, dp,
                          d_bias, d_bias + columns);
    }
    for (int64_t tile = 0; tile < tiles; ++tile) {
      add_into((last - first) * columns, dp + (tile * period + first) * columns,
               da + first * columns, tile == 0);
    }
  });  // [d bias, d slope]
  return {dz, sums.narrow(0, 0, columns), sums.narrow(0, columns, columns), d_addend};
}

// logits = PReLU(z + bias) w_out + b_out for z [R, C] and an output Linear with ONE unit
// (w_out [1, C], b_out [1]): the activations are never written. -> (logits [R, 1], h).
std::tuple<at::Tensor, at::Tensor> prelu_linear_forward(const at::Tensor& z_in,
                                                        const at::Tensor& bias,
                                                        const at::Tensor& slope,
                                                        const at::Tensor& out_weight,
                                                        const at::Tensor& out_bias) {
  for (const auto* x : {&z_in, &bias, &slope, &out_weight, &out_bias}) {
    check(*x, "prelu_linear_forward");
  }
  const auto z = z_in.contiguous();
  const int64_t rows = z.size(0), columns = z.size(1);
  TORCH_CHECK(out_weight.numel() == columns && out_bias.numel() == 1,
              "prelu_linear_forward: the output Linear must map C features to one unit");
  auto logits = at::empty({rows, 1}, z.options());
  auto h = at::empty_like(z);
  const float* zp = z.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const float* sp = slope.data_ptr<float>();
  const float* wp = out_weight.contiguous().data_ptr<float>();
  const float b_out = out_bias.item<float>();
  float* lp = logits.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    prelu_linear_rows(begin, end, columns, zp, bp, sp, wp, b_out, hp, lp);
  });
  return {logits, h};
}

// Backward of prelu_linear_forward -> (dL/dz [R, C], dL/dbias [C], dL/dslope [C],
// dL/dw_out [1, C], dL/db_out [1]), column sums over fixed row blocks summed in order.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prelu_linear_backward(
    const at::Tensor& grad_in, const at::Tensor& h, const at::Tensor& slope,
    const at::Tensor& out_weight) {
  for (const auto* x : {&grad_in, &h, &slope, &out_weight}) check(*x, "prelu_linear_backward");
  const auto grad = grad_in.contiguous();
  const int64_t rows = h.size(0), columns = h.size(1);
  auto dz = at::empty_like(h);
  const float* gp = grad.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const float* sp = slope.data_ptr<float>();
  const auto weight = out_weight.contiguous();
  const float* wp = weight.data_ptr<float>();
  float* dp = dz.data_ptr<float>();
  auto sums = block_sums(rows, 3 * columns + 1, h.options(), [&](int64_t first, int64_t last,
                                                                 float* block) {
    prelu_linear_backward_rows(first, last, columns, gp, hp, sp, wp, dp, block);
  });  // [d bias, d slope, d w_out, d b_out]
  return {dz, sums.narrow(0, 0, columns), sums.narrow(0, columns, columns),
          sums.narrow(0, 2 * columns, columns).view({1, columns}),
          sums.narrow(0, 3 * columns, 1)};
}

// out[k, n] = sources[k][row[n], position[n]] for K same-shape tensors [B, L, E] of any strides
// (the last one 1): one parallel pass, no contiguous copy of strided slices.
at::Tensor gather_positions_forward(at::TensorList sources, const at::Tensor& row,
                                    const at::Tensor& position) {
  TORCH_CHECK(!sources.empty(), "gather_positions: no sources");
  const auto& first = sources[0];
  for (const auto& x : sources) {
    check(x, "gather_positions_forward");
    TORCH_CHECK(x.dim() == 3 && x.sizes() == first.sizes() && x.stride(2) == 1,
                "gather_positions: sources must be [B, L, E] alike with a contiguous last dim");
  }
  TORCH_CHECK(row.scalar_type() == at::kLong && position.scalar_type() == at::kLong &&
                  row.numel() == position.numel(),
              "gather_positions: row and position must be int64 of one length");
  const int64_t count = row.numel(), width = first.size(2), k_count = sources.size();
  auto out = at::empty({k_count, count, width}, first.options());
  const auto rows = row.contiguous(), positions = position.contiguous();
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* p = positions.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  for (int64_t k = 0; k < k_count; ++k) {
    const float* x = sources[k].data_ptr<float>();
    const int64_t row_stride = sources[k].stride(0), position_stride = sources[k].stride(1);
    float* ok = o + k * count * width;
    at::parallel_for(0, count, 256, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        std::memcpy(ok + n * width, x + r[n] * row_stride + p[n] * position_stride,
                    width * sizeof(float));
      }
    });
  }
  return out;
}

// Backward: [K, B, L, E] zeros with grad[k, n] written at (row[n], position[n]); the pairs
// are distinct, so this is a plain write, not an accumulating scatter.
at::Tensor gather_positions_backward(const at::Tensor& grad_in, const at::Tensor& row,
                                     const at::Tensor& position, int64_t batch, int64_t length) {
  check(grad_in, "gather_positions_backward");
  const auto grad = grad_in.contiguous();
  const int64_t k_count = grad.size(0), count = grad.size(1), width = grad.size(2);
  auto out = at::empty({k_count, batch, length, width}, grad.options());
  float* o = out.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  const int64_t plane = batch * length * width;
  at::parallel_for(0, k_count * batch, 16, [&](int64_t begin, int64_t end) {
    std::memset(o + begin * length * width, 0, (end - begin) * length * width * sizeof(float));
  });
  const auto rows = row.contiguous(), positions = position.contiguous();
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* p = positions.data_ptr<int64_t>();
  at::parallel_for(0, count, 256, [&](int64_t begin, int64_t end) {
    for (int64_t k = 0; k < k_count; ++k) {
      for (int64_t n = begin; n < end; ++n) {
        std::memcpy(o + k * plane + (r[n] * length + p[n]) * width, g + (k * count + n) * width,
                    width * sizeof(float));
      }
    }
  });
  return out;
}

}  // namespace

// Dice's row loops (functions of restrict pointers: in the drivers' lambdas gcc vectorises
// such loops several times worse). w: row weights (null: all 1).

// sums[c] += w_r x_rc (center null) or w_r (x_rc - center_c)^2, rows [first, last).
void dice_moments(int64_t first, int64_t last, int64_t columns, const float* __restrict__ x,
                  const float* __restrict__ w, const float* __restrict__ center,
                  float* __restrict__ sums) {
  for (int64_t r = first; r < last; ++r) {
    const float weight = w ? w[r] : 1.f;
    const float* __restrict__ xr = x + r * columns;
    if (center) {
#pragma omp simd
      for (int64_t c = 0; c < columns; ++c) {
        const float d = xr[c] - center[c];
        sums[c] += weight * d * d;
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < columns; ++c) sums[c] += weight * xr[c];
    }
  }
}

// out = x (alpha + (1 - alpha) p), p = sigmoid((x - mean) rstd), rows [first, last).
void dice_rows(int64_t first, int64_t last, int64_t columns, const float* __restrict__ x,
               const float* __restrict__ mean, const float* __restrict__ rstd,
               const float* __restrict__ alpha, float* __restrict__ out) {
  for (int64_t r = first; r < last; ++r) {
    const float* __restrict__ xr = x + r * columns;
    float* __restrict__ outr = out + r * columns;
#pragma omp simd
    for (int64_t c = 0; c < columns; ++c) {
      const float p = fast_sigmoid((xr[c] - mean[c]) * rstd[c]);
      outr[c] = xr[c] * (alpha[c] + (1.f - alpha[c]) * p);
    }
  }
}

// Rows [first, last) of the backward's column sums: s = [dL/dalpha, sum dz, sum dz z].
void dice_backward_sums(int64_t first, int64_t last, int64_t columns,
                        const float* __restrict__ grad, const float* __restrict__ x,
                        const float* __restrict__ mean, const float* __restrict__ rstd,
                        const float* __restrict__ alpha, float* __restrict__ s) {
  float* __restrict__ d_alpha = s;
  float* __restrict__ sum_dz = s + columns;
  float* __restrict__ sum_dz_z = s + 2 * columns;
  for (int64_t r = first; r < last; ++r) {
    const float* __restrict__ gr = grad + r * columns;
    const float* __restrict__ xr = x + r * columns;
#pragma omp simd
    for (int64_t c = 0; c < columns; ++c) {
      const float z = (xr[c] - mean[c]) * rstd[c];
      const float p = fast_sigmoid(z);
      const float gx = gr[c] * xr[c];
      const float dz = gx * (1.f - alpha[c]) * p * (1.f - p);
      d_alpha[c] += gx * (1.f - p);
      sum_dz[c] += dz;
      sum_dz_z[c] += dz * z;
    }
  }
}

// Rows [first, last) of dL/dx, from the column sums sum_dz, sum_dz_z over `count` rows.
void dice_backward_rows(int64_t first, int64_t last, int64_t columns,
                        const float* __restrict__ grad, const float* __restrict__ x,
                        const float* __restrict__ w, const float* __restrict__ mean,
                        const float* __restrict__ rstd, const float* __restrict__ alpha,
                        const float* __restrict__ sum_dz, const float* __restrict__ sum_dz_z,
                        float count, float* __restrict__ dx) {
  for (int64_t r = first; r < last; ++r) {
    const float* __restrict__ gr = grad + r * columns;
    const float* __restrict__ xr = x + r * columns;
    float* __restrict__ dr = dx + r * columns;
    const float weight = w ? w[r] : 1.f;
#pragma omp simd
    for (int64_t c = 0; c < columns; ++c) {
      const float z = (xr[c] - mean[c]) * rstd[c];
      const float p = fast_sigmoid(z);
      const float gate = alpha[c] + (1.f - alpha[c]) * p;
      const float dz = gr[c] * xr[c] * (1.f - alpha[c]) * p * (1.f - p);
      const float correction = weight * rstd[c] / count * (sum_dz[c] + z * sum_dz_z[c]);
      dr[c] = gr[c] * gate + rstd[c] * dz - correction;
    }
  }
}

// Dice (DIN, eq. 4) in training on x [N, C] with row weights [N] (1 = real, 0 = padding; empty:
// all real): mean and biased variance of each unit over the weighted rows (block sums in
// order), then out = x (alpha + (1 - alpha) p), p = sigmoid((x - mean) / sqrt(var + eps)), in
// one pass. -> (out, mean [C], var [C], count []). Nothing but the statistics is saved: the
// backward recomputes p from x.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dice_forward(
    const at::Tensor& x_in, const at::Tensor& alpha, const at::Tensor& weights_in, double eps) {
  for (const auto* x : {&x_in, &alpha, &weights_in}) check(*x, "dice_forward");
  const auto x = x_in.contiguous();
  const auto weights = weights_in.contiguous();
  const int64_t rows = x.size(0), columns = x.size(1);
  TORCH_CHECK(alpha.numel() == columns && (weights.numel() == 0 || weights.numel() == rows),
              "attention_ctr CPU kernels: dice_forward's x [N, C], alpha [C] and weights [N] "
              "disagree");
  const float* xp = x.data_ptr<float>();
  const float* w = weights.numel() ? weights.data_ptr<float>() : nullptr;
  double total = static_cast<double>(rows);
  if (w) {
    total = 0.0;
    for (int64_t r = 0; r < rows; ++r) total += w[r];
  }
  const float count = static_cast<float>(std::max(total, 1.0));
  auto moments = [&](const float* center) {
    return block_sums(rows, columns, x.options(), [&](int64_t first, int64_t last, float* sums) {
             dice_moments(first, last, columns, xp, w, center, sums);
           }).div_(count);
  };
  auto mean = moments(nullptr);
  const float* m = mean.data_ptr<float>();
  auto var = moments(m);
  const auto rstd = (var + eps).rsqrt_();
  auto out = at::empty_like(x);
  const float* rs = rstd.data_ptr<float>();
  const float* a = alpha.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    dice_rows(begin, end, columns, xp, m, rs, a, op);
  });
  return {out, mean, var, at::scalar_tensor(count, x.options())};
}

// Backward of dice_forward (BatchNorm's, written out): with z = (x - mean) rstd and
// dz = dout x (1 - alpha) p (1 - p): dL/dx = dout (alpha + (1 - alpha) p) + rstd (dz - w (sum dz
// + z sum(dz z)) / count), dL/dalpha = sum dout x (1 - p). Two passes: the column sums, then
// dL/dx. -> (dL/dx [N, C], dL/dalpha [C]).
std::tuple<at::Tensor, at::Tensor> dice_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                 const at::Tensor& alpha,
                                                 const at::Tensor& weights_in,
                                                 const at::Tensor& mean, const at::Tensor& var,
                                                 const at::Tensor& count, double eps) {
  for (const auto* x : {&grad_in, &x_in, &alpha, &weights_in, &mean, &var, &count}) {
    check(*x, "dice_backward");
  }
  const auto grad = grad_in.contiguous();
  const auto x = x_in.contiguous();
  const auto weights = weights_in.contiguous();
  const int64_t rows = x.size(0), columns = x.size(1);
  const auto rstd = (var + eps).rsqrt_();
  const float* gp = grad.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* w = weights.numel() ? weights.data_ptr<float>() : nullptr;
  const float* m = mean.data_ptr<float>();
  const float* rs = rstd.data_ptr<float>();
  const float* a = alpha.data_ptr<float>();
  const float n = count.item<float>();
  auto sums = block_sums(rows, 3 * columns, x.options(), [&](int64_t first, int64_t last,
                                                             float* s) {
    dice_backward_sums(first, last, columns, gp, xp, m, rs, a, s);
  });  // [dL/dalpha, sum dz, sum dz z]
  const float* sum_dz = sums.data_ptr<float>() + columns;
  auto dx = at::empty_like(x);
  float* dp = dx.data_ptr<float>();
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    dice_backward_rows(begin, end, columns, gp, xp, w, m, rs, a, sum_dz, sum_dz + columns, n, dp);
  });
  return {dx, sums.narrow(0, 0, columns)};
}

// Behaviour vectors [item ⊕ category] of several id tensors from two embedding tables (DIN,
// DIEN, BST: target, history, DIEN's negatives): item_ids[i], category_ids[i] [B, K_i] int64
// -> out[i] [B, K_i, D_item + D_category], one pass, no concatenation or split.
// out[n * ld, + width) = table[ids[n]] for n in [begin, end): one table's part of a lookup.
void copy_rows_by_id(int64_t begin, int64_t end, int64_t width, const int64_t* __restrict__ ids,
                     const float* __restrict__ table, float* __restrict__ out, int64_t ld) {
  for (int64_t n = begin; n < end; ++n) {
    std::memcpy(out + n * ld, table + ids[n] * width, width * sizeof(float));
  }
}

// table[ids[n]] += grad[n * ld, + width) for n in [0, count), skipping id 0 (padding).
void add_rows_by_id(int64_t count, int64_t width, const int64_t* __restrict__ ids,
                    const float* __restrict__ grad, int64_t ld, float* __restrict__ table) {
  for (int64_t n = 0; n < count; ++n) {
    if (ids[n] == 0) continue;
    float* __restrict__ row = table + ids[n] * width;
    const float* __restrict__ gr = grad + n * ld;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) row[j] += gr[j];
  }
}

std::vector<at::Tensor> pair_lookup_forward(const at::Tensor& item_table_in,
                                            const at::Tensor& category_table_in,
                                            at::TensorList item_ids, at::TensorList category_ids) {
  for (const auto* x : {&item_table_in, &category_table_in}) check(*x, "pair_lookup_forward");
  TORCH_CHECK(item_ids.size() == category_ids.size(),
              "attention_ctr CPU kernels: pair_lookup_forward needs as many item as category "
              "id tensors");
  const auto item_table = item_table_in.contiguous();
  const auto category_table = category_table_in.contiguous();
  const int64_t item_width = item_table.size(1), category_width = category_table.size(1);
  const int64_t width = item_width + category_width;
  const int64_t n_items = item_table.size(0), n_categories = category_table.size(0);
  const float* items = item_table.data_ptr<float>();
  const float* categories = category_table.data_ptr<float>();
  std::vector<at::Tensor> outputs;
  for (size_t i = 0; i < item_ids.size(); ++i) {
    const auto item = item_ids[i].contiguous(), category = category_ids[i].contiguous();
    TORCH_CHECK(item.scalar_type() == at::kLong && category.scalar_type() == at::kLong &&
                    item.sizes() == category.sizes(),
                "attention_ctr CPU kernels: pair_lookup_forward's ids must be int64 pairs of "
                "one shape");
    const int64_t count = item.numel();
    const int64_t* ip = item.data_ptr<int64_t>();
    const int64_t* cp = category.data_ptr<int64_t>();
    for (int64_t n = 0; n < count; ++n) {  // a clear error, not a read outside the tables
      TORCH_CHECK(ip[n] >= 0 && ip[n] < n_items && cp[n] >= 0 && cp[n] < n_categories,
                  "attention_ctr CPU kernels: pair_lookup_forward got item id ", ip[n],
                  " / category id ", cp[n], " outside the tables (", n_items, " items, ",
                  n_categories, " categories)");
    }
    auto sizes = item.sizes().vec();
    sizes.push_back(width);
    auto out = at::empty(sizes, item_table.options());
    float* op = out.data_ptr<float>();
    at::parallel_for(0, count, 256, [&](int64_t begin, int64_t end) {
      copy_rows_by_id(begin, end, item_width, ip, items, op, width);
      copy_rows_by_id(begin, end, category_width, cp, categories, op + item_width, width);
    });
    outputs.push_back(out);
  }
  return outputs;
}

// Backward of pair_lookup_forward: grads[i] [B, K_i, D_item + D_category] (undefined: none)
// -> dense (d item_table, d category_table). Id 0 is padding and gets no gradient
// (nn.Embedding's padding_idx = 0). Each table is summed by one thread in id order:
// deterministic, and much faster than aten's embedding backward at these sizes.
std::tuple<at::Tensor, at::Tensor> pair_lookup_backward(at::TensorList grads,
                                                        at::TensorList item_ids,
                                                        at::TensorList category_ids,
                                                        int64_t n_items, int64_t item_width,
                                                        int64_t n_categories,
                                                        int64_t category_width) {
  const auto options = at::TensorOptions().dtype(at::kFloat);
  auto d_items = at::zeros({n_items, item_width}, options);
  auto d_categories = at::zeros({n_categories, category_width}, options);
  const int64_t width = item_width + category_width;
  std::vector<at::Tensor> kept;  // contiguous grads and ids, alive for the loop
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined() || grads[i].numel() == 0) continue;
    check(grads[i], "pair_lookup_backward");
    kept.push_back(grads[i].contiguous());
    kept.push_back(item_ids[i].contiguous());
    kept.push_back(category_ids[i].contiguous());
  }
  at::parallel_for(0, 2, 1, [&](int64_t first, int64_t last) {
    for (int64_t table = first; table < last; ++table) {
      const bool item_side = table == 0;
      const int64_t offset = item_side ? 0 : item_width;
      const int64_t table_width = item_side ? item_width : category_width;
      float* d = (item_side ? d_items : d_categories).data_ptr<float>();
      for (size_t k = 0; k < kept.size(); k += 3) {
        const int64_t* ids = kept[k + (item_side ? 1 : 2)].data_ptr<int64_t>();
        add_rows_by_id(kept[k + 1].numel(), table_width, ids, kept[k].data_ptr<float>() + offset,
                       width, d);
      }
    }
  });
  return {d_items, d_categories};
}

// out [..., D_0 + D_1 + ...] with out[n] = [tables[0][ids[0][n]], tables[1][ids[1][n]], ...]
// for K tables and K int64 id tensors of one shape (BST's tokens: item, category and
// position in one pass, no concatenation).
at::Tensor concat_lookup_forward(at::TensorList tables_in, at::TensorList ids_in) {
  TORCH_CHECK(!tables_in.empty() && tables_in.size() == ids_in.size(),
              "attention_ctr CPU kernels: concat_lookup_forward needs one id tensor per table");
  std::vector<at::Tensor> tables, ids;
  std::vector<int64_t> offsets{0};
  for (size_t k = 0; k < tables_in.size(); ++k) {
    check(tables_in[k], "concat_lookup_forward");
    tables.push_back(tables_in[k].contiguous());
    ids.push_back(ids_in[k].contiguous());
    TORCH_CHECK(ids[k].scalar_type() == at::kLong && ids[k].sizes() == ids[0].sizes(),
                "attention_ctr CPU kernels: concat_lookup_forward's ids must be int64 tensors "
                "of one shape");
    const int64_t rows = tables[k].size(0), count = ids[k].numel();
    const int64_t* id = ids[k].data_ptr<int64_t>();
    for (int64_t n = 0; n < count; ++n) {  // a clear error, not a read outside the table
      TORCH_CHECK(id[n] >= 0 && id[n] < rows, "attention_ctr CPU kernels: concat_lookup_forward "
                  "got id ", id[n], " outside table ", k, " (", rows, " rows)");
    }
    offsets.push_back(offsets.back() + tables[k].size(1));
  }
  const int64_t width = offsets.back(), count = ids[0].numel();
  auto sizes = ids[0].sizes().vec();
  sizes.push_back(width);
  auto out = at::empty(sizes, tables[0].options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, count, 256, [&](int64_t begin, int64_t end) {
    for (size_t k = 0; k < tables.size(); ++k) {
      copy_rows_by_id(begin, end, offsets[k + 1] - offsets[k], ids[k].data_ptr<int64_t>(),
                      tables[k].data_ptr<float>(), op + offsets[k], width);
    }
  });
  return out;
}

// Backward of concat_lookup_forward: grad [..., D_0 + D_1 + ...] -> each table's dense
// gradient (sizes from `rows` and `widths`). Id 0 is padding and gets none (nn.Embedding's
// padding_idx = 0). One thread sums each table, in id order: deterministic.
std::vector<at::Tensor> concat_lookup_backward(const at::Tensor& grad_in, at::TensorList ids_in,
                                               at::IntArrayRef rows, at::IntArrayRef widths) {
  check(grad_in, "concat_lookup_backward");
  const auto grad = grad_in.contiguous();
  std::vector<at::Tensor> ids, d_tables;
  std::vector<int64_t> offsets{0};
  for (size_t k = 0; k < ids_in.size(); ++k) {
    ids.push_back(ids_in[k].contiguous());
    d_tables.push_back(at::zeros({rows[k], widths[k]}, grad.options()));
    offsets.push_back(offsets.back() + widths[k]);
  }
  const int64_t width = offsets.back(), count = ids[0].numel();
  const float* g = grad.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(ids.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const int64_t* id = ids[k].data_ptr<int64_t>();
      add_rows_by_id(count, widths[k], id, g + offsets[k], width, d_tables[k].data_ptr<float>());
    }
  });
  return d_tables;
}

constexpr int64_t kHeadRows = 256;  // rows per block of the fused head: its activations stay in L2

// out = PReLU(h) for n rows of `width` (the head's backward recomputes its activations).
void prelu_rows(int64_t n, int64_t width, const float* __restrict__ h,
                const float* __restrict__ slope, float* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) out[i * width + c] = prelu(h[i * width + c], slope[c]);
  }
}

// DIEN's auxiliary net from its input: logits = w_out PReLU(W2 PReLU(z1) + b2) + b_out, with
// z1 = x W1^T + b1 + (shared W_s^T)[r % M] for x [R, E] and the rows' shared part shared [M, S]
// (or empty; R a multiple of M: DIEN's h_t, the same for its positive and negative rows), W1
// [A, E] and W_s [A, S] (column slices of a wider weight are read in place), W2 [C, A], w_out
// [1, C]. Tasks are blocks of kHeadRows shared rows with all the rows that use them (one block
// of rows without `shared`): the shared product is taken once per task, and a task's products
// and activations stay in cache; only the PReLUs' inputs h1 [R, A] and h2 [R, C] are written,
// for the backward. With bf16, the matmuls take bfloat16-rounded operands (float32
// accumulation; the output unit and everything else stay float32). -> (logits [R, 1], h1, h2).
std::tuple<at::Tensor, at::Tensor, at::Tensor> prelu_head_forward(
    const at::Tensor& x_in, const at::Tensor& w1_in, const at::Tensor& shared_in,
    const at::Tensor& w_shared_in, const at::Tensor& b1, const at::Tensor& s1,
    const at::Tensor& w2_in, const at::Tensor& b2, const at::Tensor& s2, const at::Tensor& w_out,
    const at::Tensor& b_out, bool bf16) {
  for (const auto* t : {&x_in, &w1_in, &shared_in, &w_shared_in, &b1, &s1, &w2_in, &b2, &s2,
                        &w_out, &b_out}) {
    check(*t, "prelu_head_forward");
  }
  const auto x = x_in.contiguous();
  const auto shared = shared_in.contiguous();
  const bool has_shared = shared.numel() > 0;
  // the weights transposed: x W^T then needs no transposed operand (see gemm)
  const auto w1 = transposed(w1_in), w2 = transposed(w2_in);  // [E, A], [A, C]
  const auto w_shared = has_shared ? transposed(w_shared_in) : w_shared_in;  // [S, A]
  const int64_t rows = x.size(0), inputs = x.size(1), first = w1.size(1), second = w2.size(1);
  const int64_t period = has_shared ? shared.size(0) : rows;  // rows of one tile
  const int64_t shared_width = has_shared ? shared.size(1) : 0;
  TORCH_CHECK(w1.size(0) == inputs && w2.size(0) == first && w_out.numel() == second &&
                  b1.numel() == first && s1.numel() == first && b2.numel() == second &&
                  s2.numel() == second && (period > 0 ? rows % period == 0 : rows == 0) &&
                  (!has_shared || (w_shared.size(1) == first && w_shared.size(0) == shared_width)),
              "attention_ctr CPU kernels: prelu_head_forward's shapes disagree");
  const int64_t tiles = period ? rows / period : 0, tasks = (period + kHeadRows - 1) / kHeadRows;
  auto logits = at::empty({rows, 1}, x.options());
  auto h1 = at::empty({rows, first}, x.options());
  auto h2 = at::empty({rows, second}, x.options());
  const float *xp = x.data_ptr<float>(), *w1p = w1.data_ptr<float>(), *w2p = w2.data_ptr<float>();
  const float* sp = has_shared ? shared.data_ptr<float>() : nullptr;
  const float* wsp = has_shared ? w_shared.data_ptr<float>() : nullptr;
  const float *b1p = b1.data_ptr<float>(), *s1p = s1.data_ptr<float>();
  const float *b2p = b2.data_ptr<float>(), *s2p = s2.data_ptr<float>();
  const float* wo = w_out.data_ptr<float>();
  const float bo = b_out.item<float>();
  float *lp = logits.data_ptr<float>(), *h1p = h1.data_ptr<float>(), *h2p = h2.data_ptr<float>();
  const auto w1_16 = bf16_copy(w1, bf16), w2_16 = bf16_copy(w2, bf16);
  const auto ws_16 = bf16_copy(w_shared, bf16 && has_shared);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    // a task's products and first activations (the loops run in the row functions above:
    // inside these lambdas gcc vectorises loops several times worse)
    std::vector<float> buffer(kHeadRows * (3 * first + second));
    float* z1 = buffer.data();
    float* o1 = z1 + kHeadRows * first;
    float* z2 = o1 + kHeadRows * first;
    float* a = z2 + kHeadRows * second;  // the shared product of the task's rows
    std::vector<uint16_t> buffer16(bf16 ? kHeadRows * (inputs + first + shared_width) : 0);
    uint16_t* x16 = bf16 ? buffer16.data() : nullptr;
    uint16_t* o1_16 = bf16 ? x16 + kHeadRows * inputs : nullptr;
    uint16_t* shared16 = bf16 ? o1_16 + kHeadRows * first : nullptr;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i0 = task * kHeadRows, n = std::min(period, i0 + kHeadRows) - i0;
      // bf16: a short block's matmuls on whole blocks of zeroed rows (see kBf16RowStep)
      const int64_t m = bf16 ? kHeadRows : n;
      if (has_shared) {
        if (bf16) to_bf16_rows(n, m, shared_width, sp + i0 * shared_width, shared16);
        mixed_gemm(bf16, false, false, m, first, shared_width, sp + i0 * shared_width, shared16,
                   shared_width, wsp, ws_16.data(), first, 0.f, a, first);
      }
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t r0 = tile * period + i0;
        if (bf16) to_bf16_rows(n, m, inputs, xp + r0 * inputs, x16);
        mixed_gemm(bf16, false, false, m, first, inputs, xp + r0 * inputs, x16, inputs, w1p,
                   w1_16.data(), first, 0.f, z1, first);
        bias_prelu_rows(0, n, first, kHeadRows, 0, z1, b1p, s1p, has_shared ? a : nullptr,
                        h1p + r0 * first, o1);
        if (bf16) to_bf16_rows(n, m, first, o1, o1_16);
        mixed_gemm(bf16, false, false, m, second, first, o1, o1_16, first, w2p, w2_16.data(),
                   second, 0.f, z2, second);
        prelu_linear_rows(0, n, second, z2, b2p, s2p, wo, bo, h2p + r0 * second, lp + r0);
      }
    }
  });
  return {logits, h1, h2};
}

// Backward of prelu_head_forward from dL/dlogits [R] (or [R, 1]), by the same tasks: the
// shared part's gradient is summed over the task's tiles in cache and without races; every
// column sum and weight gradient is taken per task and the tasks' parts summed in order
// (deterministic for any thread count). -> (dL/dx [R, E], dL/dW1 [A, E], dL/dshared [M, S]
// and dL/dW_s [A, S] (empty without), dL/db1, dL/ds1, dL/dW2 [C, A], dL/db2, dL/ds2,
// dL/dw_out [1, C], dL/db_out [1]).
std::vector<at::Tensor> prelu_head_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                            const at::Tensor& w1_in, const at::Tensor& shared_in,
                                            const at::Tensor& w_shared_in, const at::Tensor& h1,
                                            const at::Tensor& h2, const at::Tensor& s1,
                                            const at::Tensor& w2_in, const at::Tensor& s2,
                                            const at::Tensor& w_out, bool bf16) {
  for (const auto* t : {&grad_in, &x_in, &w1_in, &shared_in, &w_shared_in, &h1, &h2, &s1,
                        &w2_in, &s2, &w_out}) {
    check(*t, "prelu_head_backward");
  }
  const auto grad = grad_in.contiguous();
  const auto x = x_in.contiguous();
  const auto w1 = bf16 ? w1_in.contiguous() : unit_last_stride(w1_in);
  const auto w2 = w2_in.contiguous();
  const auto shared = shared_in.contiguous();
  const bool has_shared = shared.numel() > 0;
  const auto w_shared = bf16 || !has_shared ? w_shared_in.contiguous() : unit_last_stride(w_shared_in);
  const int64_t rows = x.size(0), inputs = x.size(1), first = w1.size(0), second = w2.size(0);
  const int64_t period = has_shared ? shared.size(0) : rows;
  const int64_t shared_width = has_shared ? shared.size(1) : 0;
  const int64_t tiles = period ? rows / period : 0, tasks = (period + kHeadRows - 1) / kHeadRows;
  const auto options = x.options();
  auto d_x = at::empty({rows, inputs}, options);
  auto d_shared = at::empty({has_shared ? period : 0, shared_width}, options);
  // dL/dW1 and dL/dW_s transposed (x^T dL/dh1): brgemm's transposed operand (see gemm) is
  // then x or shared [rows, 64], not dL/dh1 [rows, 100]
  auto d_w1_parts = at::empty({tasks, inputs, first}, options);
  auto d_ws_parts = at::empty({has_shared ? tasks : 0, shared_width, first}, options);
  auto d_w2_parts = at::empty({tasks, second, first}, options);
  // per task: [d b1, d s1, d b2, d s2, d w_out, d b_out]
  const int64_t width = 2 * first + 3 * second + 1;
  auto sum_parts = at::zeros({tasks, width}, options);
  const float *gp = grad.data_ptr<float>(), *xp = x.data_ptr<float>();
  const float *w1p = w1.data_ptr<float>(), *w2p = w2.data_ptr<float>();
  const int64_t ld_w1 = w1.stride(0);
  const float* sp = has_shared ? shared.data_ptr<float>() : nullptr;
  const float* wsp = has_shared ? w_shared.data_ptr<float>() : nullptr;
  const int64_t ld_ws = has_shared ? w_shared.stride(0) : 0;
  const float *h1p = h1.data_ptr<float>(), *h2p = h2.data_ptr<float>();
  const float *s1p = s1.data_ptr<float>(), *s2p = s2.data_ptr<float>();
  const float* wo = w_out.data_ptr<float>();
  float* dxp = d_x.data_ptr<float>();
  float* dsp = has_shared ? d_shared.data_ptr<float>() : nullptr;
  float *dw1 = d_w1_parts.data_ptr<float>(), *dw2 = d_w2_parts.data_ptr<float>();
  float* dws = has_shared ? d_ws_parts.data_ptr<float>() : nullptr;
  float* sums_all = sum_parts.data_ptr<float>();
  const auto w1_16 = bf16_copy(w1, bf16), w2_16 = bf16_copy(w2, bf16);
  const auto ws_16 = bf16_copy(w_shared, bf16 && has_shared);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer(kHeadRows * (4 * first + second + inputs + shared_width));
    float* o1 = buffer.data();           // PReLU(h1), recomputed
    float* g1 = o1 + kHeadRows * first;  // dL/dPReLU(h1)
    float* d1 = g1 + kHeadRows * first;  // dL/dh1
    float* d2 = d1 + kHeadRows * first;  // dL/dh2
    float* d_a = d2 + kHeadRows * second;        // dL/d(shared product), summed over tiles
    float* d_x_block = d_a + kHeadRows * first;  // a short block's dL/dx (bf16)
    float* d_shared_block = d_x_block + kHeadRows * inputs;  // the same for dL/dshared
    std::vector<uint16_t> buffer16(
        bf16 ? kHeadRows * (3 * first + second + inputs + shared_width) : 0);
    uint16_t* o1_16 = bf16 ? buffer16.data() : nullptr;  // the same, rounded to bf16
    uint16_t* d1_16 = bf16 ? o1_16 + kHeadRows * first : nullptr;
    uint16_t* d2_16 = bf16 ? d1_16 + kHeadRows * first : nullptr;
    uint16_t* x16 = bf16 ? d2_16 + kHeadRows * second : nullptr;
    uint16_t* d_a16 = bf16 ? x16 + kHeadRows * inputs : nullptr;
    uint16_t* shared16 = bf16 ? d_a16 + kHeadRows * first : nullptr;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i0 = task * kHeadRows, n = std::min(period, i0 + kHeadRows) - i0;
      // bf16: whole blocks, zeroed beyond n rows (adding nothing to the weights' gradients)
      const int64_t m = bf16 ? kHeadRows : n;
      float* sums = sums_all + task * width;
      float *db1 = sums, *ds1 = sums + first;
      float* output_sums = sums + 2 * first;  // [d b2, d s2, d w_out, d b_out]
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t r0 = tile * period + i0;
        const float beta = tile == 0 ? 0.f : 1.f;
        prelu_linear_backward_rows(0, n, second, gp + r0, h2p + r0 * second, s2p, wo, d2,
                                   output_sums);
        prelu_rows(n, first, h1p + r0 * first, s1p, o1);
        if (bf16) {
          to_bf16_rows(n, m, second, d2, d2_16);
          to_bf16_rows(n, m, first, o1, o1_16);
        }
        // dL/dW2 += dL/dh2^T PReLU(h1); dL/dPReLU(h1) = dL/dh2 W2
        mixed_gemm(bf16, true, false, second, first, m, d2, d2_16, second, o1, o1_16, first,
                   beta, dw2 + task * second * first, first);
        mixed_gemm(bf16, false, false, m, first, second, d2, d2_16, second, w2p, w2_16.data(),
                   first, 0.f, g1, first);
        prelu_backward_rows(0, n, first, g1, h1p + r0 * first, s1p, d1, db1, ds1);
        if (has_shared) add_into(n * first, d1, d_a, tile == 0);
        if (bf16) {
          to_bf16_rows(n, m, first, d1, d1_16);
          to_bf16_rows(n, m, inputs, xp + r0 * inputs, x16);
        }
        // dL/dx = dL/dh1 W1; dL/dW1 += dL/dh1^T x
        float* d_x_rows = m > n ? d_x_block : dxp + r0 * inputs;
        mixed_gemm(bf16, false, false, m, inputs, first, d1, d1_16, first, w1p, w1_16.data(),
                   ld_w1, 0.f, d_x_rows, inputs);
        if (m > n) std::memcpy(dxp + r0 * inputs, d_x_rows, n * inputs * sizeof(float));
        mixed_gemm(bf16, true, false, inputs, first, m, xp + r0 * inputs, x16, inputs, d1, d1_16,
                   first, beta, dw1 + task * inputs * first, first);
      }
      if (!has_shared) continue;
      // dL/dshared = dL/da W_s; dL/dW_s += dL/da^T shared, over the task's shared rows
      const float* shared_rows = sp + i0 * shared_width;
      if (bf16) {
        to_bf16_rows(n, m, first, d_a, d_a16);
        to_bf16_rows(n, m, shared_width, shared_rows, shared16);
      }
      float* d_shared_rows = m > n ? d_shared_block : dsp + i0 * shared_width;
      mixed_gemm(bf16, false, false, m, shared_width, first, d_a, d_a16, first, wsp, ws_16.data(),
                 ld_ws, 0.f, d_shared_rows, shared_width);
      if (m > n) {
        std::memcpy(dsp + i0 * shared_width, d_shared_rows, n * shared_width * sizeof(float));
      }
      mixed_gemm(bf16, true, false, shared_width, first, m, shared_rows, shared16, shared_width,
                 d_a, d_a16, first, 0.f, dws + task * shared_width * first, first);
    }
  });
  auto sums = sum_parts.sum(0);
  return {d_x,
          transposed(d_w1_parts.sum(0)),
          d_shared,
          has_shared ? transposed(d_ws_parts.sum(0)) : d_ws_parts,
          sums.narrow(0, 0, first),
          sums.narrow(0, first, first),
          d_w2_parts.sum(0),
          sums.narrow(0, 2 * first, second),
          sums.narrow(0, 2 * first + second, second),
          sums.narrow(0, 2 * first + 2 * second, second).view({1, second}),
          sums.narrow(0, 2 * first + 3 * second, 1)};
}

// BST's multi-head self-attention on the packed projection qkv [B, S, 3 H D] (see
// packed_attention_forward). Per (batch row, head) the q, k, v blocks are copied into buffers
// that stay in L1/L2 and multiplied there by register tiles of GCC/Clang vector types (16
// floats, one AVX-512 register; the compiler splits them elsewhere). The scores are kept
// transposed, st [key][query], so each query's softmax over the keys runs down a column: its max
// and sum are lane-wise over 16 queries at once, never a reduction across a vector's lanes.
namespace {

typedef float Vec __attribute__((vector_size(64)));
typedef int32_t IntVec __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
constexpr int64_t kTileRows = 4;      // the register tile: 4 rows x 32 columns
constexpr int64_t kTileColumns = 32;

inline Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store_vec(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
inline Vec splat(float x) { return Vec{} + x; }
inline int64_t round_up(int64_t n, int64_t step) { return (n + step - 1) / step * step; }

// exp(x) for the softmax's arguments x <= 0 (larger x are taken as 0), lane by lane: Cephes' expf
// (range reduction by ln 2, a degree-6 polynomial, ~1 ulp); exactly 0 below -87.34, where float
// exp underflows, so masked keys get exactly zero weight.
inline Vec softmax_exp(Vec x) {
  const IntVec underflow = x < -87.33654f;
  x = x < -87.33654f ? splat(-87.33654f) : x;
  x = x > 0.f ? Vec{} : x;
  const Vec n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // rounded to an integer
  Vec r = x - n * 0.693359375f;  // ln 2 in two parts: n * 0.693359375 is exact
  r = r - n * -2.12194440e-4f;
  Vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const IntVec two_to_n = (__builtin_convertvector(n, IntVec) + 127) << 23;
  const Vec value = p * reinterpret_cast<Vec>(two_to_n);
  return reinterpret_cast<Vec>(reinterpret_cast<IntVec>(value) & ~underflow);
}

// c[i][0:n] = sum_p a(i, p) b[p][0:n] for i < m, with a(i, p) = a[i * a_row + p * a_col] (either
// layout of a); m a multiple of kTileRows, n of kLanes (the buffers are padded). Tiles of 4 rows x
// kTileColumns, and 4 x kLanes for the last columns when n is an odd number of vectors.
void small_matmul(int64_t m, int64_t k, int64_t n, const float* __restrict__ a, int64_t a_row,
                  int64_t a_col, const float* __restrict__ b, int64_t ldb, float* __restrict__ c,
                  int64_t ldc) {
  for (int64_t i = 0; i < m; i += kTileRows) {
    int64_t j = 0;
    for (; j + kTileColumns <= n; j += kTileColumns) {
      Vec c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};
      for (int64_t p = 0; p < k; ++p) {
        const Vec b0 = load_vec(b + p * ldb + j), b1 = load_vec(b + p * ldb + j + kLanes);
        const float* column = a + i * a_row + p * a_col;
        const float a0 = column[0], a1 = column[a_row], a2 = column[2 * a_row],
                    a3 = column[3 * a_row];
        c00 += a0 * b0;
        c01 += a0 * b1;
        c10 += a1 * b0;
        c11 += a1 * b1;
        c20 += a2 * b0;
        c21 += a2 * b1;
        c30 += a3 * b0;
        c31 += a3 * b1;
      }
      float* row = c + i * ldc + j;
      store_vec(row, c00);
      store_vec(row + kLanes, c01);
      store_vec(row + ldc, c10);
      store_vec(row + ldc + kLanes, c11);
      store_vec(row + 2 * ldc, c20);
      store_vec(row + 2 * ldc + kLanes, c21);
      store_vec(row + 3 * ldc, c30);
      store_vec(row + 3 * ldc + kLanes, c31);
    }
    if (j < n) {
      Vec c0 = {}, c1 = {}, c2 = {}, c3 = {};
      for (int64_t p = 0; p < k; ++p) {
        const Vec b0 = load_vec(b + p * ldb + j);
        const float* column = a + i * a_row + p * a_col;
        c0 += column[0] * b0;
        c1 += column[a_row] * b0;
        c2 += column[2 * a_row] * b0;
        c3 += column[3 * a_row] * b0;
      }
      float* row = c + i * ldc + j;
      store_vec(row, c0);
      store_vec(row + ldc, c1);
      store_vec(row + 2 * ldc, c2);
      store_vec(row + 3 * ldc, c3);
    }
  }
}

struct AttentionShape {
  int64_t batch, length, heads, dim, width, stride;
  int64_t rows, dims, queries;  // padded: length to kTileRows; dim and length to kLanes
  AttentionShape(const at::Tensor& qkv, int64_t heads_)
      : batch(qkv.size(0)), length(qkv.size(1)), heads(heads_), dim(qkv.size(2) / 3 / heads_),
        width(qkv.size(2) / 3), stride(qkv.size(2)), rows(round_up(length, kTileRows)),
        dims(round_up(dim, kLanes)), queries(round_up(length, kLanes)) {}
};

#if defined(__GNUC__) && !defined(__clang__)
// GCC would turn the row copies below into one memcpy call per row of a few dozen bytes
#define NO_MEMCPY_CALLS __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define NO_MEMCPY_CALLS
#endif

// The first `dim` values of `length` rows (`stride` apart) into out [length][ld], plus
// bias[0:dim] if given. The buffers' padding (rows past length, columns past dim) is never
// written: it stays zero.
NO_MEMCPY_CALLS void copy_block(const float* __restrict__ src, int64_t stride, int64_t length,
                                int64_t dim, float* __restrict__ out, int64_t ld,
                                const float* __restrict__ bias = nullptr) {
  for (int64_t i = 0; i < length; ++i) {
    if (bias) {
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) out[i * ld + d] = src[i * stride + d] + bias[d];
    } else {
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) out[i * ld + d] = src[i * stride + d];
    }
  }
}

// out[d][i] = rows[i][d] for i < length, d < dim.
void transpose_block(const float* __restrict__ rows, int64_t ld_rows, int64_t length, int64_t dim,
                     float* __restrict__ out, int64_t ld_out) {
  for (int64_t i = 0; i < length; ++i)
    for (int64_t d = 0; d < dim; ++d) out[d * ld_out + i] = rows[i * ld_rows + d];
}

// Share `part` of `parts` (one per head) of the cache lines of the next batch row's contiguous
// block: the heads read a block in slices, which the hardware prefetchers do not follow.
void prefetch_share(const float* block, int64_t count, int64_t part, int64_t parts) {
  const int64_t lines = (count + 15) / 16;
  for (int64_t line = lines * part / parts; line < lines * (part + 1) / parts; ++line)
    __builtin_prefetch(block + line * 16);
}

// One thread's buffers, zeroed once: only their real parts are written, so the padding stays 0.
struct AttentionBuffers {
  std::vector<float> q, k, v, grad, qt, grad_t, st, ds, out, top, sums;
  explicit AttentionBuffers(const AttentionShape& s)
      : q(s.rows * s.dims), k(s.rows * s.dims), v(s.rows * s.dims), grad(s.rows * s.dims),
        qt(s.dim * s.queries), grad_t(s.dim * s.queries), st(s.rows * s.queries),
        ds(s.rows * s.queries), out(s.rows * s.dims), top(s.queries), sums(s.queries) {}
};

// Batch row b's q, k, v blocks of head h (plus their biases, if any) into the buffers, and q
// transposed.
void load_head(const AttentionShape& s, const float* qkv, const float* bias, int64_t b, int64_t h,
               AttentionBuffers& w) {
  const float* src = qkv + b * s.length * s.stride + h * s.dim;
  const auto part = [&](int64_t p) { return bias ? bias + p * s.width + h * s.dim : nullptr; };
  copy_block(src, s.stride, s.length, s.dim, w.q.data(), s.dims, part(0));
  copy_block(src + s.width, s.stride, s.length, s.dim, w.k.data(), s.dims, part(1));
  copy_block(src + 2 * s.width, s.stride, s.length, s.dim, w.v.data(), s.dims, part(2));
  transpose_block(w.q.data(), s.dims, s.length, s.dim, w.qt.data(), s.queries);
}

// st [key][query] = k q^T / sqrt(D) + the key mask's bias: 0 where kept, float's lowest where
// masked (the eager path's finfo.min mask); each query's max over the keys into w.top.
void head_scores(const AttentionShape& s, const bool* keep, float scale, AttentionBuffers& w) {
  small_matmul(s.rows, s.dim, s.queries, w.k.data(), s.dims, 1, w.qt.data(), s.queries,
               w.st.data(), s.queries);
  for (int64_t i = 0; i < s.queries; i += kLanes) {
    Vec top = splat(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < s.length; ++j) {
      float* score = w.st.data() + j * s.queries + i;
      const Vec v = load_vec(score) * scale + (keep[j] ? 0.f : std::numeric_limits<float>::lowest());
      store_vec(score, v);
      top = v > top ? v : top;
    }
    store_vec(w.top.data() + i, top);
  }
}

// The first `dim` columns of out's rows i < length, times factor[i] (or 1), into dst.
NO_MEMCPY_CALLS void store_rows(const AttentionShape& s, const float* __restrict__ out,
                const float* __restrict__ factor, float* __restrict__ dst, int64_t ld) {
  for (int64_t i = 0; i < s.length; ++i) {
    const float f = factor ? factor[i] : 1.f;
#pragma omp simd
    for (int64_t d = 0; d < s.dim; ++d) dst[i * ld + d] = out[i * s.dims + d] * f;
  }
}

// The same for a gradient (no factor), in the same pass adding its column sums to sums[0:dim].
void store_gradient_rows(const AttentionShape& s, const float* __restrict__ out,
                         float* __restrict__ dst, int64_t ld, float* __restrict__ sums) {
  for (int64_t i = 0; i < s.length; ++i)
#pragma omp simd
    for (int64_t d = 0; d < s.dim; ++d) {
      const float value = out[i * s.dims + d];
      dst[i * ld + d] = value;
      sums[d] += value;
    }
}

constexpr int64_t kAttentionRowsPerBlock = 8;  // batch rows per block of the bias gradient's sums

void check_attention(const at::Tensor& qkv, const at::Tensor& bias, const at::Tensor& keep,
                     int64_t heads, const char* op) {
  check(qkv, op);
  TORCH_CHECK(qkv.dim() == 3 && heads > 0 && qkv.size(2) % (3 * heads) == 0,
              "attention_ctr CPU kernels: ", op, " takes qkv [B, S, 3 H D] for ", heads,
              " heads, got ", qkv.sizes());
  if (bias.numel()) {
    check(bias, op);
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == qkv.size(2), "attention_ctr CPU kernels: ",
                op, " takes a bias [3 H D] = [", qkv.size(2), "] or none, got ", bias.sizes());
  }
  TORCH_CHECK(keep.scalar_type() == at::kBool && keep.dim() == 2 &&
                  keep.size(0) == qkv.size(0) && keep.size(1) == qkv.size(1),
              "attention_ctr CPU kernels: ", op, " takes keep [B, S] bool, got ",
              keep.scalar_type(), " ", keep.sizes());
}

}  // namespace

// out [B, S, H D] = softmax(q k^T / sqrt(D) + mask) v per head, for the packed projection
// `qkv` + `bias` (bias [3 H D] or empty) [B, S, 3 H D] (per token q | k | v, each H heads of D,
// as BST's `TransformerBlock.qkv` writes it), keys masked where `keep` [B, S] is False; out is in
// the layout the output projection reads (no head transposes). Every batch row must keep at
// least one key. Also returns each query's log-sum-exp [B, H, S], all the backward keeps (it
// recomputes the probabilities, as flash attention does).
std::tuple<at::Tensor, at::Tensor> packed_attention_forward(const at::Tensor& qkv_in,
                                                            const at::Tensor& bias_in,
                                                            const at::Tensor& keep_in,
                                                            int64_t heads) {
  check_attention(qkv_in, bias_in, keep_in, heads, "packed_attention_forward");
  TORCH_CHECK(keep_in.any(1).all().item<bool>(), "attention_ctr CPU kernels: "
              "packed_attention_forward needs every batch row to keep at least one key");
  const auto qkv = qkv_in.contiguous();
  const auto keep = keep_in.contiguous();
  const auto bias = bias_in.contiguous();
  const float* bias_p = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const AttentionShape s(qkv, heads);
  auto out = at::empty({s.batch, s.length, s.width}, qkv.options());
  auto lse = at::empty({s.batch, heads, s.length}, qkv.options());
  const float* x = qkv.data_ptr<float>();
  const bool* kept = keep.data_ptr<bool>();
  float* out_p = out.data_ptr<float>();
  float* lse_p = lse.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(s.dim));
  at::parallel_for(0, s.batch, 1, [&](int64_t first, int64_t last) {
    AttentionBuffers w(s);
    for (int64_t b = first; b < last; ++b) {
      for (int64_t h = 0; h < heads; ++h) {
        if (b + 1 < last) prefetch_share(x + (b + 1) * s.length * s.stride, s.length * s.stride, h, heads);
        load_head(s, x, bias_p, b, h, w);
        head_scores(s, kept + b * s.length, scale, w);
        // unnormalised probabilities: out's rows are divided by their sums after P V
        for (int64_t i = 0; i < s.queries; i += kLanes) {
          const Vec top = load_vec(w.top.data() + i);
          Vec sum = {};
          for (int64_t j = 0; j < s.length; ++j) {
            float* p = w.st.data() + j * s.queries + i;
            const Vec e = softmax_exp(load_vec(p) - top);
            store_vec(p, e);
            sum += e;
          }
          store_vec(w.sums.data() + i, sum);
        }
        small_matmul(s.rows, s.length, s.dims, w.st.data(), 1, s.queries, w.v.data(), s.dims,
                     w.out.data(), s.dims);
        float* row_lse = lse_p + (b * heads + h) * s.length;
        for (int64_t i = 0; i < s.length; ++i) {
          row_lse[i] = w.top[i] + std::log(w.sums[i]);
          w.sums[i] = 1.f / w.sums[i];
        }
        store_rows(s, w.out.data(), w.sums.data(), out_p + b * s.length * s.width + h * s.dim, s.width);
      }
    }
  });
  return {out, lse};
}

// d qkv [B, S, 3 H D] (qkv's layout) and d bias [3 H D] (empty without a bias) from out's
// gradient [B, S, H D]: with P recomputed from the scores and the log-sum-exp, dV = P^T dO,
// dS = P (dP - rowsum(P dP)) / sqrt(D) with dP = dO V^T, dQ = dS K, dK = dS^T Q. The bias
// gradient is summed over fixed blocks of batch rows in order (the same for any thread count).
std::tuple<at::Tensor, at::Tensor> packed_attention_backward(const at::Tensor& grad_in,
                                                             const at::Tensor& qkv_in,
                                                             const at::Tensor& bias_in,
                                                             const at::Tensor& keep_in,
                                                             const at::Tensor& lse_in,
                                                             int64_t heads) {
  check_attention(qkv_in, bias_in, keep_in, heads, "packed_attention_backward");
  check(grad_in, "packed_attention_backward");
  const auto grad = grad_in.contiguous();
  const auto qkv = qkv_in.contiguous();
  const auto bias = bias_in.contiguous();
  const auto keep = keep_in.contiguous();
  const auto lse = lse_in.contiguous();
  const AttentionShape s(qkv, heads);
  auto d_qkv = at::empty_like(qkv);
  const int64_t blocks = (s.batch + kAttentionRowsPerBlock - 1) / kAttentionRowsPerBlock;
  auto partial = at::zeros({blocks, s.stride}, qkv.options());
  const float* x = qkv.data_ptr<float>();
  const float* bias_p = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const float* g = grad.data_ptr<float>();
  const bool* kept = keep.data_ptr<bool>();
  const float* lse_p = lse.data_ptr<float>();
  float* dx = d_qkv.data_ptr<float>();
  float* partial_p = partial.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(s.dim));
  at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t last_block) {
    AttentionBuffers w(s);
    std::vector<float> row_lse(s.queries);  // padding queries keep 0
    const int64_t last = std::min(s.batch, last_block * kAttentionRowsPerBlock);
    for (int64_t b = first_block * kAttentionRowsPerBlock; b < last; ++b) {
      float* sums = partial_p + (b / kAttentionRowsPerBlock) * s.stride;
      for (int64_t h = 0; h < heads; ++h) {
        if (b + 1 < last) {
          prefetch_share(x + (b + 1) * s.length * s.stride, s.length * s.stride, h, heads);
          prefetch_share(g + (b + 1) * s.length * s.width, s.length * s.width, h, heads);
        }
        load_head(s, x, bias_p, b, h, w);
        copy_block(g + b * s.length * s.width + h * s.dim, s.width, s.length, s.dim,
                   w.grad.data(), s.dims);
        transpose_block(w.grad.data(), s.dims, s.length, s.dim, w.grad_t.data(), s.queries);
        head_scores(s, kept + b * s.length, scale, w);
        std::copy_n(lse_p + (b * heads + h) * s.length, s.length, row_lse.data());
        for (int64_t i = 0; i < s.queries; i += kLanes) {
          const Vec column_lse = load_vec(row_lse.data() + i);
          for (int64_t j = 0; j < s.length; ++j) {
            float* p = w.st.data() + j * s.queries + i;
            store_vec(p, softmax_exp(load_vec(p) - column_lse));
          }
        }
        float* dst = dx + b * s.length * s.stride + h * s.dim;
        float* head_sums = sums + h * s.dim;
        // dV = P^T dO
        small_matmul(s.rows, s.length, s.dims, w.st.data(), s.queries, 1, w.grad.data(), s.dims,
                     w.out.data(), s.dims);
        store_gradient_rows(s, w.out.data(), dst + 2 * s.width, s.stride, head_sums + 2 * s.width);
        // dP^T = V dO^T, then dS = P (dP - delta) / sqrt(D), delta = each query's sum of P dP
        small_matmul(s.rows, s.dim, s.queries, w.v.data(), s.dims, 1, w.grad_t.data(),
                     s.queries, w.ds.data(), s.queries);
        for (int64_t i = 0; i < s.queries; i += kLanes) {
          Vec delta = {};
          for (int64_t j = 0; j < s.length; ++j)
            delta += load_vec(w.st.data() + j * s.queries + i) * load_vec(w.ds.data() + j * s.queries + i);
          for (int64_t j = 0; j < s.length; ++j) {
            float* d = w.ds.data() + j * s.queries + i;
            store_vec(d, scale * load_vec(w.st.data() + j * s.queries + i) * (load_vec(d) - delta));
          }
        }
        // dQ = dS K, dK = dS^T Q
        small_matmul(s.rows, s.length, s.dims, w.ds.data(), 1, s.queries, w.k.data(), s.dims,
                     w.out.data(), s.dims);
        store_gradient_rows(s, w.out.data(), dst, s.stride, head_sums);
        small_matmul(s.rows, s.length, s.dims, w.ds.data(), s.queries, 1, w.q.data(), s.dims,
                     w.out.data(), s.dims);
        store_gradient_rows(s, w.out.data(), dst + s.width, s.stride, head_sums + s.width);
      }
    }
  });
  return {d_qkv, bias.numel() ? partial.sum(0) : at::empty({0}, qkv.options())};
}

// Dropout with a counter-based random mask: each element's uniform is a hash of the seed and its
// position (two rounds of the "lowbias32" integer hash, 32-bit so it vectorises), so the
// backward regenerates the mask instead of storing it and threads draw independently. out = x *
// keep * scale, keep = 15-bit uniform >= threshold (threshold = round(p 2^15), scale = 2^15 /
// (2^15 - threshold)), as bst.fast_dropout.
inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352DU;
  x ^= x >> 15;
  x *= 0x846CA68BU;
  return x ^ (x >> 16);
}

// The 15-bit uniform of the element at flat `position` for the seed's halves `low`, `high`.
inline uint32_t dropout_uniform(uint32_t position, uint32_t low, uint32_t high) {
  return lowbias32(lowbias32(position ^ low) ^ high) >> 17;
}

// 1 / P(keep) for a threshold, after checking 0 <= threshold < 2^15.
float dropout_scale(int64_t threshold, const char* op) {
  TORCH_CHECK(threshold >= 0 && threshold < 32768, "attention_ctr CPU kernels: ", op,
              " needs 0 <= threshold < 2^15, got ", threshold);
  return 32768.f / static_cast<float>(32768 - threshold);
}

// out[i] = x[i] * scale where element i's uniform >= threshold, else 0, for i in [begin, end).
void dropout_rows(int64_t begin, int64_t end, const float* __restrict__ x, uint64_t seed,
                  int64_t threshold, float scale, float* __restrict__ out) {
  const uint32_t low = static_cast<uint32_t>(seed), high = static_cast<uint32_t>(seed >> 32);
  const uint32_t limit = static_cast<uint32_t>(threshold);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    out[i] = dropout_uniform(static_cast<uint32_t>(i), low, high) >= limit ? x[i] * scale : 0.f;
  }
}

at::Tensor dropout_apply(const at::Tensor& x_in, int64_t threshold, int64_t seed,
                         const char* op) {
  check(x_in, op);
  const float scale = dropout_scale(threshold, op);
  const auto x = x_in.contiguous();
  auto out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  const uint64_t key = static_cast<uint64_t>(seed);
  at::parallel_for(0, (x.numel() + 1023) / 1024, 1, [&](int64_t first, int64_t last) {
    dropout_rows(first * 1024, std::min<int64_t>(x.numel(), last * 1024), xp, key, threshold,
                 scale, op_);
  });
  return out;
}

at::Tensor dropout_forward(const at::Tensor& x, int64_t threshold, int64_t seed) {
  return dropout_apply(x, threshold, seed, "dropout_forward");
}

// The same mask and scale on the incoming gradient.
at::Tensor dropout_backward(const at::Tensor& grad, int64_t threshold, int64_t seed) {
  return dropout_apply(grad, threshold, seed, "dropout_backward");
}

// Rows [begin, end) of bias_dropout_forward, one loop per variant so that each vectorises.
template <bool kLeaky, bool kResidual>
void bias_dropout_rows(int64_t begin, int64_t end, int64_t columns, const float* __restrict__ z,
                       const float* __restrict__ bias, const float* __restrict__ residual,
                       float slope, uint64_t seed, uint32_t limit, float scale,
                       float* __restrict__ out) {
  const uint32_t low = static_cast<uint32_t>(seed), high = static_cast<uint32_t>(seed >> 32);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t offset = r * columns;
#pragma omp simd
    for (int64_t c = 0; c < columns; ++c) {
      float y = z[offset + c] + bias[c];
      if (kLeaky) y = y > 0.f ? y : slope * y;
      const uint32_t uniform = dropout_uniform(static_cast<uint32_t>(offset + c), low, high);
      const float dropped = uniform >= limit ? y * scale : 0.f;
      out[offset + c] = kResidual ? residual[offset + c] + dropped : dropped;
    }
  }
}

// Rows [first, last) of bias_dropout_backward; adds their bias gradient to sums.
template <bool kLeaky>
void bias_dropout_backward_rows(int64_t first, int64_t last, int64_t columns,
                                const float* __restrict__ grad, const float* __restrict__ z,
                                const float* __restrict__ bias, float slope, uint64_t seed,
                                uint32_t limit, float scale, float* __restrict__ d_z,
                                float* __restrict__ sums) {
  const uint32_t low = static_cast<uint32_t>(seed), high = static_cast<uint32_t>(seed >> 32);
  for (int64_t r = first; r < last; ++r) {
    const int64_t offset = r * columns;
#pragma omp simd
    for (int64_t c = 0; c < columns; ++c) {
      const uint32_t uniform = dropout_uniform(static_cast<uint32_t>(offset + c), low, high);
      float d = uniform >= limit ? grad[offset + c] * scale : 0.f;
      if (kLeaky) d = z[offset + c] + bias[c] > 0.f ? d : slope * d;
      d_z[offset + c] = d;
      sums[c] += d;
    }
  }
}

// A Linear's bias, an optional LeakyReLU, dropout (the mask of dropout_apply) and an optional
// residual in one pass: out = residual + dropout(act(z + bias)), z [R, C] the Linear's product
// (BST's Transformer block: its output projection and feed-forward). The backward is one more
// pass, which also sums the bias gradient over fixed row blocks. threshold 0 keeps everything.
at::Tensor bias_dropout_forward(const at::Tensor& z_in, const at::Tensor& bias_in,
                                const at::Tensor& residual_in, bool leaky, double slope,
                                int64_t threshold, int64_t seed) {
  check(z_in, "bias_dropout_forward");
  check(bias_in, "bias_dropout_forward");
  const float scale = dropout_scale(threshold, "bias_dropout_forward");
  const auto z = z_in.contiguous();
  const auto bias = bias_in.contiguous();
  const int64_t columns = z.size(-1), rows = z.numel() / columns;
  TORCH_CHECK(bias.numel() == columns, "attention_ctr CPU kernels: bias_dropout_forward takes a bias of ",
              columns, " values, got ", bias.numel());
  const bool has_residual = residual_in.numel() > 0;
  at::Tensor residual;
  if (has_residual) {
    check(residual_in, "bias_dropout_forward");
    TORCH_CHECK(residual_in.sizes() == z.sizes(), "attention_ctr CPU kernels: bias_dropout_forward's "
                "residual ", residual_in.sizes(), " differs from its input ", z.sizes());
    residual = residual_in.contiguous();
  }
  auto out = at::empty_like(z);
  const float* zp = z.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const float* rp = has_residual ? residual.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const float negative = static_cast<float>(slope);
  const uint64_t key = static_cast<uint64_t>(seed);
  const uint32_t limit = static_cast<uint32_t>(threshold);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    const auto run = [&](auto leaky_tag, auto residual_tag) {
      bias_dropout_rows<decltype(leaky_tag)::value, decltype(residual_tag)::value>(
          begin, end, columns, zp, bp, rp, negative, key, limit, scale, op);
    };
    if (leaky)
      rp ? run(std::true_type{}, std::true_type{}) : run(std::true_type{}, std::false_type{});
    else
      rp ? run(std::false_type{}, std::true_type{}) : run(std::false_type{}, std::false_type{});
  });
  return out;
}

// -> d z and d bias; `z` is only read with `leaky` (the activation's slope at z + bias). The
// residual's gradient is the incoming one itself.
std::tuple<at::Tensor, at::Tensor> bias_dropout_backward(const at::Tensor& grad_in,
                                                         const at::Tensor& z_in,
                                                         const at::Tensor& bias_in, bool leaky,
                                                         double slope, int64_t threshold,
                                                         int64_t seed) {
  check(grad_in, "bias_dropout_backward");
  const auto grad = grad_in.contiguous();
  const auto z = leaky ? z_in.contiguous() : z_in;
  const auto bias = bias_in.contiguous();
  const int64_t columns = grad.size(-1), rows = grad.numel() / columns;
  auto d_z = at::empty_like(grad);
  const float* gp = grad.data_ptr<float>();
  const float* zp = leaky ? z.data_ptr<float>() : nullptr;
  const float* bp = bias.data_ptr<float>();
  float* dp = d_z.data_ptr<float>();
  const float scale = dropout_scale(threshold, "bias_dropout_backward");
  const float negative = static_cast<float>(slope);
  const uint64_t key = static_cast<uint64_t>(seed);
  const uint32_t limit = static_cast<uint32_t>(threshold);
  auto d_bias = block_sums(rows, columns, grad.options(), [&](int64_t first, int64_t last, float* sums) {
    if (leaky)
      bias_dropout_backward_rows<true>(first, last, columns, gp, zp, bp, negative, key, limit, scale, dp, sums);
    else
      bias_dropout_backward_rows<false>(first, last, columns, gp, zp, bp, negative, key, limit, scale, dp, sums);
  });
  return {d_z, d_bias};
}

// DIN's activation unit on the real positions only (layers.DINAttention): `index` [N] holds
// b * L + l of each real position, ascending (mask.nonzero's order), so sample b's rows are
// one run [start[b], start[b + 1]). Both ops gather and multiply in one pass, and their
// backwards write each history row once and sum each sample's run in cache: no accumulating
// scatter (which sorts on the CPU), no concatenation, no [N, E] copies of the target.
namespace {

// A clear error for an index that is not contiguous int64 [N], ascending, within [0, B * L).
// The forwards check; their backwards get the same (saved) index back.
void check_positions(const at::Tensor& index, int64_t batch, int64_t length, const char* op) {
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 && index.is_contiguous(),
              "attention_ctr CPU kernels: ", op, "'s index must be a contiguous int64 [N]");
  const int64_t* ix = index.data_ptr<int64_t>();
  for (int64_t n = 0; n < index.numel(); ++n) {
    TORCH_CHECK(ix[n] >= 0 && ix[n] < batch * length && (n == 0 || ix[n] > ix[n - 1]),
                "attention_ctr CPU kernels: ", op, "'s index[", n, "] = ", ix[n],
                " is not ascending within [0, B * L = ", batch * length, ")");
  }
}

// start [B + 1] of each sample's run of a checked index.
std::vector<int64_t> sample_runs(const at::Tensor& index, int64_t batch, int64_t length) {
  const int64_t count = index.numel();
  const int64_t* ix = index.data_ptr<int64_t>();
  std::vector<int64_t> start(batch + 1);
  int64_t n = 0;
  for (int64_t b = 0; b <= batch; ++b) {
    while (n < count && ix[n] < b * length) ++n;
    start[b] = n;
  }
  return start;
}

// out rows [h, h * t] of one sample's run (t: its target).
void unit_input_rows(int64_t first, int64_t last, int64_t dim, const int64_t* __restrict__ ix,
                     const float* __restrict__ history, const float* __restrict__ t,
                     float* __restrict__ out) {
  for (int64_t n = first; n < last; ++n) {
    const float* __restrict__ h = history + ix[n] * dim;
    float* __restrict__ o = out + n * 2 * dim;
#pragma omp simd
    for (int64_t c = 0; c < dim; ++c) {
      o[c] = h[c];
      o[dim + c] = h[c] * t[c];
    }
  }
}

// One sample's run of the backward: d_h (rows of d_history, zeroed beforehand) and d_t.
void unit_input_backward_rows(int64_t first, int64_t last, int64_t dim,
                              const int64_t* __restrict__ ix, const float* __restrict__ grad,
                              const float* __restrict__ history, const float* __restrict__ t,
                              float* __restrict__ d_history, float* __restrict__ d_t) {
  for (int64_t c = 0; c < dim; ++c) d_t[c] = 0.f;
  for (int64_t n = first; n < last; ++n) {
    const float* __restrict__ g = grad + n * 2 * dim;
    const float* __restrict__ h = history + ix[n] * dim;
    float* __restrict__ d = d_history + ix[n] * dim;
#pragma omp simd
    for (int64_t c = 0; c < dim; ++c) {
      d[c] = g[c] + g[dim + c] * t[c];
      d_t[c] += g[dim + c] * h[c];
    }
  }
}

// out[n] = x[b] for every row n of sample b's run.
void repeat_sample_row(int64_t first, int64_t last, int64_t width, const float* __restrict__ x,
                       float* __restrict__ out) {
  for (int64_t n = first; n < last; ++n) std::memcpy(out + n * width, x, width * sizeof(float));
}

// d_x = the sum of the run's rows of grad.
void sum_sample_rows(int64_t first, int64_t last, int64_t width, const float* __restrict__ grad,
                     float* __restrict__ d_x) {
  if (first == last) std::memset(d_x, 0, width * sizeof(float));
  for (int64_t n = first; n < last; ++n) add_into(width, grad + n * width, d_x, n == first);
}

}  // namespace

// history [B, L, E], target [B, E], index [N] -> [N, 2E] rows [h, h * t] at the real positions.
at::Tensor din_unit_input_forward(const at::Tensor& history_in, const at::Tensor& target_in,
                                  const at::Tensor& index) {
  for (const auto* x : {&history_in, &target_in}) check(*x, "din_unit_input_forward");
  const auto history = history_in.contiguous();
  const auto target = target_in.contiguous();
  TORCH_CHECK(history.dim() == 3 && target.dim() == 2 && target.size(0) == history.size(0) &&
                  target.size(1) == history.size(2),
              "attention_ctr CPU kernels: din_unit_input_forward's history [B, L, E] and "
              "target [B, E] disagree");
  const int64_t batch = history.size(0), length = history.size(1), dim = history.size(2);
  check_positions(index, batch, length, "din_unit_input_forward");
  const auto start = sample_runs(index, batch, length);
  auto out = at::empty({index.numel(), 2 * dim}, history.options());
  const int64_t* ix = index.data_ptr<int64_t>();
  const float *hp = history.data_ptr<float>(), *tp = target.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      unit_input_rows(start[b], start[b + 1], dim, ix, hp, tp + b * dim, op);
    }
  });
  return out;
}

// -> (dL/dhistory [B, L, E], zero at the other positions; dL/dtarget [B, E]).
std::tuple<at::Tensor, at::Tensor> din_unit_input_backward(const at::Tensor& grad_in,
                                                           const at::Tensor& history_in,
                                                           const at::Tensor& target_in,
                                                           const at::Tensor& index) {
  for (const auto* x : {&grad_in, &history_in, &target_in}) check(*x, "din_unit_input_backward");
  const auto grad = grad_in.contiguous();
  const auto history = history_in.contiguous();
  const auto target = target_in.contiguous();
  const int64_t batch = history.size(0), length = history.size(1), dim = history.size(2);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == index.numel() && grad.size(1) == 2 * dim,
              "attention_ctr CPU kernels: din_unit_input_backward's grad must be [N, 2E]");
  const auto start = sample_runs(index, batch, length);
  auto d_history = at::empty_like(history);
  auto d_target = at::empty_like(target);
  const int64_t* ix = index.data_ptr<int64_t>();
  const float *gp = grad.data_ptr<float>(), *hp = history.data_ptr<float>();
  const float* tp = target.data_ptr<float>();
  float *dhp = d_history.data_ptr<float>(), *dtp = d_target.data_ptr<float>();
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    std::memset(dhp + begin * length * dim, 0, (end - begin) * length * dim * sizeof(float));
    for (int64_t b = begin; b < end; ++b) {
      unit_input_backward_rows(start[b], start[b + 1], dim, ix, gp, hp, tp + b * dim, dhp,
                               dtp + b * dim);
    }
  });
  return {d_history, d_target};
}

// x [B, A], index [N] of positions in [B, L] -> [N, A], row n = x[index[n] / L].
at::Tensor sample_rows_forward(const at::Tensor& x_in, const at::Tensor& index, int64_t length) {
  check(x_in, "sample_rows_forward");
  const auto x = x_in.contiguous();
  TORCH_CHECK(x.dim() == 2, "attention_ctr CPU kernels: sample_rows_forward's x must be [B, A]");
  const int64_t batch = x.size(0), width = x.size(1);
  check_positions(index, batch, length, "sample_rows_forward");
  const auto start = sample_runs(index, batch, length);
  auto out = at::empty({index.numel(), width}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      repeat_sample_row(start[b], start[b + 1], width, xp + b * width, op);
    }
  });
  return out;
}

// grad [N, A] -> dL/dx [B, A]: each sample's run summed (in row order: deterministic).
at::Tensor sample_rows_backward(const at::Tensor& grad_in, const at::Tensor& index, int64_t batch,
                                int64_t length) {
  check(grad_in, "sample_rows_backward");
  const auto grad = grad_in.contiguous();
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == index.numel(),
              "attention_ctr CPU kernels: sample_rows_backward's grad must be [N, A]");
  const int64_t width = grad.size(1);
  const auto start = sample_runs(index, batch, length);
  auto d_x = at::empty({batch, width}, grad.options());
  const float* gp = grad.data_ptr<float>();
  float* dp = d_x.data_ptr<float>();
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      sum_sample_rows(start[b], start[b + 1], width, gp, dp + b * width);
    }
  });
  return d_x;
}

// Batched matrix-vector products of [B, L, D] rows (DIEN's bilinear attention scores, the
// attention-weighted and masked means over a history): ATen runs these as bmm, which MKL takes
// one tiny [L, D] matrix at a time; each is one pass here.
// x's last dimension must be contiguous (views with other batch and position strides are read
// in place).

// out[b, l] = sum_d x[b, l, d] v[b, d]: x [B, L, D], v [B, D].
at::Tensor row_dots(const at::Tensor& x_in, const at::Tensor& v_in) {
  for (const auto* t : {&x_in, &v_in}) check(*t, "row_dots");
  const auto x = unit_last_stride(x_in);
  const auto v = v_in.contiguous();
  const int64_t batch = x.size(0), length = x.size(1), width = x.size(2);
  TORCH_CHECK(x.dim() == 3 && v.dim() == 2 && v.size(0) == batch && v.size(1) == width,
              "attention_ctr CPU kernels: row_dots takes x [B, L, D] and v [B, D]");
  auto out = at::empty({batch, length}, x.options());
  const float *xp = x.data_ptr<float>(), *vp = v.data_ptr<float>();
  const int64_t x_row = x.stride(0), x_step = x.stride(1);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* __restrict__ vb = vp + b * width;
      for (int64_t l = 0; l < length; ++l) {
        const float* __restrict__ xr = xp + b * x_row + l * x_step;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t d = 0; d < width; ++d) sum += xr[d] * vb[d];
        op[b * length + l] = sum;
      }
    }
  });
  return out;
}

// out[b, d] = sum_l w[b, l] x[b, l, d]: w [B, L], x [B, L, D].
at::Tensor weighted_rows(const at::Tensor& w_in, const at::Tensor& x_in) {
  for (const auto* t : {&w_in, &x_in}) check(*t, "weighted_rows");
  const auto w = w_in.contiguous();
  const auto x = unit_last_stride(x_in);
  const int64_t batch = x.size(0), length = x.size(1), width = x.size(2);
  TORCH_CHECK(x.dim() == 3 && w.dim() == 2 && w.size(0) == batch && w.size(1) == length,
              "attention_ctr CPU kernels: weighted_rows takes w [B, L] and x [B, L, D]");
  auto out = at::empty({batch, width}, x.options());
  const float *wp = w.data_ptr<float>(), *xp = x.data_ptr<float>();
  const int64_t x_row = x.stride(0), x_step = x.stride(1);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float* __restrict__ ob = op + b * width;
      std::memset(ob, 0, width * sizeof(float));
      for (int64_t l = 0; l < length; ++l) {
        const float weight = wp[b * length + l];
        if (weight == 0.f) continue;  // padding (its rows are not read)
        const float* __restrict__ xr = xp + b * x_row + l * x_step;
#pragma omp simd
        for (int64_t d = 0; d < width; ++d) ob[d] += weight * xr[d];
      }
    }
  });
  return out;
}

// out[b, l, d] = w[b, l] v[b, d]: w [B, L], v [B, D] -> [B, L, D] (the backward of both).
at::Tensor outer_rows(const at::Tensor& w_in, const at::Tensor& v_in) {
  for (const auto* t : {&w_in, &v_in}) check(*t, "outer_rows");
  const auto w = w_in.contiguous();
  const auto v = v_in.contiguous();
  const int64_t batch = w.size(0), length = w.size(1), width = v.size(1);
  TORCH_CHECK(w.dim() == 2 && v.dim() == 2 && v.size(0) == batch,
              "attention_ctr CPU kernels: outer_rows takes w [B, L] and v [B, D]");
  auto out = at::empty({batch, length, width}, v.options());
  const float *wp = w.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* __restrict__ vb = vp + b * width;
      for (int64_t l = 0; l < length; ++l) {
        const float weight = wp[b * length + l];
        float* __restrict__ orow = op + (b * length + l) * width;
#pragma omp simd
        for (int64_t d = 0; d < width; ++d) orow[d] = weight * vb[d];
      }
    }
  });
  return out;
}

// Linear layers of the models' MLPs and DIN's activation unit (`cpu_kernels.linear`): the same
// matmuls as F.linear, on `gemm`'s brgemm (where ATen's matmuls take BLAS). Rows go in
// sub-blocks of kLinearRows, whose operands and products stay in L2.
constexpr int64_t kLinearRows = 128;
// The backward's weight gradient is summed over row blocks (in order), at most this many: the
// block size depends on the row count only, so the result does not depend on threads.
constexpr int64_t kLinearBlocks = 16;

// Which matmuls the kernels run: "brgemm", "blas" or "aten".
std::string matmul_backend() {
  if (brgemm_available()) return "brgemm";
  return sgemm_ != nullptr && !blas_switched_off() ? "blas" : "aten";
}

// out [N, O] = x [N, I] W^T (weight [O, I]) + bias [O] + addend [N, O] (either empty: none).
at::Tensor linear_forward(const at::Tensor& x_in, const at::Tensor& weight,
                          const at::Tensor& bias_in, const at::Tensor& addend_in) {
  for (const auto* t : {&x_in, &weight, &bias_in, &addend_in}) check(*t, "linear_forward");
  const auto x = x_in.contiguous();
  const auto bias = bias_in.contiguous();
  const auto addend = addend_in.contiguous();
  const int64_t rows = x.size(0), inputs = x.size(1), outputs = weight.size(0);
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && weight.size(1) == inputs &&
                  (bias.numel() == 0 || bias.numel() == outputs) &&
                  (addend.numel() == 0 || (addend.size(0) == rows && addend.size(1) == outputs)),
              "attention_ctr CPU kernels: linear_forward's x [N, I], weight [O, I], bias [O] "
              "and addend [N, O] disagree");
  const auto w_t = transposed(weight);  // [I, O]
  auto out = at::empty({rows, outputs}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w_t.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const float* ap = addend.numel() ? addend.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = begin; r0 < end; r0 += kLinearRows) {
      const int64_t n = std::min(end, r0 + kLinearRows) - r0;
      float* c = op + r0 * outputs;
      if (ap) std::memcpy(c, ap + r0 * outputs, n * outputs * sizeof(float));
      if (bp) {
        for (int64_t i = 0; i < n; ++i) add_into(outputs, bp, c + i * outputs, !ap);
      }
      gemm(false, false, n, outputs, inputs, xp + r0 * inputs, inputs, wp, outputs,
           ap || bp ? 1.f : 0.f, c, outputs);
    }
  });
  return out;
}

// Backward of linear_forward from dL/dout [N, O] -> (dL/dx [N, I] (empty unless x_grad),
// dL/dW [O, I], dL/dbias [O]), each row block's part taken while its rows are in cache.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(const at::Tensor& grad_in,
                                                               const at::Tensor& x_in,
                                                               const at::Tensor& weight_in,
                                                               bool x_grad) {
  for (const auto* t : {&grad_in, &x_in, &weight_in}) check(*t, "linear_backward");
  const auto grad = grad_in.contiguous();
  const auto x = x_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t rows = x.size(0), inputs = x.size(1), outputs = weight.size(0);
  const int64_t width = outputs * inputs + outputs;  // a block's [dL/dW, dL/dbias]
  const int64_t block = std::max(
      kLinearRows, ((rows + kLinearBlocks - 1) / kLinearBlocks + kRowsPerTask - 1) /
                       kRowsPerTask * kRowsPerTask);
  const int64_t blocks = (rows + block - 1) / block;
  auto d_x = x_grad ? at::empty({rows, inputs}, x.options()) : at::empty({0}, x.options());
  auto partial = at::zeros({std::max<int64_t>(blocks, 1), width}, x.options());
  const float *gp = grad.data_ptr<float>(), *xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* dxp = x_grad ? d_x.data_ptr<float>() : nullptr;
  float* sums = partial.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      float* d_weight = sums + b * width;
      float* d_bias = d_weight + outputs * inputs;
      const int64_t end = std::min(rows, (b + 1) * block);
      for (int64_t r0 = b * block; r0 < end; r0 += kLinearRows) {
        const int64_t n = std::min(end, r0 + kLinearRows) - r0;
        const float* g = gp + r0 * outputs;
        if (x_grad) {  // dL/dx = dL/dout W
          gemm(false, false, n, inputs, outputs, g, outputs, wp, inputs, 0.f, dxp + r0 * inputs,
               inputs);
        }
        // += dL/dout^T x (the block's part starts at zero)
        gemm(true, false, outputs, inputs, n, g, outputs, xp + r0 * inputs, inputs, 1.f,
             d_weight, inputs);
        for (int64_t i = 0; i < n; ++i) add_into(outputs, g + i * outputs, d_bias, false);
      }
    }
  });
  const auto total = partial.sum(0);
  return {d_x, total.narrow(0, 0, outputs * inputs).view({outputs, inputs}),
          total.narrow(0, outputs * inputs, outputs)};
}

TORCH_LIBRARY(attention_ctr_kernels, m) {
  m.def("matmul_backend() -> str", &matmul_backend);
  m.def("row_dots(Tensor x, Tensor v) -> Tensor");
  m.def("weighted_rows(Tensor w, Tensor x) -> Tensor");
  m.def("outer_rows(Tensor w, Tensor v) -> Tensor");
  m.def("linear_forward(Tensor x, Tensor weight, Tensor bias, Tensor addend) -> Tensor");
  m.def("linear_backward(Tensor grad, Tensor x, Tensor weight, bool x_grad)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("din_unit_input_forward(Tensor history, Tensor target, Tensor index) -> Tensor");
  m.def("din_unit_input_backward(Tensor grad, Tensor history, Tensor target, Tensor index)"
        " -> (Tensor, Tensor)");
  m.def("sample_rows_forward(Tensor x, Tensor index, int length) -> Tensor");
  m.def("sample_rows_backward(Tensor grad, Tensor index, int batch, int length) -> Tensor");
  m.def("packed_attention_forward(Tensor qkv, Tensor bias, Tensor keep, int heads)"
        " -> (Tensor, Tensor)");
  m.def("packed_attention_backward(Tensor grad, Tensor qkv, Tensor bias, Tensor keep, Tensor lse,"
        " int heads) -> (Tensor, Tensor)");
  m.def("bias_dropout_forward(Tensor z, Tensor bias, Tensor residual, bool leaky, float slope,"
        " int threshold, int seed) -> Tensor");
  m.def("bias_dropout_backward(Tensor grad, Tensor z, Tensor bias, bool leaky, float slope,"
        " int threshold, int seed) -> (Tensor, Tensor)");
  m.def("dropout_forward(Tensor x, int threshold, int seed) -> Tensor");
  m.def("dropout_backward(Tensor grad, int threshold, int seed) -> Tensor");
  m.def("prelu_head_forward(Tensor x, Tensor w1, Tensor shared, Tensor w_shared, Tensor b1,"
        " Tensor s1, Tensor w2, Tensor b2, Tensor s2, Tensor w_out, Tensor b_out, bool bf16)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("prelu_head_backward(Tensor grad, Tensor x, Tensor w1, Tensor shared, Tensor w_shared,"
        " Tensor h1, Tensor h2, Tensor s1, Tensor w2, Tensor s2, Tensor w_out, bool bf16)"
        " -> Tensor[]");
  m.def("concat_lookup_forward(Tensor[] tables, Tensor[] ids) -> Tensor");
  m.def("concat_lookup_backward(Tensor grad, Tensor[] ids, int[] rows, int[] widths)"
        " -> Tensor[]");
  m.def("pair_lookup_forward(Tensor item_table, Tensor category_table, Tensor[] item_ids,"
        " Tensor[] category_ids) -> Tensor[]");
  m.def("pair_lookup_backward(Tensor[] grads, Tensor[] item_ids, Tensor[] category_ids,"
        " int n_items, int item_width, int n_categories, int category_width) -> (Tensor, Tensor)");
  m.def("dice_forward(Tensor x, Tensor alpha, Tensor weights, float eps)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dice_backward(Tensor grad, Tensor x, Tensor alpha, Tensor weights, Tensor mean,"
        " Tensor var, Tensor count, float eps) -> (Tensor, Tensor)");
  m.def("prelu_linear_forward(Tensor z, Tensor bias, Tensor slope, Tensor out_weight,"
        " Tensor out_bias) -> (Tensor, Tensor)");
  m.def("prelu_linear_backward(Tensor grad, Tensor h, Tensor slope, Tensor out_weight)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gather_positions_forward(Tensor[] sources, Tensor row, Tensor position) -> Tensor");
  m.def("gather_positions_backward(Tensor grad, Tensor row, Tensor position, int batch,"
        " int length) -> Tensor");
  m.def("bias_prelu_forward(Tensor z, Tensor bias, Tensor slope, Tensor addend)"
        " -> (Tensor, Tensor)");
  m.def("bias_prelu_backward(Tensor grad, Tensor h, Tensor slope, int period)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_forward(Tensor x, Tensor weight_ih, Tensor bias_ih, Tensor weight, Tensor bias,"
        " Tensor attention, Tensor lengths, bool final_only, bool bf16)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_backward(Tensor upstream, Tensor x, Tensor states, Tensor saved, Tensor order,"
        " Tensor lengths, Tensor weight_ih, Tensor weight, Tensor attention, bool bf16)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(attention_ctr_kernels, CPU, m) {
  m.impl("linear_forward", &linear_forward);
  m.impl("row_dots", &row_dots);
  m.impl("weighted_rows", &weighted_rows);
  m.impl("outer_rows", &outer_rows);
  m.impl("linear_backward", &linear_backward);
  m.impl("din_unit_input_forward", &din_unit_input_forward);
  m.impl("din_unit_input_backward", &din_unit_input_backward);
  m.impl("sample_rows_forward", &sample_rows_forward);
  m.impl("sample_rows_backward", &sample_rows_backward);
  m.impl("packed_attention_forward", &packed_attention_forward);
  m.impl("packed_attention_backward", &packed_attention_backward);
  m.impl("bias_dropout_forward", &bias_dropout_forward);
  m.impl("bias_dropout_backward", &bias_dropout_backward);
  m.impl("dropout_forward", &dropout_forward);
  m.impl("dropout_backward", &dropout_backward);
  m.impl("prelu_head_forward", &prelu_head_forward);
  m.impl("prelu_head_backward", &prelu_head_backward);
  m.impl("concat_lookup_forward", &concat_lookup_forward);
  m.impl("concat_lookup_backward", &concat_lookup_backward);
  m.impl("pair_lookup_forward", &pair_lookup_forward);
  m.impl("pair_lookup_backward", &pair_lookup_backward);
  m.impl("dice_forward", &dice_forward);
  m.impl("dice_backward", &dice_backward);
  m.impl("gated_forward", &gated_forward);
  m.impl("gated_backward", &gated_backward);
  m.impl("bias_prelu_forward", &bias_prelu_forward);
  m.impl("bias_prelu_backward", &bias_prelu_backward);
  m.impl("gather_positions_forward", &gather_positions_forward);
  m.impl("prelu_linear_forward", &prelu_linear_forward);
  m.impl("prelu_linear_backward", &prelu_linear_backward);
  m.impl("gather_positions_backward", &gather_positions_backward);
}

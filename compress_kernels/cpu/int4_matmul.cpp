// GPTQ int4 matmul on CPU without dequantizing the weight: y[m, n] = sum over runs r of
//   s[g_r, n] * sum_{k in r} x[m, k] * q[k, n]  -  sz[g_r, n] * sum_{k in r} x[m, k]
// where a run is a stretch of input channels sharing one group g_r (after the load-time sort by group
// for act-order), s the scale and sz = s * zero. Codes stay packed 8 per int32 word as GPTQ stores them
// (word (k/8, n) holds code k in bits 4*(k%8)), but the loader regroups the words in panels of 16
// outputs: panel p is [ceil(K/8), 16] contiguous, so a task streams a few sequential panels instead of
// one 64-byte piece per page of the [ceil(K/8), N] matrix (which thrashed the TLB when N*4 was a power
// of two). One vector load yields 8 codes for each of 16 outputs, decoded with shift, mask and convert;
// the accumulators of a tile of outputs stay in registers over a whole run. The last N % 16 outputs
// keep the GPTQ order in a small separate matrix.
// GCC vector extensions keep this portable (AVX-512, AVX2 or SSE, whatever -march gives).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef int32_t vi __attribute__((vector_size(kLanes * 4)));
typedef uint32_t vu __attribute__((vector_size(kLanes * 4)));

inline vu load_u(const int32_t* p) {
  vu v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline vf decode(vu w, int shift) { return __builtin_convertvector((vi)((w >> shift) & 15u), vf); }

// MB rows of x times V*16 outputs starting at n0 (all within N): the main tile
// the 16 words of row r of the panel that holds outputs n0 .. n0 + 15
inline const int32_t* panel_row(const int32_t* panels, int64_t rows, int64_t n0, int64_t r) {
  return panels + ((n0 / kLanes) * rows + r) * kLanes;
}

template <int MB, int V>
void full_tile(const float* x, int64_t K, const int32_t* qw, int64_t N, const float* s, const float* sz,
               const int32_t* starts, const int32_t* groups, int64_t runs, int64_t n0, float* y) {
  const int64_t rows = (K + 7) / 8;
  vf out[MB][V] = {};
  for (int64_t r = 0; r < runs; ++r) {
    const int64_t ka = starts[r], kb = starts[r + 1];
    vf acc[MB][V] = {};
    float xsum[MB] = {};
    int64_t k = ka;
    // whole words: 8 codes per load
    if ((ka & 7) == 0) {
      for (; k + 8 <= kb; k += 8) {
        vu w[V];
        for (int v = 0; v < V; ++v) w[v] = load_u(panel_row(qw, rows, n0 + v * kLanes, k >> 3));
        for (int j = 0; j < 8; ++j) {
          vf q[V];
          for (int v = 0; v < V; ++v) q[v] = decode(w[v], 4 * j);
          for (int i = 0; i < MB; ++i) {
            const float xv = x[i * K + k + j];
            xsum[i] += xv;
            for (int v = 0; v < V; ++v) acc[i][v] += xv * q[v];
          }
        }
      }
    }
    // codes of a run that starts or ends inside a word
    for (; k < kb; ++k) {
      for (int v = 0; v < V; ++v) {
        const vf q = decode(load_u(panel_row(qw, rows, n0 + v * kLanes, k >> 3)), 4 * static_cast<int>(k & 7));
        for (int i = 0; i < MB; ++i) acc[i][v] += x[i * K + k] * q;
      }
      for (int i = 0; i < MB; ++i) xsum[i] += x[i * K + k];
    }
    const float* sg = s + groups[r] * N + n0;
    const float* zg = sz + groups[r] * N + n0;
    for (int v = 0; v < V; ++v) {
      vf sv, zv;
      std::memcpy(&sv, sg + v * kLanes, sizeof(sv));
      std::memcpy(&zv, zg + v * kLanes, sizeof(zv));
      for (int i = 0; i < MB; ++i) out[i][v] += sv * acc[i][v] - zv * xsum[i];
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < V; ++v) std::memcpy(y + i * N + n0 + v * kLanes, &out[i][v], sizeof(vf));
}

// scalar code for the last N % 16 outputs
// edge: int32 [ceil(K/8), N - n0] words of the last outputs
void edge_columns(const float* x, int64_t M, int64_t K, const int32_t* edge, int64_t N, const float* s,
                  const float* sz, const int32_t* starts, const int32_t* groups, int64_t runs, int64_t n0,
                  float* y) {
  const int64_t E = N - n0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < N; ++n) {
      float out = 0.f;
      for (int64_t r = 0; r < runs; ++r) {
        float acc = 0.f, xsum = 0.f;
        for (int64_t k = starts[r]; k < starts[r + 1]; ++k) {
          const uint32_t w = static_cast<uint32_t>(edge[(k >> 3) * E + (n - n0)]);
          const float xv = x[m * K + k];
          acc += xv * static_cast<float>((w >> (4 * (k & 7))) & 15u);
          xsum += xv;
        }
        out += s[groups[r] * N + n] * acc - sz[groups[r] * N + n] * xsum;
      }
      y[m * N + n] = out;
    }
}

template <int V>
void column_block(const float* x, int64_t M, int64_t K, const int32_t* qw, int64_t N, const float* s,
                  const float* sz, const int32_t* st, const int32_t* gr, int64_t runs, int64_t n0, float* y) {
  int64_t m = 0;
  // rows of x in passes of 4 (one decode serves every row of a pass), then one at a time
  for (; m + 4 <= M; m += 4) full_tile<4, V>(x + m * K, K, qw, N, s, sz, st, gr, runs, n0, y + m * N);
  for (; m < M; ++m) full_tile<1, V>(x + m * K, K, qw, N, s, sz, st, gr, runs, n0, y + m * N);
}

}  // namespace

// x float32 [M, K]; panels int32 [N / 16, ceil(K/8), 16]; edge int32 [ceil(K/8), N % 16]; scales, scaled_zeros float32 [G, N];
// run_starts int32 [R + 1] (0 .. K), run_groups int32 [R]. Returns float32 [M, N].
// parallel: split the outputs over torch's intra-op threads (worth it only for large products: waking
// the thread team costs more than a one-row product takes on a shared, loaded machine).
torch::Tensor int4_matmul(torch::Tensor x, torch::Tensor panels, torch::Tensor edge, torch::Tensor scales, torch::Tensor scaled_zeros,
                          torch::Tensor run_starts, torch::Tensor run_groups, bool parallel) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x must be contiguous float32 [M, K]");
  TORCH_CHECK(panels.dtype() == torch::kInt32 && panels.is_contiguous() && panels.dim() == 3 && edge.dtype() == torch::kInt32 &&
                  edge.is_contiguous() && edge.dim() == 2, "panels and edge must be contiguous int32 [P, R, 16], [R, E]");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && scaled_zeros.dtype() == torch::kFloat32 && scales.is_contiguous() &&
                  scaled_zeros.is_contiguous(), "scales must be contiguous float32");
  TORCH_CHECK(run_starts.dtype() == torch::kInt32 && run_groups.dtype() == torch::kInt32, "runs must be int32");
  const int64_t M = x.size(0), K = x.size(1), N = panels.size(0) * kLanes + edge.size(1), runs = run_groups.size(0);
  TORCH_CHECK(panels.size(1) == (K + 7) / 8 && edge.size(0) == (K + 7) / 8, "packed rows do not match K");
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int32_t* qp = panels.data_ptr<int32_t>();
  const int32_t* ep = edge.data_ptr<int32_t>();
  const float* sp = scales.data_ptr<float>();
  const float* zp = scaled_zeros.data_ptr<float>();
  const int32_t* st = run_starts.data_ptr<int32_t>();
  const int32_t* gr = run_groups.data_ptr<int32_t>();
  float* yp = y.data_ptr<float>();
  constexpr int64_t kWide = 4 * kLanes;  // 64 outputs per task with M < 4, 32 otherwise (register budget)
  const int64_t width = M < 4 ? kWide : 2 * kLanes;
  const int64_t tiles = N / width;
  auto body = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (width == kWide)
        column_block<4>(xp, M, K, qp, N, sp, zp, st, gr, runs, t * width, yp);
      else
        column_block<2>(xp, M, K, qp, N, sp, zp, st, gr, runs, t * width, yp);
    }
  };
  if (parallel)
    at::parallel_for(0, tiles, 1, body);
  else
    body(0, tiles);
  int64_t n0 = tiles * width;
  for (; n0 + kLanes <= N; n0 += kLanes) column_block<1>(xp, M, K, qp, N, sp, zp, st, gr, runs, n0, yp);
  if (n0 < N) edge_columns(xp, M, K, ep, N, sp, zp, st, gr, runs, n0, yp);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_matmul", &int4_matmul, "GPTQ int4 matmul on CPU (float32 in, float32 out)");
}

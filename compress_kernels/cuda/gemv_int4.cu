// One-row GEMV for GPTQ int4 weights: y[n] = sum_k x[k] * s[g(k), n] * (q[k, n] - z[g(k), n]).
//
// Memory bound: every weight byte is read once. Each thread owns 4 adjacent outputs and reads one
// 16-byte vector per packed row (8 input channels x 4 outputs), so a warp reads 512 contiguous bytes.
// Blocks split K (blockIdx.y) so that even a square GEMV launches a few blocks per SM; threadIdx.y splits
// a block's rows further, partial sums meet in shared memory, and one atomicAdd per output and block
// lands in a float32 result. Scale and zero are applied once per packed word: the group is constant
// over a word (the loader guarantees group_size % 8 == 0 and channels sorted by group), so
// s * (sum_j x_j q_j - z * sum_j x_j) replaces eight multiply-subtracts.
//
// Plain CUDA, no torch headers: gemv_int4.cpp binds it, and a test compiles this file with nvcc alone.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace {

constexpr int kThreadsX = 64;  // 4 outputs each: 256 outputs per block
constexpr int kThreadsY = 4;   // row slices per block

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__global__ void __launch_bounds__(kThreadsX * kThreadsY)
gemv_int4_kernel(const T* __restrict__ x, const int32_t* __restrict__ qweight, const __half* __restrict__ scales,
                 const int32_t* __restrict__ qzeros, const int32_t* __restrict__ g_idx, float* __restrict__ out,
                 int K, int N, int rows_per_block, int zero_offset) {
  const int n0 = (blockIdx.x * kThreadsX + threadIdx.x) * 4;
  const int rows = (K + 7) / 8;
  const int r_begin = blockIdx.y * rows_per_block;
  const int r_end = min(r_begin + rows_per_block, rows);
  const int nz = (N + 7) / 8;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (n0 < N) {
    int group = -1;
    float s[4], z[4];
    for (int r = r_begin + threadIdx.y; r < r_end; r += kThreadsY) {
      const int4 w = __ldg(reinterpret_cast<const int4*>(qweight + static_cast<size_t>(r) * N + n0));
      const int g = __ldg(g_idx + r * 8);
      if (g != group) {  // a new group: its scales and zeros for our 4 outputs
        group = g;
        const int32_t zw = __ldg(qzeros + static_cast<size_t>(g) * nz + n0 / 8);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          s[c] = __half2float(scales[static_cast<size_t>(g) * N + n0 + c]);
          z[c] = static_cast<float>(((zw >> (((n0 + c) % 8) * 4)) + zero_offset) & 15);
        }
      }
      const uint32_t words[4] = {static_cast<uint32_t>(w.x), static_cast<uint32_t>(w.y), static_cast<uint32_t>(w.z),
                                 static_cast<uint32_t>(w.w)};
      float dot[4] = {0.f, 0.f, 0.f, 0.f};
      float xsum = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int k = r * 8 + j;
        const float xv = k < K ? to_float(x[k]) : 0.f;  // padded channels have code 0 and contribute 0
        xsum += xv;
#pragma unroll
        for (int c = 0; c < 4; ++c) dot[c] += xv * static_cast<float>((words[c] >> (4 * j)) & 15u);
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[c] += s[c] * (dot[c] - z[c] * xsum);
    }
  }
  __shared__ float partial[kThreadsY][kThreadsX * 4];
#pragma unroll
  for (int c = 0; c < 4; ++c) partial[threadIdx.y][threadIdx.x * 4 + c] = acc[c];
  __syncthreads();
  if (threadIdx.y == 0 && n0 < N) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      float sum = 0.f;
#pragma unroll
      for (int t = 0; t < kThreadsY; ++t) sum += partial[t][threadIdx.x * 4 + c];
      atomicAdd(out + n0 + c, sum);
    }
  }
}

}  // namespace

// out: float32 [N], zeroed by the caller. bf16: x is bfloat16 (else float16). Returns a cudaError_t.
int launch_gemv_int4(bool bf16, const void* x, const int32_t* qweight, const void* scales, const int32_t* qzeros,
                     const int32_t* g_idx, float* out, int K, int N, int split, int zero_offset, void* stream) {
  const int rows = (K + 7) / 8;
  const int rows_per_block = (rows + split - 1) / split;
  const dim3 block(kThreadsX, kThreadsY);
  const dim3 grid((N + kThreadsX * 4 - 1) / (kThreadsX * 4), split);
  auto s = static_cast<cudaStream_t>(stream);
  if (bf16)
    gemv_int4_kernel<__nv_bfloat16><<<grid, block, 0, s>>>(static_cast<const __nv_bfloat16*>(x), qweight,
                                                           static_cast<const __half*>(scales), qzeros, g_idx, out,
                                                           K, N, rows_per_block, zero_offset);
  else
    gemv_int4_kernel<__half><<<grid, block, 0, s>>>(static_cast<const __half*>(x), qweight,
                                                   static_cast<const __half*>(scales), qzeros, g_idx, out, K, N,
                                                   rows_per_block, zero_offset);
  return static_cast<int>(cudaGetLastError());
}

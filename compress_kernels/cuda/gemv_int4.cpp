// torch binding of the int4 GEMV in gemv_int4.cu (kept apart so the kernel compiles with nvcc alone).
#include <torch/extension.h>

int launch_gemv_int4(bool bf16, const void* x, const int32_t* qweight, const void* scales, const int32_t* qzeros,
                     const int32_t* g_idx, float* out, int K, int N, int split, int zero_offset, void* stream);

// x [K] float16/bfloat16; qweight int32 [ceil(K/8), N]; scales float16 [G, N]; qzeros int32 [G, ceil(N/8)];
// g_idx int32 [ceil(K/8)*8] (sorted, constant over each packed word); out float32 [N], zeroed.
void gemv_int4(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor qzeros, torch::Tensor g_idx,
               torch::Tensor out, int64_t zero_offset, int64_t split, int64_t stream) {
  TORCH_CHECK(x.is_cuda() && x.is_contiguous() && x.dim() == 1, "x must be a contiguous CUDA vector");
  TORCH_CHECK(x.scalar_type() == torch::kHalf || x.scalar_type() == torch::kBFloat16, "x must be float16 or bfloat16");
  TORCH_CHECK(qweight.is_contiguous() && qweight.scalar_type() == torch::kInt32, "qweight must be contiguous int32");
  TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == torch::kHalf, "scales must be contiguous float16");
  TORCH_CHECK(qzeros.is_contiguous() && g_idx.is_contiguous(), "qzeros and g_idx must be contiguous");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.numel() == qweight.size(1), "out must be float32 [N]");
  TORCH_CHECK(qweight.size(1) % 4 == 0, "N must be a multiple of 4");
  const int err = launch_gemv_int4(x.scalar_type() == torch::kBFloat16, x.data_ptr(), qweight.data_ptr<int32_t>(),
                                   scales.data_ptr(), qzeros.data_ptr<int32_t>(), g_idx.data_ptr<int32_t>(),
                                   out.data_ptr<float>(), static_cast<int>(x.numel()), static_cast<int>(qweight.size(1)),
                                   static_cast<int>(split), static_cast<int>(zero_offset), reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "gemv_int4 launch failed with CUDA error ", err);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_int4", &gemv_int4, "GPTQ int4 GEMV (one row) on CUDA");
}

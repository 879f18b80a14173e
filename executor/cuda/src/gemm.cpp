#include "parallax/executor/cuda/gemm.hpp"

#include "parallax/core/error.hpp"
#include "parallax/executor/cuda/check.hpp"
#include "parallax/executor/cuda/device_allocator.hpp"

#include <cstdint>
#include <memory>
#include <string>

namespace parallax::cuda {

namespace {

std::string shape_text(DeviceView v) {
  return "[" + std::to_string(v.rows) + ", " + std::to_string(v.cols) + "] " + dtype_name(v.dtype);
}

void check_shape(DeviceView v, std::int64_t rows, std::int64_t cols, DType dtype,
                 const char* what) {
  PARALLAX_CHECK(v.rows == rows && v.cols == cols && v.dtype == dtype,
                 std::string(what) + " is " + shape_text(v) + ", expected [" +
                     std::to_string(rows) + ", " + std::to_string(cols) + "] " + dtype_name(dtype));
}

// The largest power of two (≤ 256) dividing the address: what cuBLASLt may assume.
std::uint32_t pointer_alignment(const void* p) {
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  std::uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0)
    alignment /= 2;
  return alignment;
}

struct DescDeleter {
  void operator()(cublasLtMatmulDescOpaque_t* d) const { (void)cublasLtMatmulDescDestroy(d); }
  void operator()(cublasLtMatrixLayoutOpaque_t* l) const { (void)cublasLtMatrixLayoutDestroy(l); }
  void operator()(cublasLtMatmulPreferenceOpaque_t* p) const {
    (void)cublasLtMatmulPreferenceDestroy(p);
  }
};
using MatmulDesc = std::unique_ptr<cublasLtMatmulDescOpaque_t, DescDeleter>;
using Layout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, DescDeleter>;
using Preference = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, DescDeleter>;

// A column-major layout of `rows` × `cols` with leading dimension `ld`.
Layout make_layout(cudaDataType_t type, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  cublasLtMatrixLayout_t layout = nullptr;
  PARALLAX_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&layout, type, static_cast<std::uint64_t>(rows),
                                                   static_cast<std::uint64_t>(cols), ld));
  return Layout(layout);
}

template <class T>
void set_attribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute,
                   const T& value) {
  PARALLAX_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)));
}

template <class T>
void set_preference(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attribute,
                    const T& value) {
  PARALLAX_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref, attribute, &value, sizeof(value)));
}

struct Operand {
  const void* data;
  Layout layout;
  cublasOperation_t op;
};

// A row-major [rows, cols] buffer seen by cuBLASLt: column-major cols × rows, ld = cols.
Operand make_operand(DeviceView v, bool transpose, cudaDataType_t type) {
  return {v.data, make_layout(type, v.cols, v.rows, v.cols), transpose ? CUBLAS_OP_T : CUBLAS_OP_N};
}

} // namespace

const char* gemm_precision_name(GemmPrecision p) {
  switch (p) {
  case GemmPrecision::f32:
    return "f32";
  case GemmPrecision::tf32:
    return "tf32";
  case GemmPrecision::bf16:
    return "bf16";
  }
  return "?";
}

DType gemm_input_dtype(GemmPrecision p) {
  return p == GemmPrecision::bf16 ? DType::bf16 : DType::f32;
}

Blas::Blas(DeviceAllocator& allocator) : allocator_(&allocator) {
  PARALLAX_CUBLAS_CHECK(cublasLtCreate(&handle_));
  workspace_ = allocator.allocate(kWorkspaceBytes);
}

Blas::~Blas() {
  allocator_->deallocate(workspace_);
  (void)cublasLtDestroy(handle_);
}

namespace {

void set_batch(const Layout& layout, std::int64_t count, std::int64_t stride) {
  const std::int32_t n = static_cast<std::int32_t>(count);
  PARALLAX_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(
      layout.get(), CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &n, sizeof(n)));
  PARALLAX_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(
      layout.get(), CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
}

void matmul_impl(Blas& blas, GemmPrecision precision, DeviceView a, bool transpose_a, DeviceView b,
                 bool transpose_b, DeviceView c, float alpha, float beta, DeviceView bias,
                 const GemmBatch& batch, cudaStream_t stream);

} // namespace

void matmul(Blas& blas, GemmPrecision precision, DeviceView a, bool transpose_a, DeviceView b,
            bool transpose_b, DeviceView c, float alpha, float beta, DeviceView bias,
            cudaStream_t stream) {
  matmul_impl(blas, precision, a, transpose_a, b, transpose_b, c, alpha, beta, bias, GemmBatch{},
              stream);
}

void matmul_batched(Blas& blas, GemmPrecision precision, DeviceView a, bool transpose_a,
                    DeviceView b, bool transpose_b, DeviceView c, float alpha, float beta,
                    const GemmBatch& batch, cudaStream_t stream) {
  PARALLAX_CHECK(batch.count >= 1 && batch.count <= INT32_MAX, "matmul batch count out of range");
  PARALLAX_CHECK(batch.count == 1 || (batch.stride_c >= c.rows * c.cols && batch.stride_a >= 0 &&
                                      batch.stride_b >= 0),
                 "matmul batch strides overlap the outputs (stride_c " +
                     std::to_string(batch.stride_c) + " < " + std::to_string(c.rows * c.cols) +
                     ") or are negative");
  matmul_impl(blas, precision, a, transpose_a, b, transpose_b, c, alpha, beta, {}, batch, stream);
}

namespace {

void matmul_impl(Blas& blas, GemmPrecision precision, DeviceView a, bool transpose_a, DeviceView b,
                 bool transpose_b, DeviceView c, float alpha, float beta, DeviceView bias,
                 const GemmBatch& batch, cudaStream_t stream) {
  const DType in = gemm_input_dtype(precision);
  const std::int64_t m = transpose_a ? a.cols : a.rows;
  const std::int64_t k = transpose_a ? a.rows : a.cols;
  const std::int64_t n = transpose_b ? b.rows : b.cols;
  const std::int64_t kb = transpose_b ? b.cols : b.rows;
  PARALLAX_CHECK(a.dtype == in && b.dtype == in, std::string("matmul ") +
                                                     gemm_precision_name(precision) + " takes " +
                                                     dtype_name(in) + " inputs, got A " +
                                                     shape_text(a) + " and B " + shape_text(b));
  PARALLAX_CHECK(k == kb,
                 "matmul inner dimensions differ: A " + shape_text(a) + ", B " + shape_text(b));
  check_shape(c, m, n, DType::f32, "matmul output");
  if (bias)
    check_shape(bias, 1, n, DType::f32, "matmul bias");
  PARALLAX_CHECK(m > 0 && n > 0 && k > 0, "matmul with an empty dimension");

  const cudaDataType_t in_type = in == DType::bf16 ? CUDA_R_16BF : CUDA_R_32F;
  const cublasComputeType_t compute =
      precision == GemmPrecision::tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;

  // Cᵀ (n × m) = op(B)ᵀ (n × k) · op(A)ᵀ (k × m): cuBLASLt's A is our B and vice versa.
  const Operand lt_a = make_operand(b, transpose_b, in_type);
  const Operand lt_b = make_operand(a, transpose_a, in_type);
  const Layout lt_c = make_layout(CUDA_R_32F, n, m, n);
  if (batch.count > 1) {
    // cuBLASLt's A is our B and its B our A (see above).
    set_batch(lt_a.layout, batch.count, batch.stride_b);
    set_batch(lt_b.layout, batch.count, batch.stride_a);
    set_batch(lt_c, batch.count, batch.stride_c);
  }

  cublasLtMatmulDesc_t raw_desc = nullptr;
  PARALLAX_CUBLAS_CHECK(cublasLtMatmulDescCreate(&raw_desc, compute, CUDA_R_32F));
  const MatmulDesc desc(raw_desc);
  set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_TRANSA, lt_a.op);
  set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_TRANSB, lt_b.op);

  cublasLtMatmulPreference_t raw_pref = nullptr;
  PARALLAX_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&raw_pref));
  const Preference pref(raw_pref);
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, Blas::kWorkspaceBytes);
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, pointer_alignment(b.data));
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, pointer_alignment(a.data));
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, pointer_alignment(c.data));
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, pointer_alignment(c.data));

  auto find_algorithm = [&](cublasLtMatmulHeuristicResult_t& result) {
    int found = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
        blas.handle(), raw_desc, lt_a.layout.get(), lt_b.layout.get(), lt_c.get(), lt_c.get(),
        raw_pref, 1, &result, &found);
    return status == CUBLAS_STATUS_SUCCESS && found > 0;
  };

  cublasLtMatmulHeuristicResult_t heuristic{};
  bool bias_fused = false;
  if (bias) {
    const void* bias_ptr = bias.data;
    set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS);
    set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias_ptr);
    bias_fused = find_algorithm(heuristic);
    if (!bias_fused)
      set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_DEFAULT);
  }
  if (!bias_fused) {
    PARALLAX_CHECK(find_algorithm(heuristic), std::string("cuBLASLt found no algorithm for a ") +
                                                  gemm_precision_name(precision) + " matmul of A " +
                                                  shape_text(a) + (transpose_a ? "ᵀ" : "") +
                                                  " and B " + shape_text(b) +
                                                  (transpose_b ? "ᵀ" : ""));
  }
  PARALLAX_CUBLAS_CHECK(cublasLtMatmul(blas.handle(), raw_desc, &alpha, lt_a.data,
                                       lt_a.layout.get(), lt_b.data, lt_b.layout.get(), &beta,
                                       c.data, lt_c.get(), c.data, lt_c.get(), &heuristic.algo,
                                       blas.workspace(), Blas::kWorkspaceBytes, stream));
  if (bias && !bias_fused)
    add_bias(c, bias, stream);
}

} // namespace

void linear_forward(Blas& blas, DeviceView x, DeviceView w, DeviceView b, DeviceView y,
                    GemmPrecision precision, cudaStream_t stream) {
  const DType in = gemm_input_dtype(precision);
  check_shape(w, x.cols, y.cols, in, "linear weight");
  check_shape(y, x.rows, w.cols, DType::f32, "linear output");
  matmul(blas, precision, x, false, w, false, y, 1.0f, 0.0f, b, stream);
}

void linear_backward(Blas& blas, DeviceView x, DeviceView w, DeviceView dy, DeviceView dx,
                     DeviceView dw, DeviceView db, GemmPrecision precision, cudaStream_t stream,
                     bool accumulate_dx) {
  const DType in = gemm_input_dtype(precision);
  check_shape(dy, x.rows, w.cols, in, "linear output gradient");
  check_shape(dw, w.rows, w.cols, DType::f32, "linear weight gradient");
  if (dx) {
    check_shape(dx, x.rows, x.cols, DType::f32, "linear input gradient");
    matmul(blas, precision, dy, false, w, true, dx, 1.0f, accumulate_dx ? 1.0f : 0.0f, {}, stream);
  }
  matmul(blas, precision, x, true, dy, false, dw, 1.0f, 1.0f, {}, stream);
  if (db) {
    check_shape(db, 1, w.cols, DType::f32, "linear bias gradient");
    accumulate_column_sums(dy, db, stream);
  }
}

} // namespace parallax::cuda

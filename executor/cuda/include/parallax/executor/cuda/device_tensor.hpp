// Device tensors: owning rows × cols row-major matrices in device memory from a
// DeviceAllocator, in fp32 or bf16, and the non-owning DeviceView that ops take.
//
// Mixed precision: parameters live as fp32 master tensors (what AdamW updates and checkpoints
// store); GEMM inputs may be bf16 copies (convert_f32_to_bf16, or AdamW's bf16 output), with
// fp32 accumulation and fp32 outputs. Every other op reads and writes fp32.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <span>
#include <vector>

namespace parallax::cuda {

class DeviceAllocator;

enum class DType : std::uint8_t { f32, bf16 };

constexpr std::int64_t dtype_bytes(DType t) {
  return t == DType::f32 ? 4 : 2;
}
const char* dtype_name(DType t);

// A non-owning view of a rows × cols row-major block of device memory; an empty view
// (data == nullptr) means "absent" where an op takes an optional operand. Device memory is
// not const-checked by the host, so one view type serves inputs and outputs; op signatures
// say which is which.
struct DeviceView {
  void* data = nullptr;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  DType dtype = DType::f32;

  std::int64_t size() const { return rows * cols; }
  std::int64_t bytes() const { return size() * dtype_bytes(dtype); }
  explicit operator bool() const { return data != nullptr; }
  // Typed pointers; throw (PARALLAX_CHECK) when the dtype differs.
  float* f32() const;
  std::uint16_t* bf16_bits() const;
};

class DeviceTensor {
public:
  DeviceTensor() = default;
  // Uninitialised storage (outputs an op overwrites); call zero() for accumulators.
  DeviceTensor(DeviceAllocator& allocator, std::int64_t rows, std::int64_t cols,
               DType dtype = DType::f32);
  ~DeviceTensor();
  DeviceTensor(DeviceTensor&& other) noexcept;
  DeviceTensor& operator=(DeviceTensor&& other) noexcept;
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;

  std::int64_t rows() const { return rows_; }
  std::int64_t cols() const { return cols_; }
  std::int64_t size() const { return rows_ * cols_; }
  DType dtype() const { return dtype_; }
  bool empty() const { return data_ == nullptr; }
  void* data() const { return data_; }
  DeviceView view() const { return {data_, rows_, cols_, dtype_}; }
  operator DeviceView() const { return view(); } // NOLINT: tensors pass as views

  // Synchronous copies: copy_from_host returns once the data are on the device (usable from
  // any stream); to_host does not wait for non-blocking streams, so synchronise the stream
  // that produced the data first. bf16 tensors round to nearest even on the way in and widen
  // exactly on the way out.
  void copy_from_host(std::span<const float> values);
  std::vector<float> to_host() const;
  // Sets every byte to zero on `stream` (0.0f and bf16 +0 are both all-zero bits).
  void zero(cudaStream_t stream = nullptr);
  // Frees the storage back to the allocator (recomputation and ZeRO-3 drop buffers this way).
  void release();

private:
  DeviceAllocator* allocator_ = nullptr;
  void* data_ = nullptr;
  std::int64_t rows_ = 0;
  std::int64_t cols_ = 0;
  DType dtype_ = DType::f32;
};

// Host-side bf16 rounding (round to nearest even, NaN kept quiet) and widening, bit-identical
// to __float2bfloat16 / __bfloat162float on the device.
std::uint16_t bf16_from_float(float value);
float float_from_bf16(std::uint16_t bits);

} // namespace parallax::cuda

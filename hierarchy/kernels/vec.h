// Shared by the fused LSTM kernels: 16-float vectors, 2^z and aligned scratch.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

namespace hierarchy_kernels {
// Internal to each file that includes this, so that every call is inlined: a
// function of a shared library's own namespace is called through its PLT.
namespace {

// GCC and Clang vector types: 16 floats, one 512-bit register (two 256-bit ones
// without AVX-512).
typedef float Vec __attribute__((vector_size(64)));
typedef int32_t IVec __attribute__((vector_size(64)));
constexpr int64_t kWidth = 16;

__attribute__((always_inline)) inline Vec splat(float value) { return Vec{} + value; }

// 2^z for z clamped to [-36, 36]: z = n + r with n an integer and |r| <= 1/2,
// 2^r = e^(r ln2) by its Taylor series to degree 6 (relative error about 1e-7,
// the float rounding), 2^n written into the float's exponent. The clamp moves a
// sigmoid by at most 1.5e-11 and keeps products of three factors 1 + 2^z finite.
// Plain arithmetic on vector types, so it compiles for any x86 or ARM target.
__attribute__((always_inline)) inline Vec exp2_approx(Vec z) {
  z = z < -36.0f ? splat(-36.0f) : z;
  z = z > 36.0f ? splat(36.0f) : z;

  // Adding 1.5 * 2^23 rounds to an integer n and leaves n in the low bits of the
  // sum, so the sum's bits shifted by 23 are n in the exponent field.
  const Vec shifted = z + 12582912.0f;
  const Vec r = z - (shifted - 12582912.0f);
  Vec p = splat(0.00015403530393381606f);
  p = p * r + 0.0013333558146428441f;
  p = p * r + 0.009618129107628477f;
  p = p * r + 0.055504108664821576f;
  p = p * r + 0.2402265069591007f;
  p = p * r + 0.6931471805599453f;
  p = p * r + 1.0f;
  const IVec bits = (reinterpret_cast<const IVec&>(shifted) << 23) + (127 << 23);
  return p * reinterpret_cast<const Vec&>(bits);
}

// At least `size` floats of the calling thread's own, 64-byte aligned, kept for
// its next call: a whole-vector load that straddles two cache lines costs two
// (the training kernel's backward ran 16% slower on scratch from plain new).
// Uninitialised. Each file that includes this keeps its own.
inline float* thread_scratch(int64_t size) {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<float[], Free> kept;
  thread_local int64_t kept_size = 0;
  if (kept_size < size) {
    const size_t bytes = (sizeof(float) * size + 63) / 64 * 64;
    float* const grown = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (grown == nullptr) throw std::bad_alloc();  // MemoryError; the old one stays
    kept.reset(grown);
    kept_size = size;
  }
  return kept.get();
}

}  // namespace
}  // namespace hierarchy_kernels

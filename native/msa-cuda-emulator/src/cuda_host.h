// CUDA's device built-ins for a host C++ compiler, so that msa-cuda's kernels.cu compiles unchanged
// (apart from its inline PTX, which it guards with MSA_CUDA_EMULATOR) and runs on the CPU.
//
// A block's threads are fibers on the calling OS thread (emulator.cpp): __syncthreads and the warp
// shuffles switch fibers. Needs GCC 12 or Clang 15 (_Float16 on x86-64).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define MSA_CUDA_EMULATOR 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

struct uint3 {
    unsigned x, y, z;
};
// 16-byte aligned as in CUDA: the compiler may then load them with aligned instructions, which fault
// on a misaligned address as a GPU does.
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

namespace emulator {
// What a kernel's thread sees of where it runs.
struct Place {
    uint3 thread, block, block_dim, grid_dim;
};
// Bytes of stack per fiber. Stacks are aligned to their size and start with a pointer to their
// fiber's Place, so a thread finds its own from any local variable's address (thread-locals would
// cost a __tls_get_addr call per threadIdx in a dlopen'ed library). Blocks run one after another on
// an OS thread, so shared memory is a thread-local static: unlike global memory it is not poisoned,
// and a block may see the previous block's values.
constexpr uintptr_t STACK_BYTES = 64 * 1024;
inline const Place& place() {
    char probe;
    uintptr_t at = reinterpret_cast<uintptr_t>(&probe);
    // Hides that the address came from `probe`: the compiler would otherwise take what is reached
    // through it for part of this frame and drop stores to it (the fiber's state) as dead.
    asm("" : "+r"(at));
    return **reinterpret_cast<const Place* const*>(at & ~(STACK_BYTES - 1));
}
void sync_threads();
// Every lane of the running fiber's warp hands in `bits` and gets those of lane (lane ^ lane_mask).
uint64_t shuffle_xor(unsigned mask, uint64_t bits, int lane_mask);

inline float f16_to_f32(uint16_t h) {
    _Float16 f;
    std::memcpy(&f, &h, 2);
    return (float)f;
}
// To nearest, ties to even (the default rounding mode), as cvt.rn.f16.f32.
inline uint16_t f32_to_f16(float x) {
    _Float16 f = (_Float16)x;
    uint16_t h;
    std::memcpy(&h, &f, 2);
    return h;
}
}  // namespace emulator

#define threadIdx (emulator::place().thread)
#define blockIdx (emulator::place().block)
#define blockDim (emulator::place().block_dim)
#define gridDim (emulator::place().grid_dim)

inline void __syncthreads() { emulator::sync_threads(); }

template <class T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values fit 64 bits");
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    bits = emulator::shuffle_xor(mask, bits, lane_mask);
    std::memcpy(&value, &bits, sizeof(T));
    return value;
}

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

template <class T>
inline T min(T a, T b) {
    return b < a ? b : a;
}

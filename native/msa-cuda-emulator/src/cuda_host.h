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
namespace emulator {
// Fails the running launch: a 16-byte vector copied from a misaligned address (emulator.cpp).
[[noreturn]] void misaligned_vector(const void* address);

// CUDA's 16-byte vectors, aligned as there. A copy checks its source's alignment, as a GPU's 16-byte
// load does: GCC's alignment check (emulator.cpp) would catch it too, but Clang's does not check the
// copy of a whole struct.
template <class T>
struct alignas(16) Vector4 {
    T x, y, z, w;
    Vector4() = default;
    constexpr Vector4(T x, T y, T z, T w) : x(x), y(y), z(z), w(w) {}
    Vector4(const Vector4& v) { *this = v; }
    Vector4& operator=(const Vector4& v) {
        if (reinterpret_cast<uintptr_t>(&v) % 16 != 0) misaligned_vector(&v);
        x = v.x, y = v.y, z = v.z, w = v.w;
        return *this;
    }
};
}  // namespace emulator
using float4 = emulator::Vector4<float>;
using uint4 = emulator::Vector4<unsigned>;

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
// Every lane of the running fiber's warp hands in `bits` and gets every lane's, by lane (for warp-wide
// instructions such as mma).
void warp_exchange(unsigned mask, uint64_t bits, uint64_t* all);

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
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 for the warp: d += A · B, each
// element of A and B found in the lane and register PTX's fragment layout gives it, products and sums
// in f32 (a GPU adds them in its own order and precision: results agree to rounding). Lane 4g + t holds
// d[0], d[1] (row g, columns 2t, 2t + 1) and d[2], d[3] (row g + 8).
inline void mma_16x8x16(float* d, const uint32_t* a, const uint32_t* b, int f16) {
    uint64_t a_low[32], a_high[32], b_all[32];
    warp_exchange(0xffffffffu, a[0] | (uint64_t)a[1] << 32, a_low);
    warp_exchange(0xffffffffu, a[2] | (uint64_t)a[3] << 32, a_high);
    warp_exchange(0xffffffffu, b[0] | (uint64_t)b[1] << 32, b_all);
    // Element `half` of 32-bit register `reg` (0-3 for A, 0-1 for B) of `lane`.
    auto element = [f16](const uint64_t* low, const uint64_t* high, unsigned lane, unsigned reg, unsigned half) {
        const uint64_t pair = reg < 2 ? low[lane] : high[lane];
        const uint16_t bits = (uint16_t)(pair >> (32 * (reg % 2) + 16 * half));
        if (f16) return f16_to_f32(bits);
        const uint32_t widened = (uint32_t)bits << 16;
        float f;
        std::memcpy(&f, &widened, 4);
        return f;
    };
    // A(r, k): lane 4 (r % 8) + (k % 8) / 2, register (r >= 8) + 2 (k >= 8); B(k, c): lane 4c + (k % 8) / 2,
    // register k >= 8; the element within its register is k % 2.
    auto a_at = [&](unsigned r, unsigned k) {
        return element(a_low, a_high, 4 * (r % 8) + k % 8 / 2, (r >= 8) + 2 * (k >= 8), k % 2);
    };
    auto b_at = [&](unsigned k, unsigned c) { return element(b_all, b_all, 4 * c + k % 8 / 2, k >= 8, k % 2); };
    const Place& at = place();
    const unsigned thread = at.thread.x + at.block_dim.x * (at.thread.y + at.block_dim.y * at.thread.z);
    const unsigned lane = thread % 32, g = lane / 4, t = lane % 4;
    for (unsigned i = 0; i < 4; i++) {
        const unsigned r = g + 8 * (i / 2), c = 2 * t + i % 2;
        float sum = 0.0f;
        for (unsigned k = 0; k < 16; k++) sum += a_at(r, k) * b_at(k, c);
        d[i] += sum;
    }
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

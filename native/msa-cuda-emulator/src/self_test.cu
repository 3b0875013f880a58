// Kernels that test the emulator itself (tests/emulator.rs), not msa-cuda: they use kernels.cu's
// helpers (WARP, warp_sum), included before this file.

// out[b] = the sum of row b of x [blocks, n]: warp sums by shuffles, then warp 0 adds the warps' sums
// from shared memory after a barrier.
extern "C" __global__ void self_test_block_sum(const float* x, float* out, u32 n) {
    __shared__ float partial[32];
    const u32 lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    float v = 0.0f;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) v += x[(u64)blockIdx.x * n + i];
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < blockDim.x / WARP ? partial[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) out[blockIdx.x] = v;
    }
}

// out[t] = the index of the thread t ^ mask of the same warp, by one shuffle.
extern "C" __global__ void self_test_exchange(u32* out, u32 mask) {
    const u32 t = (u32)global_thread();
    out[t] = __shfl_xor_sync(0xffffffffu, t, (int)mask);
}

// Half of each warp returns before a shuffle: undefined on a GPU, a failed launch here.
extern "C" __global__ void self_test_partial_warp(float* out) {
    if (threadIdx.x % WARP >= 16) return;
    out[threadIdx.x] = warp_sum(1.0f);
}

// Half of each warp waits at __syncthreads while the other half shuffles: a hang on a GPU.
extern "C" __global__ void self_test_divergent_barrier(float* out) {
    if (threadIdx.x % WARP < 16) {
        __syncthreads();
    } else {
        out[threadIdx.x] = warp_sum(1.0f);
    }
}

// Thread 0 writes a shared value that every thread then reads, with no barrier between: a race, whose
// outcome differs between warps when one warp runs ahead of the others.
extern "C" __global__ void self_test_missing_barrier(u32* out) {
    __shared__ u32 value;
    if (threadIdx.x == 0) value = 0;
    __syncthreads();
    if (threadIdx.x == 0) value = 1;
    out[global_thread()] = value;
}

// d += a · b for one 16 × 8 × 16 tile (a [16][16] and b [16][8] row-major, as bf16 or f16 bits; d
// [16][8]) through kernels.cu's mma_16x8x16, each lane's fragments gathered by PTX's formulas for
// element i of each fragment, written here independently of the emulator's mma.
extern "C" __global__ void self_test_mma(const u16* a, const u16* b, float* d, u32 f16) {
    const u32 lane = threadIdx.x % WARP, group = lane >> 2, in_group = lane % 4;
    u32 a_regs[4] = {0, 0, 0, 0}, b_regs[2] = {0, 0};
    for (u32 i = 0; i < 8; i++) {
        const u32 row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
        const u32 col = in_group * 2 + (i & 1) + (i >= 4 ? 8 : 0);
        a_regs[i / 2] |= (u32)a[row * 16 + col] << (16 * (i % 2));
    }
    for (u32 i = 0; i < 4; i++) {
        const u32 row = in_group * 2 + (i & 1) + (i >= 2 ? 8 : 0);
        b_regs[i / 2] |= (u32)b[row * 8 + group] << (16 * (i % 2));
    }
    float acc[4];
    for (u32 i = 0; i < 4; i++) acc[i] = d[(i < 2 ? group : group + 8) * 8 + in_group * 2 + (i & 1)];
    if (f16) {
        mma_16x8x16<1>(acc, a_regs, b_regs);
    } else {
        mma_16x8x16<0>(acc, a_regs, b_regs);
    }
    for (u32 i = 0; i < 4; i++) d[(i < 2 ? group : group + 8) * 8 + in_group * 2 + (i & 1)] = acc[i];
}

// out[0..8] = the 8 bf16 values at x + offset, read by kernels.cu's 16-byte loader: an offset that is
// not a multiple of 8 elements is a misaligned load, which fails the launch on a GPU.
extern "C" __global__ void self_test_vector_load(const u16* x, u32 offset, float* out) {
    BF16::vec(x, offset, out);
}

// out[0] = x[index], by one thread: past the end of x's allocation, the read faults.
extern "C" __global__ void self_test_read(const float* x, u32 index, float* out) { out[0] = x[index]; }

// out[0] = a shared array's element `index`, after every thread wrote its own: an index past the
// array fails the launch.
extern "C" __global__ void self_test_shared_index(u32 index, float* out) {
    __shared__ float values[WARP];
    values[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    if (threadIdx.x == 0) out[0] = values[index];
}

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

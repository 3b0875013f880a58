// Every msa-cuda kernel, compiled once per process by NVRTC for the device's architecture.
// SMALL_ROWS, MAX_PER_LANE, ATTENTION_WARPS, TOP_K_THREADS, TOP_K_ITEMS, ROUTING_MMA_TILES and
// ROUTING_MMA_WARPS are defined by the compiler options (device.rs), so the launch shapes on the host and the kernels agree.
//
// No CUDA headers: NVRTC may not ship them, so half-precision conversions are written out (bf16) or
// taken from PTX (f16; under MSA_CUDA_EMULATOR, the CPU build of msa-cuda-emulator, from the host).
// Weight-reading kernels are templates over a loader (F32, BF16, F16) and are instantiated under
// `name_f32`, `name_bf16`, `name_f16`; activations are always f32. Indices into tensors are 64-bit:
// MSA-4B's embedding and a bank's routing keys pass 2^32 elements.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define WARP 32
// -∞ without math.h.
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
#ifdef MSA_CUDA_EMULATOR
    return emulator::f16_to_f32(h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

// A loader reads one element (`at`), or the 16-byte vector of VEC elements at a 16-byte aligned
// element index (`vec`), widened to f32.
struct F32 {
    typedef float T;
    enum { VEC = 4 };
    static __device__ __forceinline__ float at(const float* p, u64 i) { return p[i]; }
    static __device__ __forceinline__ void vec(const float* p, u64 i, float* out) {
        float4 v = *reinterpret_cast<const float4*>(p + i);
        out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
    }
};
struct BF16 {
    typedef u16 T;
    enum { VEC = 8 };
    static __device__ __forceinline__ float at(const u16* p, u64 i) { return bf16_to_f32(p[i]); }
    static __device__ __forceinline__ void vec(const u16* p, u64 i, float* out) {
        uint4 v = *reinterpret_cast<const uint4*>(p + i);
        u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            out[2 * j] = __uint_as_float(words[j] << 16);
            out[2 * j + 1] = __uint_as_float(words[j] & 0xffff0000u);
        }
    }
};
struct F16 {
    typedef u16 T;
    enum { VEC = 8 };
    static __device__ __forceinline__ float at(const u16* p, u64 i) { return f16_to_f32(p[i]); }
    static __device__ __forceinline__ void vec(const u16* p, u64 i, float* out) {
        uint4 v = *reinterpret_cast<const uint4*>(p + i);
        u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            out[2 * j] = f16_to_f32((u16)(words[j] & 0xffffu));
            out[2 * j + 1] = f16_to_f32((u16)(words[j] >> 16));
        }
    }
};

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = WARP / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ u64 global_thread() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ u64 grid_threads() { return (u64)gridDim.x * blockDim.x; }
// One warp per item: the warp's index across the grid, and the number of warps in the grid.
__device__ __forceinline__ u64 global_warp() { return global_thread() / WARP; }
__device__ __forceinline__ u64 grid_warps() { return grid_threads() / WARP; }

// ---- Gathers --------------------------------------------------------------------------------------

// out[r, :] = table[ids[r], :], widened to f32 (embedding lookup, and gather_rows on f32 tensors).
template <class W>
__device__ void gather(const typename W::T* table, const u32* ids, float* out, u64 total, u32 width) {
    for (u64 i = global_thread(); i < total; i += grid_threads()) {
        u64 row = i / width, col = i % width;
        out[i] = W::at(table, (u64)ids[row] * width + col);
    }
}

// ---- Projections ----------------------------------------------------------------------------------

// What a small projection does around x · Wᵀ: nothing, add a residual (o_proj, down_proj), or SwiGLU
// with a second weight U (gate_proj and up_proj: silu(x · Wᵀ) ⊙ (x · Uᵀ)).
enum Epilogue { PLAIN = 0, RESIDUAL = 1, SWIGLU = 2 };

// V elements of a weight row from element k, widened: one, or a 16-byte vector (V == W::VEC).
template <class W, int V>
__device__ __forceinline__ void load(const typename W::T* p, u64 k, float* out) {
    if constexpr (V == 1) {
        out[0] = W::at(p, k);
    } else {
        W::vec(p, k, out);
    }
}

// One step of a small projection: V elements of the weight row(s) from element k against every
// input row; under NORM each x value is also squared into `squares` and scaled by the norm weight g.
template <class W, bool NORM, int EPILOGUE, int V>
__device__ __forceinline__ void accumulate(const float* x, const typename W::T* row, const typename W::T* row2,
                                           const typename W::T* g, u32 n, u32 inner, u32 k, float* acc,
                                           float* acc2, float* squares) {
    float a[V], a2[V], gv[V];
    load<W, V>(row, k, a);
    if (EPILOGUE == SWIGLU) load<W, V>(row2, k, a2);
    if (NORM) load<W, V>(g, k, gv);
#pragma unroll
    for (int r = 0; r < SMALL_ROWS; r++) {
        if ((u32)r >= n) break;
        const float* xr = x + (u64)r * inner + k;
#pragma unroll
        for (int e = 0; e < V; e++) {
            float xv = xr[e];
            if (NORM) {
                squares[r] += xv * xv;
                xv *= gv[e];
            }
            acc[r] += xv * a[e];
            if (EPILOGUE == SWIGLU) acc2[r] += xv * a2[e];
        }
    }
}

// y[n, out] = x[n, inner] · W[out, inner]ᵀ for n ≤ SMALL_ROWS: one warp per output feature reads its
// weight row once for every input row, so decoding streams each weight exactly once. With `vectorised`
// (inner a multiple of W::VEC, so every row starts 16-byte aligned) each lane loads 16 bytes at a
// time, two vectors in flight; otherwise one element. The layer's bandwidth-bound neighbours ride
// along in the same pass (one launch instead of two to four): NORM, an RMSNorm of x with weight g
// (dtype of W), whose sum of squares accumulates in the same loop, so y = (Σ g x W) / rms(x); and the
// EPILOGUE. Arguments a specialisation does not read may be any buffer.
template <class W, bool NORM, int EPILOGUE>
__device__ void matmul_small(const float* x, const typename W::T* w, const typename W::T* w2,
                             const typename W::T* g, const float* residual, float* y, u32 n, u32 inner,
                             u32 out, u32 vectorised, float eps) {
    const u32 lane = threadIdx.x % WARP;
    for (u64 o = global_warp(); o < out; o += grid_warps()) {
        const typename W::T* row = w + o * inner;
        const typename W::T* row2 = w2 + o * inner;
        float acc[SMALL_ROWS], acc2[SMALL_ROWS], squares[SMALL_ROWS];
#pragma unroll
        for (int r = 0; r < SMALL_ROWS; r++) acc[r] = acc2[r] = squares[r] = 0.0f;
        if (vectorised) {
            const u32 step = WARP * W::VEC;
            u32 k = lane * W::VEC;
            for (; k + step < inner; k += 2 * step) {
                accumulate<W, NORM, EPILOGUE, W::VEC>(x, row, row2, g, n, inner, k, acc, acc2, squares);
                accumulate<W, NORM, EPILOGUE, W::VEC>(x, row, row2, g, n, inner, k + step, acc, acc2, squares);
            }
            if (k < inner) accumulate<W, NORM, EPILOGUE, W::VEC>(x, row, row2, g, n, inner, k, acc, acc2, squares);
        } else {
            for (u32 k = lane; k < inner; k += WARP)
                accumulate<W, NORM, EPILOGUE, 1>(x, row, row2, g, n, inner, k, acc, acc2, squares);
        }
#pragma unroll
        for (int r = 0; r < SMALL_ROWS; r++) {
            if ((u32)r >= n) break;
            float inv = NORM ? 1.0f / sqrtf(warp_sum(squares[r]) / (float)inner + eps) : 1.0f;
            float s = warp_sum(acc[r]) * inv;
            if (EPILOGUE == SWIGLU) s = s / (1.0f + expf(-s)) * (warp_sum(acc2[r]) * inv);
            if (EPILOGUE == RESIDUAL) s += residual[(u64)r * out + o];
            if (lane == 0) y[(u64)r * out + o] = s;
        }
    }
}

// f32 to bf16 (`f16` 0) or f16 (1), to nearest, ties to even; NaN stays NaN.
__device__ __forceinline__ u16 to_half(float x, u32 f16) {
    if (f16) {
#ifdef MSA_CUDA_EMULATOR
        return emulator::f32_to_f16(x);
#else
        u16 h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
        return h;
#endif
    }
    u32 u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float from_half(u16 h, u32 f16) { return f16 ? f16_to_f32(h) : bf16_to_f32(h); }

// Activations rounded to a weight's half dtype for a tensor-core GEMM.
extern "C" __global__ void round_half(const float* x, u16* out, u64 total, u32 f16) {
    for (u64 i = global_thread(); i < total; i += grid_threads()) out[i] = to_half(x[i], f16);
}

// x as the sum of two half-precision parts, hi = half(x) and lo = half(x − hi) (16 significant bits
// for bf16): within each group of `group` elements, the hi parts, then the lo parts.
extern "C" __global__ void split_half(const float* x, u16* out, u64 total, u64 group, u32 f16) {
    for (u64 i = global_thread(); i < total; i += grid_threads()) {
        u16 hi = to_half(x[i], f16);
        u64 at = i / group * 2 * group + i % group;
        out[at] = hi;
        out[at + group] = to_half(x[i] - from_half(hi, f16), f16);
    }
}

// ---- Norms and rotations --------------------------------------------------------------------------

// RMSNorm, one warp per row: w * (x / sqrt(mean(x²) + eps)).
template <class W>
__device__ void rms_norm(const float* x, const typename W::T* w, float* out, u64 rows, u32 width, float eps) {
    const u32 lane = threadIdx.x % WARP;
    for (u64 r = global_warp(); r < rows; r += grid_warps()) {
        const float* row = x + r * width;
        float sum = 0.0f;
        for (u32 i = lane; i < width; i += WARP) sum += row[i] * row[i];
        float inv = 1.0f / sqrtf(warp_sum(sum) / (float)width + eps);
        for (u32 i = lane; i < width; i += WARP) out[r * width + i] = W::at(w, i) * (row[i] * inv);
    }
}

// RMSNorm per head row (q_norm, k_norm) then NeoX RoPE with rope's table, one warp per row of
// [n, heads, d]: each lane takes pairs (j, j + d/2), so the rotation needs nothing from other lanes.
template <class W>
__device__ void norm_rope(const float* x, const typename W::T* w, const float* cos_sin, float* out, u64 rows,
                          u32 heads, u32 d, float eps) {
    const u32 lane = threadIdx.x % WARP, half = d / 2;
    for (u64 r = global_warp(); r < rows; r += grid_warps()) {
        const float* row = x + r * d;
        float sum = 0.0f;
        for (u32 i = lane; i < d; i += WARP) sum += row[i] * row[i];
        float inv = 1.0f / sqrtf(warp_sum(sum) / (float)d + eps);
        const float* table = cos_sin + r / heads * half * 2;
        for (u32 j = lane; j < half; j += WARP) {
            float a = W::at(w, j) * (row[j] * inv), b = W::at(w, j + half) * (row[j + half] * inv);
            float c = table[2 * j], s = table[2 * j + 1];
            out[r * d + j] = a * c - b * s;
            out[r * d + j + half] = b * c + a * s;
        }
    }
}

// x / max(‖x‖₂, 1e-12), one warp per row.
extern "C" __global__ void l2_normalize(const float* x, float* out, u64 rows, u32 width) {
    const u32 lane = threadIdx.x % WARP;
    for (u64 r = global_warp(); r < rows; r += grid_warps()) {
        const float* row = x + r * width;
        float sum = 0.0f;
        for (u32 i = lane; i < width; i += WARP) sum += row[i] * row[i];
        float norm = fmaxf(sqrtf(warp_sum(sum)), 1e-12f);
        for (u32 i = lane; i < width; i += WARP) out[r * width + i] = row[i] / norm;
    }
}

// NeoX rotate-half RoPE with a host-computed [n, d/2] table of (cos, sin): one thread per pair.
extern "C" __global__ void rope(const float* x, const float* cos_sin, float* out, u32 n, u32 heads, u32 d) {
    const u32 half = d / 2;
    const u64 total = (u64)n * heads * half;
    for (u64 i = global_thread(); i < total; i += grid_threads()) {
        u64 token = i / ((u64)heads * half);
        u32 head = (u32)(i / half % heads), j = (u32)(i % half);
        u64 base = (token * heads + head) * d;
        float c = cos_sin[(token * half + j) * 2], s = cos_sin[(token * half + j) * 2 + 1];
        float a = x[base + j], b = x[base + j + half];
        out[base + j] = a * c - b * s;
        out[base + j + half] = b * c + a * s;
    }
}

// ---- Attention ------------------------------------------------------------------------------------

// Softmax attention with GQA, one block per (query, head, split): each warp runs an online softmax
// over a stripe of the split's share of the query's visible keys [ranges[2i], ranges[2i+1]) (the mask,
// resolved on the host), and the warps' partial results are merged at the end. A warp without keys has
// l == 0 and is skipped; a NaN score makes l NaN, which the merge keeps, as the reference's softmax
// does. With one split the block writes the output; with several (decoding, where queries × heads
// blocks alone leave most of the GPU idle) it writes its unnormalised sums and (m, l) for
// attention_combine, which merges the splits the same way.
extern "C" __global__ void __launch_bounds__(ATTENTION_WARPS * WARP)
attention(const float* q, const float* k, const float* v, const u32* ranges, float* out, float* partial,
          float* stats, u32 heads, u32 kv_heads, u32 d, float scale) {
    const u32 i = blockIdx.x, h = blockIdx.y, g = h / (heads / kv_heads);
    const u32 split = blockIdx.z, splits = gridDim.z;
    const u32 warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const u32 first = ranges[2 * i], last = ranges[2 * i + 1];
    const u32 share = (last - first + splits - 1) / splits;
    const u32 start = min(first + split * share, last), end = min(start + share, last);
    const float* qv = q + ((u64)i * heads + h) * d;
    float qr[MAX_PER_LANE], acc[MAX_PER_LANE];
#pragma unroll
    for (int e = 0; e < MAX_PER_LANE; e++) {
        u32 col = lane + e * WARP;
        qr[e] = col < d ? qv[col] : 0.0f;
        acc[e] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (u32 j = start + warp; j < end; j += ATTENTION_WARPS) {
        const float* kr = k + ((u64)j * kv_heads + g) * d;
        const float* vr = v + ((u64)j * kv_heads + g) * d;
        float s = 0.0f;
#pragma unroll
        for (int e = 0; e < MAX_PER_LANE; e++) {
            u32 col = lane + e * WARP;
            if (col < d) s += qr[e] * kr[col];
        }
        s = warp_sum(s) * scale;
        float m_new = fmaxf(m, s);
        float correction = expf(m - m_new), p = expf(s - m_new);
        l = l * correction + p;
#pragma unroll
        for (int e = 0; e < MAX_PER_LANE; e++) {
            u32 col = lane + e * WARP;
            if (col < d) acc[e] = acc[e] * correction + p * vr[col];
        }
        m = m_new;
    }
    __shared__ float warp_m[ATTENTION_WARPS], warp_l[ATTENTION_WARPS];
    __shared__ float warp_acc[ATTENTION_WARPS][WARP * MAX_PER_LANE];
    if (lane == 0) {
        warp_m[warp] = m;
        warp_l[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < MAX_PER_LANE; e++) warp_acc[warp][lane + e * WARP] = acc[e];
    __syncthreads();
    float total_m = NEG_INF;
    for (int w = 0; w < ATTENTION_WARPS; w++) total_m = fmaxf(total_m, warp_m[w]);
    float total_l = 0.0f;
    for (int w = 0; w < ATTENTION_WARPS; w++)
        if (warp_l[w] != 0.0f) total_l += warp_l[w] * expf(warp_m[w] - total_m);
    const u64 row = (u64)i * heads + h, part = row * splits + split;
    for (u32 col = threadIdx.x; col < d; col += blockDim.x) {
        float sum = 0.0f;
        for (int w = 0; w < ATTENTION_WARPS; w++)
            if (warp_l[w] != 0.0f) sum += warp_acc[w][col] * expf(warp_m[w] - total_m);
        if (splits == 1) {
            out[row * d + col] = total_l != 0.0f ? sum / total_l : 0.0f;
        } else {
            partial[part * d + col] = sum;
        }
    }
    if (splits > 1 && threadIdx.x == 0) {
        stats[2 * part] = total_m;
        stats[2 * part + 1] = total_l;
    }
}

// Merges attention's splits, one thread per output element of [rows = queries × heads, d], as the
// block merges its warps: rescaled to the largest max, splits without keys (l == 0) skipped.
extern "C" __global__ void attention_combine(const float* partial, const float* stats, float* out, u64 rows,
                                             u32 d, u32 splits) {
    for (u64 e = global_thread(); e < rows * d; e += grid_threads()) {
        const u64 row = e / d, col = e % d;
        const float* st = stats + row * splits * 2;
        float m = NEG_INF;
        for (u32 s = 0; s < splits; s++) m = fmaxf(m, st[2 * s]);
        float l = 0.0f, sum = 0.0f;
        for (u32 s = 0; s < splits; s++) {
            if (st[2 * s + 1] != 0.0f) {
                float weight = expf(st[2 * s] - m);
                l += st[2 * s + 1] * weight;
                sum += partial[(row * splits + s) * d + col] * weight;
            }
        }
        out[e] = l != 0.0f ? sum / l : 0.0f;
    }
}

// ---- Elementwise and pooling ----------------------------------------------------------------------

extern "C" __global__ void silu_mul(const float* gate, const float* up, float* out, u64 total) {
    for (u64 i = global_thread(); i < total; i += grid_threads()) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

extern "C" __global__ void add(const float* a, const float* b, float* out, u64 total) {
    for (u64 i = global_thread(); i < total; i += grid_threads()) out[i] = a[i] + b[i];
}

// Mean of every `chunk` consecutive rows (the last group may be shorter).
extern "C" __global__ void chunk_mean_pool(const float* x, float* out, u64 rows, u32 width, u32 chunk) {
    const u64 chunks = (rows + chunk - 1) / chunk, total = chunks * width;
    for (u64 i = global_thread(); i < total; i += grid_threads()) {
        u64 c = i / width, col = i % width;
        u64 first = c * chunk, last = min(first + chunk, rows);
        float sum = 0.0f;
        for (u64 r = first; r < last; r++) sum += x[r * width + col];
        out[i] = sum / (float)(last - first);
    }
}

// ---- Routing --------------------------------------------------------------------------------------

// The reductions of a routing score, as the CPU reference folds them: heads and chunks by a sum (then
// divided) or a max, tokens by max (0), mean (1) or the last token (2). fmaxf ignores a NaN as Rust's
// f32::max does.
__device__ __forceinline__ float fold_start(u32 sum) { return sum ? 0.0f : NEG_INF; }
__device__ __forceinline__ float fold(float acc, float value, u32 sum) { return sum ? acc + value : fmaxf(acc, value); }
__device__ __forceinline__ float fold_token(float acc, float score, u32 query_reduce) {
    return query_reduce == 2 ? score : fold(acc, score, query_reduce == 1);
}

// The routing query, one warp per (token, output head r): each query head normalised (cosine) and
// scaled, then summed over the heads sharing a KV head when heads are averaged (`group` > 1), since
// mean_h <q_h, k_g(h)> = (1/H) Σ_g <Σ_{h∈g} q_h, k_g>. Output rows: [tokens, outputs, d] (`grouped` 0,
// for the warp-per-chunk scan and a head mean's GEMM over whole key rows), or [kv_heads, tokens ×
// per_kv, d] with row t × per_kv + r % per_kv (`grouped` 1: a head max's GEMM operand per KV head,
// per_kv = outputs / kv_heads).
extern "C" __global__ void routing_query(const float* queries, const u32* rows, float* out, u32 tokens,
                                         u32 heads, u32 kv_heads, u32 d, u32 group, u32 cosine,
                                         float scale, u32 grouped) {
    const u32 lane = threadIdx.x % WARP, outputs = heads / group, per_kv = outputs / kv_heads;
    for (u64 item = global_warp(); item < (u64)tokens * outputs; item += grid_warps()) {
        u32 t = (u32)(item / outputs), r = (u32)(item % outputs);
        float acc[MAX_PER_LANE];
#pragma unroll
        for (int e = 0; e < MAX_PER_LANE; e++) acc[e] = 0.0f;
        for (u32 j = 0; j < group; j++) {
            const float* qv = queries + ((u64)rows[t] * heads + r * group + j) * d;
            float norm = 1.0f;
            if (cosine) {
                float sum = 0.0f;
                for (u32 col = lane; col < d; col += WARP) sum += qv[col] * qv[col];
                norm = fmaxf(sqrtf(warp_sum(sum)), 1e-12f);
            }
#pragma unroll
            for (int e = 0; e < MAX_PER_LANE; e++) {
                u32 col = lane + e * WARP;
                if (col < d) acc[e] += qv[col] / norm * scale;
            }
        }
        u64 row = grouped ? ((u64)(r / per_kv) * tokens + t) * per_kv + r % per_kv : item;
#pragma unroll
        for (int e = 0; e < MAX_PER_LANE; e++) {
            u32 col = lane + e * WARP;
            if (col < d) out[row * d + col] = acc[e];
        }
    }
}

// Chunk scores from a tile of GEMM results, one thread per chunk: `dots` holds, per GEMM g of the batch
// (a KV head, or the one GEMM over whole key rows of a head mean) and chunk c, the 2 × rows dot products
// of the split routing query (rows = tokens × per_kv hi parts, then as many lo parts) with the chunk's
// keys; a query row's dot product is its two parts' sum. The scores land at chunk `first + c`.
extern "C" __global__ void routing_reduce(const float* dots, float* scores, u64 first, u32 chunks_in_tile,
                                          u32 tokens, u32 per_kv, u32 batch, u32 head_mean,
                                          float head_divisor, u32 query_reduce) {
    const u64 rows = (u64)tokens * per_kv;
    for (u64 c = global_thread(); c < chunks_in_tile; c += grid_threads()) {
        float reduced = fold_start(query_reduce == 1);
        for (u32 t = query_reduce == 2 ? tokens - 1 : 0; t < tokens; t++) {
            float token_score = fold_start(head_mean);
            for (u32 g = 0; g < batch; g++) {
                const float* row = dots + ((u64)g * chunks_in_tile + c) * 2 * rows + (u64)t * per_kv;
                for (u32 j = 0; j < per_kv; j++) token_score = fold(token_score, row[j] + row[rows + j], head_mean);
            }
            if (head_mean) token_score /= head_divisor;
            reduced = fold_token(reduced, token_score, query_reduce);
        }
        scores[first + c] = query_reduce == 1 ? reduced / (float)tokens : reduced;
    }
}

// Chunk scores, one warp per chunk: the routing query [tokens, outputs, d] against the chunk's keys
// [kv_heads, d]; heads reduced by sum / `head_divisor` (mean) or max, then tokens by max (0), mean (1)
// or the last token (2). For a head mean the query, summed per KV group, has the layout of a chunk's
// keys ([tokens, kv_heads, d]), so a token's score is one dot product over the chunk's row: with
// `vectorised` (rows of whole 16-byte vectors) each lane reads 16 bytes of keys at a time and the warp
// reduces once per token, instead of once per head with one element per lane.
template <class W>
__device__ void routing_chunks(const float* query, const typename W::T* keys, float* scores, u64 chunks,
                               u32 tokens, u32 outputs, u32 kv_heads, u32 d, u32 head_mean,
                               float head_divisor, u32 query_reduce, u32 vectorised) {
    const u32 lane = threadIdx.x % WARP, per_kv = outputs / kv_heads, width = kv_heads * d;
    for (u64 c = global_warp(); c < chunks; c += grid_warps()) {
        const u64 base = c * width;
        float reduced = fold_start(query_reduce == 1);
        for (u32 t = query_reduce == 2 ? tokens - 1 : 0; t < tokens; t++) {
            float token_score = fold_start(head_mean);
            if (head_mean && vectorised) {
                const float* qv = query + (u64)t * width;
                float s = 0.0f;
                for (u32 k = lane * W::VEC; k < width; k += WARP * W::VEC) {
                    float key[W::VEC];
                    W::vec(keys, base + k, key);
#pragma unroll
                    for (int e = 0; e < W::VEC; e++) s += qv[k + e] * key[e];
                }
                token_score = warp_sum(s);
            } else {
                for (u32 r = 0; r < outputs; r++) {
                    const float* qv = query + ((u64)t * outputs + r) * d;
                    const u64 key = base + (u64)(r / per_kv) * d;
                    float s = 0.0f;
                    for (u32 col = lane; col < d; col += WARP) s += qv[col] * W::at(keys, key + col);
                    token_score = fold(token_score, warp_sum(s), head_mean);
                }
            }
            if (head_mean) token_score /= head_divisor;
            reduced = fold_token(reduced, token_score, query_reduce);
        }
        if (lane == 0) scores[c] = query_reduce == 1 ? reduced / (float)tokens : reduced;
    }
}

// Document scores from chunk scores: max (0) or mean (1) over each document's chunk range.
extern "C" __global__ void routing_documents(const float* chunk_scores, const u32* offsets, float* out,
                                             u32 documents, u32 mean) {
    for (u64 doc = global_thread(); doc < documents; doc += grid_threads()) {
        u32 first = offsets[doc], last = offsets[doc + 1];
        float acc = fold_start(mean);
        for (u32 c = first; c < last; c++) acc = fold(acc, chunk_scores[c], mean);
        out[doc] = mean ? acc / (float)(last - first) : acc;
    }
}

// ---- Tensor cores --------------------------------------------------------------------------------

// D += A · B over one warp's 16 × 8 × 16 tile, in bf16 (F16 = 0) or f16, products summed in f32, with
// the fragments PTX's "Matrix Fragments for mma.m16n8k16" gives lane 4g + t: a[0] row g and a[1] row
// g + 8 of A at k = 2t, 2t + 1, then a[2], a[3] the same rows at k = 2t + 8, 2t + 9 (two elements per
// word, the lower k in the low half); b[0] column g of B at k = 2t, 2t + 1, b[1] at k = 2t + 8, 2t + 9;
// d[0], d[1] row g at columns 2t, 2t + 1, and d[2], d[3] row g + 8.
template <int F16>
__device__ __forceinline__ void mma_16x8x16(float* d, const u32* a, const u32* b) {
#if defined(MSA_CUDA_EMULATOR)
    emulator::mma_16x8x16(d, a, b, F16);
#elif __CUDA_ARCH__ >= 800
    if (F16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                     "{%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#else
    // Before sm_80 there is no such instruction, and the host never launches a kernel that uses it.
    asm volatile("trap;");
#endif
}

__device__ __forceinline__ u32 word(const uint4& v, int j) { return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w; }

// Chunk scores of a head mean on tensor cores, with the score reductions in the same pass, so no dot
// product leaves the registers: one warp per 32 chunks (blocks of ROUTING_MMA_WARPS) (two 16-row tiles of A, one chunk's whole key
// row each) against the split routing query (`parts`: [2][tokens][width], hi parts then lo parts,
// B's columns one token each), ROUTING_MMA_TILES tiles of 8 tokens at a time. Since a dot product
// may sum its k in any order, each lane loads 16 bytes (8 consecutive k) per row and 32 k, and the
// two mma steps over those 32 k take its words 0-1 and 2-3 as the fragments' k = 2t.. and 2t + 8..:
// A and B agree on that order, so every product is summed once. Both parts accumulate into one sum
// (hi + lo: 16 significant bits of query against exact keys). Tokens are then folded as in
// routing_reduce (max, mean or the last), within a lane, across the 4 lanes sharing a row, and across
// passes. Needs `width` a multiple of 32 and 16-byte aligned rows (the host checks).
template <int F16>
__device__ void routing_mma(const u16* __restrict__ parts, const u16* __restrict__ keys, float* scores,
                            u64 chunks, u32 tokens, u32 width, float head_divisor, u32 query_reduce) {
    const u32 lane = threadIdx.x % WARP, g = lane / 4, t = lane % 4;
    const bool max_fold = query_reduce == 0;
    // The last token's score is the one term of a sum started at -0, which leaves every value as it
    // is (-0 and NaN included).
    const float start = max_fold ? NEG_INF : query_reduce == 2 ? -0.0f : 0.0f;
    for (u64 tile = global_warp(); tile < (chunks + 31) / 32; tile += grid_warps()) {
        // The lane's 4 rows (g and g + 8 of each 16-row tile); past the last chunk, rows read the
        // last chunk's keys and are never written.
        u64 chunk[4], row[4];
        float reduced[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            chunk[i] = tile * 32 + i * 8 + g;
            row[i] = (chunk[i] < chunks ? chunk[i] : chunks - 1) * width;
            reduced[i] = start;
        }
        for (u32 first = 0; first < tokens; first += 8 * ROUTING_MMA_TILES) {
            float acc[2][ROUTING_MMA_TILES][4];
#pragma unroll
            for (int m = 0; m < 2; m++)
#pragma unroll
                for (int n = 0; n < ROUTING_MMA_TILES; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) acc[m][n][e] = 0.0f;
#pragma unroll 2
            for (u32 kb = 0; kb < width; kb += 32) {
                const u32 k = kb + 8 * t;
                uint4 a[4];
#pragma unroll
                for (int i = 0; i < 4; i++) a[i] = *reinterpret_cast<const uint4*>(keys + row[i] + k);
#pragma unroll
                for (int n = 0; n < ROUTING_MMA_TILES; n++) {
                    if (first + n * 8 >= tokens) break;
                    // Columns past the last token read its row and count as zeros; loads and selects,
                    // not branches, so the warp reaches its mma together.
                    const u32 column = first + n * 8 + g, read = column < tokens ? column : tokens - 1;
                    uint4 hi = *reinterpret_cast<const uint4*>(parts + (u64)read * width + k);
                    uint4 lo = *reinterpret_cast<const uint4*>(parts + ((u64)tokens + read) * width + k);
                    if (column >= tokens) hi = lo = uint4{0, 0, 0, 0};
#pragma unroll
                    for (int s = 0; s < 2; s++) {
                        const u32 b_hi[2] = {word(hi, 2 * s), word(hi, 2 * s + 1)};
                        const u32 b_lo[2] = {word(lo, 2 * s), word(lo, 2 * s + 1)};
#pragma unroll
                        for (int m = 0; m < 2; m++) {
                            const u32 frag[4] = {word(a[2 * m], 2 * s), word(a[2 * m + 1], 2 * s),
                                                 word(a[2 * m], 2 * s + 1), word(a[2 * m + 1], 2 * s + 1)};
                            mma_16x8x16<F16>(acc[m][n], frag, b_hi);
                            mma_16x8x16<F16>(acc[m][n], frag, b_lo);
                        }
                    }
                }
            }
            // Row i is tile m = i / 2's row g (h = 0) or g + 8 (h = 1): accumulators 2h and 2h + 1.
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int m = i / 2, h = i % 2;
                float part = start;
#pragma unroll
                for (int n = 0; n < ROUTING_MMA_TILES; n++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const u32 token = first + n * 8 + 2 * t + e;
                        if (token >= tokens) continue;
                        const float score = acc[m][n][2 * h + e] / head_divisor;
                        if (query_reduce == 2) {
                            if (token == tokens - 1) part = score;
                        } else {
                            part = fold(part, score, !max_fold);
                        }
                    }
                for (int offset = 1; offset < 4; offset *= 2)
                    part = fold(part, __shfl_xor_sync(0xffffffffu, part, offset), !max_fold);
                reduced[i] = fold(reduced[i], part, !max_fold);
            }
        }
        if (t == 0) {
#pragma unroll
            for (int i = 0; i < 4; i++)
                if (chunk[i] < chunks) scores[chunk[i]] = query_reduce == 1 ? reduced[i] / (float)tokens : reduced[i];
        }
    }
}

// ---- Top-k ---------------------------------------------------------------------------------------
// The CPU reference's rule (`select_top_k`): highest score first, ties to the lower index, NaN ranked as
// -inf, -0.0 equal to 0.0. Each block of TOP_K_THREADS picks the k best of its TOP_K_BLOCK candidates,
// one per round: round r takes the best candidate strictly below round r-1's pick in the total order
// (score desc, index asc), so nothing needs marking. The host repeats the kernel over the blocks x k
// survivors, as (raw score bits, index) pairs, until one block remains. The same algorithm as the wgpu
// backend's shaders/topk.wgsl.

#define TOP_K_BLOCK (TOP_K_THREADS * TOP_K_ITEMS)
// The second reduction is one warp over the warps' bests.
static_assert(TOP_K_THREADS % WARP == 0 && TOP_K_THREADS <= WARP * WARP, "top-k block shape");
#define TOP_K_INVALID 0xffffffffu

// A u32 whose unsigned order is the score order; 0 for no candidate.
__device__ __forceinline__ u32 top_k_key(u32 raw, u32 index) {
    if (index == TOP_K_INVALID) return 0u;
    if (raw == 0x80000000u) raw = 0u;                              // -0.0 ranks as 0.0
    if ((raw & 0x7fffffffu) > 0x7f800000u) raw = 0xff800000u;      // NaN ranks as -inf
    return (raw & 0x80000000u) ? ~raw : (raw | 0x80000000u);
}

__device__ __forceinline__ bool ranks_before(u32 key_a, u32 index_a, u32 key_b, u32 index_b) {
    return key_a > key_b || (key_a == key_b && index_a < index_b);
}

// The best (key, raw, index) of the warp, in every lane.
__device__ __forceinline__ void warp_best(u32& key, u32& raw, u32& index) {
#pragma unroll
    for (int mask = 1; mask < WARP; mask <<= 1) {
        u32 other_key = __shfl_xor_sync(0xffffffffu, key, mask);
        u32 other_raw = __shfl_xor_sync(0xffffffffu, raw, mask);
        u32 other_index = __shfl_xor_sync(0xffffffffu, index, mask);
        if (ranks_before(other_key, other_index, key, index)) {
            key = other_key, raw = other_raw, index = other_index;
        }
    }
}

// `src`: `count` raw f32 scores (pairs = 0; the index is the position) or (raw, index) pairs
// (pairs = 1). `dst`: k (raw, index) pairs per block, (0, TOP_K_INVALID) past the block's candidates.
extern "C" __global__ void __launch_bounds__(TOP_K_THREADS)
select_top_k(const u32* src, u32* dst, u32 count, u32 k, u32 pairs) {
    __shared__ u32 best_key[TOP_K_THREADS / WARP], best_raw[TOP_K_THREADS / WARP],
        best_index[TOP_K_THREADS / WARP];
    const u32 lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const u64 first = (u64)blockIdx.x * TOP_K_BLOCK;
    const u64 end = min(first + TOP_K_BLOCK, (u64)count);
    u32 prev_key = 0xffffffffu, prev_index = 0u;
    for (u32 r = 0; r < k; r++) {
        u32 key = 0u, raw = 0u, index = TOP_K_INVALID;
        for (u64 e = first + threadIdx.x; e < end; e += TOP_K_THREADS) {
            u32 c_raw = pairs ? src[2 * e] : src[e];
            u32 c_index = pairs ? src[2 * e + 1] : (u32)e;
            u32 c_key = top_k_key(c_raw, c_index);
            bool below_prev = r == 0 || ranks_before(prev_key, prev_index, c_key, c_index);
            if (c_index != TOP_K_INVALID && below_prev && ranks_before(c_key, c_index, key, index)) {
                key = c_key, raw = c_raw, index = c_index;
            }
        }
        warp_best(key, raw, index);
        if (lane == 0) best_key[warp] = key, best_raw[warp] = raw, best_index[warp] = index;
        __syncthreads();
        if (warp == 0) {
            bool has = lane < TOP_K_THREADS / WARP;
            key = has ? best_key[lane] : 0u;
            raw = has ? best_raw[lane] : 0u;
            index = has ? best_index[lane] : TOP_K_INVALID;
            warp_best(key, raw, index);
            if (lane == 0) {
                best_key[0] = key, best_raw[0] = raw, best_index[0] = index;
                dst[2 * ((u64)blockIdx.x * k + r)] = raw;
                dst[2 * ((u64)blockIdx.x * k + r) + 1] = index;
            }
        }
        __syncthreads();
        prev_key = best_key[0], prev_index = best_index[0];
        // Every thread has read this round's pick before the next round overwrites it.
        __syncthreads();
    }
}

// ---- Instantiations -------------------------------------------------------------------------------

#define FOR_EACH_DTYPE(M) M(f32, F32) M(bf16, BF16) M(f16, F16)

// The small projections share one signature (see matmul_small).
#define PROJECTION(name, W, NORM, EPILOGUE)                                                               \
    extern "C" __global__ void name(const float* x, const W::T* w, const W::T* w2, const W::T* g,         \
                                    const float* residual, float* y, u32 n, u32 inner, u32 out,          \
                                    u32 vectorised, float eps) {                                         \
        matmul_small<W, NORM, EPILOGUE>(x, w, w2, g, residual, y, n, inner, out, vectorised, eps);       \
    }

#define INSTANTIATE(suffix, W)                                                                            \
    extern "C" __global__ void gather_##suffix(const W::T* table, const u32* ids, float* out, u64 total,   \
                                               u32 width) {                                              \
        gather<W>(table, ids, out, total, width);                                                        \
    }                                                                                                    \
    PROJECTION(matmul_small_##suffix, W, false, PLAIN)                                                   \
    PROJECTION(matmul_residual_##suffix, W, false, RESIDUAL)                                             \
    PROJECTION(matmul_norm_##suffix, W, true, PLAIN)                                                     \
    PROJECTION(norm_swiglu_##suffix, W, true, SWIGLU)                                                    \
    extern "C" __global__ void rms_norm_##suffix(const float* x, const W::T* w, float* out, u64 rows,     \
                                                 u32 width, float eps) {                                 \
        rms_norm<W>(x, w, out, rows, width, eps);                                                        \
    }                                                                                                    \
    extern "C" __global__ void norm_rope_##suffix(const float* x, const W::T* w, const float* cos_sin,    \
                                                  float* out, u64 rows, u32 heads, u32 d, float eps) {   \
        norm_rope<W>(x, w, cos_sin, out, rows, heads, d, eps);                                           \
    }                                                                                                    \
    extern "C" __global__ void routing_chunks_##suffix(const float* query, const W::T* keys,              \
                                                       float* scores, u64 chunks, u32 tokens,            \
                                                       u32 outputs, u32 kv_heads, u32 d, u32 head_mean,  \
                                                       float head_divisor, u32 query_reduce,             \
                                                       u32 vectorised) {                                 \
        routing_chunks<W>(query, keys, scores, chunks, tokens, outputs, kv_heads, d, head_mean,          \
                          head_divisor, query_reduce, vectorised);                                       \
    }

FOR_EACH_DTYPE(INSTANTIATE)

// Tensor-core kernels, for the half dtypes (mma's f16 flag).
#define INSTANTIATE_HALF(suffix, F16)                                                                     \
    extern "C" __global__ void __launch_bounds__(ROUTING_MMA_WARPS * WARP) routing_mma_##suffix(const u16* parts, const u16* keys, float* scores,     \
                                                    u64 chunks, u32 tokens, u32 width,                   \
                                                    float head_divisor, u32 query_reduce) {              \
        routing_mma<F16>(parts, keys, scores, chunks, tokens, width, head_divisor, query_reduce);        \
    }

INSTANTIATE_HALF(bf16, 0)
INSTANTIATE_HALF(f16, 1)

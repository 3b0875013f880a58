// What kernels.cu and its hosts agree on: its entry points, and the constants it is compiled with
// (which size its arrays and fix its launch shapes). Plain items only: msa-cuda-emulator's build
// script `include!`s this file to compile kernels.cu for the CPU the same way.

/// Every kernel entry point of kernels.cu, loaded when a device opens.
pub const KERNELS: &[&str] = &[
    "gather_f32",
    "gather_bf16",
    "gather_f16",
    "matmul_small_f32",
    "matmul_small_bf16",
    "matmul_small_f16",
    "matmul_residual_f32",
    "matmul_residual_bf16",
    "matmul_residual_f16",
    "matmul_norm_f32",
    "matmul_norm_bf16",
    "matmul_norm_f16",
    "norm_swiglu_f32",
    "norm_swiglu_bf16",
    "norm_swiglu_f16",
    "round_half",
    "split_half",
    "rms_norm_f32",
    "rms_norm_bf16",
    "rms_norm_f16",
    "norm_rope_f32",
    "norm_rope_bf16",
    "norm_rope_f16",
    "l2_normalize",
    "rope",
    "attention",
    "attention_combine",
    "silu_mul",
    "add",
    "chunk_mean_pool",
    "routing_query",
    "routing_reduce",
    "routing_chunks_f32",
    "routing_chunks_bf16",
    "routing_chunks_f16",
    "routing_mma_bf16",
    "routing_mma_f16",
    "routing_documents",
    "select_top_k",
];

/// The decode projection keeps one accumulator per input row: inputs of at most this many rows use it.
pub const SMALL_ROWS: usize = 8;
/// Registers per lane for one head vector: head_dim ≤ 32 × MAX_PER_LANE.
pub const MAX_PER_LANE: usize = 8;
/// Warps per attention block.
pub const ATTENTION_WARPS: u32 = 8;
/// Threads per top-k block, and candidates per thread: a block picks the k best of their product.
pub const TOP_K_THREADS: u32 = 256;
pub const TOP_K_ITEMS: usize = 16;
/// Tiles of 8 tokens a routing warp multiplies per pass over its chunks' keys on tensor cores: more
/// tokens take more passes, each reading the keys again.
pub const ROUTING_MMA_TILES: usize = 4;
/// Warps per block of the tensor-core routing kernel, 32 chunks each: small blocks, so that a bank of
/// 1M tokens (16,000 chunks at MSA-4B) still spreads over every multiprocessor of an H100.
pub const ROUTING_MMA_WARPS: u32 = 4;

/// The preprocessor definitions kernels.cu is compiled with.
pub fn kernel_defines() -> [(&'static str, usize); 7] {
    [
        ("SMALL_ROWS", SMALL_ROWS),
        ("MAX_PER_LANE", MAX_PER_LANE),
        ("ATTENTION_WARPS", ATTENTION_WARPS as usize),
        ("TOP_K_THREADS", TOP_K_THREADS as usize),
        ("TOP_K_ITEMS", TOP_K_ITEMS),
        ("ROUTING_MMA_TILES", ROUTING_MMA_TILES),
        ("ROUTING_MMA_WARPS", ROUTING_MMA_WARPS as usize),
    ]
}

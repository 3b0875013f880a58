// y = x · Wᵀ for x [n, inner] f32 and a packed weight W [out, inner] (f32 / bf16 / f16, widened exactly),
// f32 accumulation. One invocation per (output column, block of ROWS rows): it streams its weight row
// once and applies it to ROWS rows of x, which every invocation of the workgroup reads alike. No
// workgroup barriers, which software adapters (lavapipe, SwiftShader) execute very slowly.
// ROWS is 1 for a single token (decode GEMV) and 4 for a block (prefill GEMM).
// The weight may be a window of a larger buffer: this dispatch covers columns [col_start, col_start + cols).

override ROWS: u32 = 4u;   // 1..=4

struct Params {
    n: u32,
    inner: u32,
    cols: u32,        // output columns in this dispatch
    col_start: u32,   // first output column of this dispatch
    out_features: u32,
    w_base: u32,      // element offset of column col_start's row inside the bound window
    row_blocks: u32,  // ceil(n / ROWS)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
          @builtin(local_invocation_index) lane: u32) {
    let t = flat_workgroup(wg, groups) * 64u + lane;
    if t >= p.cols * p.row_blocks { return; }
    let col = t % p.cols;
    let row0 = (t / p.cols) * ROWS;
    // Rows past n repeat the last row; their results are not stored.
    var x_row: array<u32, 4>;
    for (var r = 0u; r < ROWS; r++) {
        x_row[r] = min(row0 + r, p.n - 1u) * p.inner;
    }
    let w_row = p.w_base + col * p.inner;
    var acc: array<f32, 4>;
    var k = 0u;
    if DTYPE != 0u && (w_row & 1u) == 0u {
        // Packed pairs: one load for two weights.
        for (; k + 1u < p.inner; k += 2u) {
            let word = w[(w_row + k) >> 1u];
            let w0 = widen(word, 0u);
            let w1 = widen(word, 1u);
            for (var r = 0u; r < ROWS; r++) {
                acc[r] += x[x_row[r] + k] * w0 + x[x_row[r] + k + 1u] * w1;
            }
        }
    }
    for (; k < p.inner; k++) {
        let i = w_row + k;
        let wk = widen(w[word_of(i)], i);
        for (var r = 0u; r < ROWS; r++) {
            acc[r] += x[x_row[r] + k] * wk;
        }
    }
    for (var r = 0u; r < ROWS; r++) {
        if row0 + r < p.n {
            y[(row0 + r) * p.out_features + p.col_start + col] = acc[r];
        }
    }
}

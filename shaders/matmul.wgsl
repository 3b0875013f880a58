// y = x · Wᵀ for x [n, inner] f32 and a packed weight W [out, inner] (f32 / bf16 / f16, widened exactly),
// f32 accumulation. One invocation per (output column, block of ROWS rows): it streams its weight row
// once and applies it to ROWS rows of x, which every invocation of the workgroup reads alike. No
// workgroup barriers, which software adapters (lavapipe, SwiftShader) execute very slowly.
// ROWS is 1 for a single token (decode GEMV) and 4 for a block (prefill GEMM).
// The weight may be a window of a larger buffer: this dispatch covers columns [col_start, col_start + cols).
//
// Specialisations fuse the bandwidth-bound ops around a projection into its one pass over the weights,
// so a decoder layer's MLP half takes three dispatches instead of eight:
// NORM 1: RMSNorm prologue. x is normalised on the fly with the norm weight g (same dtype as W):
//         y = (Σ_k g_k x_k W_ck) / sqrt(mean(x²) + eps), the sum of squares accumulated in the same loop.
// EPILOGUE 1: y = residual + x · Wᵀ (o_proj and down_proj with the residual add).
// EPILOGUE 2: y = silu(x · Gᵀ) ⊙ (x · Uᵀ), G = W and U = `w2` (gate_proj and up_proj with SwiGLU).
// Bindings a specialisation does not use are bound to any small buffer.

override ROWS: u32 = 4u;       // 1..=4
override NORM: u32 = 0u;       // 0 or 1
override EPILOGUE: u32 = 0u;   // 0, 1 or 2

struct Params {
    n: u32,
    inner: u32,
    cols: u32,        // output columns in this dispatch
    col_start: u32,   // first output column of this dispatch
    out_features: u32,
    w_base: u32,      // element offset of column col_start's row inside the bound window (W and w2)
    row_blocks: u32,  // ceil(n / ROWS)
    eps: f32,         // NORM
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> residual: array<f32>;   // EPILOGUE 1: [n, out_features]
@group(0) @binding(5) var<storage, read> w2: array<u32>;         // EPILOGUE 2: packed like W
@group(0) @binding(6) var<storage, read> g: array<u32>;          // NORM: [inner], packed like W

// g_k under NORM, 1 otherwise.
fn norm_weight(k: u32) -> f32 {
    if NORM == 1u {
        return widen(g[word_of(k)], k);
    }
    return 1.0;
}

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
    var acc2: array<f32, 4>;   // EPILOGUE 2: x · Uᵀ
    var squares: array<f32, 4>;  // NORM: Σ x²
    var k = 0u;
    if DTYPE != 0u && (w_row & 1u) == 0u {
        // Packed pairs: one load for two weights (k is even, so g's pair shares a word too).
        for (; k + 1u < p.inner; k += 2u) {
            let word = w[(w_row + k) >> 1u];
            let w0 = widen(word, 0u);
            let w1 = widen(word, 1u);
            var u0 = 0.0;
            var u1 = 0.0;
            if EPILOGUE == 2u {
                let word2 = w2[(w_row + k) >> 1u];
                u0 = widen(word2, 0u);
                u1 = widen(word2, 1u);
            }
            let g0 = norm_weight(k);
            let g1 = norm_weight(k + 1u);
            for (var r = 0u; r < ROWS; r++) {
                let xa = x[x_row[r] + k];
                let xb = x[x_row[r] + k + 1u];
                let a = xa * g0;
                let b = xb * g1;
                acc[r] += a * w0 + b * w1;
                if EPILOGUE == 2u {
                    acc2[r] += a * u0 + b * u1;
                }
                if NORM == 1u {
                    squares[r] += xa * xa + xb * xb;
                }
            }
        }
    }
    for (; k < p.inner; k++) {
        let i = w_row + k;
        let wk = widen(w[word_of(i)], i);
        var uk = 0.0;
        if EPILOGUE == 2u {
            uk = widen(w2[word_of(i)], i);
        }
        let gk = norm_weight(k);
        for (var r = 0u; r < ROWS; r++) {
            let xa = x[x_row[r] + k];
            let a = xa * gk;
            acc[r] += a * wk;
            if EPILOGUE == 2u {
                acc2[r] += a * uk;
            }
            if NORM == 1u {
                squares[r] += xa * xa;
            }
        }
    }
    for (var r = 0u; r < ROWS; r++) {
        let row = row0 + r;
        if row >= p.n {
            continue;
        }
        var gate = acc[r];
        var up = acc2[r];
        if NORM == 1u {
            let inv = 1.0 / sqrt(squares[r] / f32(p.inner) + p.eps);
            gate *= inv;
            up *= inv;
        }
        let out = row * p.out_features + p.col_start + col;
        switch EPILOGUE {
            case 1u: { y[out] = residual[out] + gate; }
            case 2u: { y[out] = silu(gate) * up; }
            default: { y[out] = gate; }
        }
    }
}

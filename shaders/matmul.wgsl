// y = x · Wᵀ for x [n, inner] f32 and a packed weight W [out, inner] (f32 / bf16 / f16, widened exactly),
// f32 accumulation. One invocation per block of COLS output columns × ROWS rows of x (register tiling):
// each weight word it loads serves ROWS rows and each x value COLS columns. No workgroup barriers,
// which software adapters (lavapipe, SwiftShader) execute very slowly.
// Decode (one token) uses ROWS = COLS = 1: a GEMV with one invocation per column, as many as possible in
// flight; a block (prefill) uses COLS = 4 and ROWS = 2. Larger tiles are slower: at 16 accumulators per
// array lavapipe keeps them in memory instead of registers (measured with `msa bench --kernels`).
// SPLIT (chosen per adapter, see `Variants`) is how many invocations share one tile: 1 on software
// adapters (no barriers); 64 on GPUs, where the whole workgroup strides over `inner` together, so
// consecutive invocations read consecutive weight words, and the partial sums meet in workgroup memory.
// The weight may be a window of a larger buffer: this dispatch covers columns [col_start, col_start + cols).
//
// Specialisations fuse the bandwidth-bound ops around a projection into its one pass over the weights,
// so a decoder layer's MLP half takes three dispatches instead of eight:
// NORM 1: RMSNorm prologue. x is normalised on the fly with the norm weight g (same dtype as W):
//         y = (Σ_k g_k x_k W_ck) / sqrt(mean(x²) + eps), the sum of squares accumulated in the same loop.
// EPILOGUE 1: y = residual + x · Wᵀ (o_proj and down_proj with the residual add).
// EPILOGUE 2: y = silu(x · Gᵀ) ⊙ (x · Uᵀ), G = W and U = `w2` (gate_proj and up_proj with SwiGLU).
// Bindings a specialisation does not use are bound to any small buffer.

override ROWS: u32 = 2u;       // 1..=2
override COLS: u32 = 4u;       // 1..=4
override NORM: u32 = 0u;       // 0 or 1
override EPILOGUE: u32 = 0u;   // 0, 1 or 2
override SPLIT: u32 = 1u;      // a power of two, 1..=64

struct Params {
    n: u32,
    inner: u32,
    cols: u32,        // output columns in this dispatch
    col_start: u32,   // first output column of this dispatch
    out_features: u32,
    w_base: u32,      // element offset of column col_start's row inside the bound window (W and w2)
    row_blocks: u32,  // ceil(n / ROWS)
    eps: f32,         // NORM
    col_blocks: u32,  // ceil(cols / COLS)
    vectors: u32,     // 1: inner and w_base are multiples of a 16-byte word's elements
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> residual: array<f32>;   // EPILOGUE 1: [n, out_features]
@group(0) @binding(5) var<storage, read> w2: array<vec4<u32>>;   // EPILOGUE 2: packed like W
@group(0) @binding(6) var<storage, read> g: array<vec4<u32>>;    // NORM: [inner], packed like W

// Element i of x, and element i of W, U (w2) and g, widened: the scalar path, for shapes whose rows do
// not start on 16-byte words.
fn x_at(i: u32) -> f32 {
    return x[i >> 2u][i & 3u];
}

fn w_at(i: u32) -> f32 {
    let word = word_of(i);
    return widen(w[word >> 2u][word & 3u], i);
}

fn w2_at(i: u32) -> f32 {
    let word = word_of(i);
    return widen(w2[word >> 2u][word & 3u], i);
}

// g_k under NORM, 1 otherwise.
fn norm_weight(k: u32) -> f32 {
    if NORM == 1u {
        let word = word_of(k);
        return widen(g[word >> 2u][word & 3u], k);
    }
    return 1.0;
}

// Per invocation: acc and acc2 ([column][row]) then the squares per row, when SPLIT > 1.
const PARTIALS: u32 = 4u * 2u * 2u + 2u;
var<workgroup> partial: array<f32, 1152>;   // [PARTIALS][64]

// Slot of partial value v of invocation `lane`.
fn slot(v: u32, lane: u32) -> u32 {
    return v * 64u + lane;
}

@compute @workgroup_size(64)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
          @builtin(local_invocation_index) lane: u32) {
    let t = flat_workgroup(wg, groups) * (64u / SPLIT) + lane / SPLIT;
    let j = lane % SPLIT;   // this invocation's share of the tile
    // No early return: with SPLIT > 1 every invocation reaches the barriers below.
    let in_range = t < p.col_blocks * p.row_blocks;
    let col0 = (t % p.col_blocks) * COLS;
    let row0 = (t / p.col_blocks) * ROWS;
    // Rows past n repeat the last row and columns past `cols` the last column; neither is stored.
    var x_row: array<u32, 2>;
    for (var r = 0u; r < ROWS; r++) {
        x_row[r] = min(row0 + r, p.n - 1u) * p.inner;
    }
    var w_row: array<u32, 4>;
    for (var c = 0u; c < COLS; c++) {
        w_row[c] = p.w_base + min(col0 + c, p.cols - 1u) * p.inner;
    }
    var acc: array<array<f32, 2>, 4>;    // [column][row]
    var acc2: array<array<f32, 2>, 4>;   // EPILOGUE 2: x · Uᵀ
    var squares: array<f32, 2>;          // NORM: Σ x² per row
    // An inactive invocation (past the last tile) computes nothing but still meets the barriers.
    var k = select(p.inner, j, in_range);
    if p.vectors == 1u {
        // 16-byte words: 8 packed halves (or 4 f32) of each weight row per load, and the x values
        // (and norm weights) they meet in as many vec4s.
        let pv = per_vector();
        for (k = select(p.inner, pv * j, in_range); k < p.inner; k += pv * SPLIT) {
            var g_lo = vec4<f32>(1.0);
            var g_hi = vec4<f32>(1.0);
            if NORM == 1u {
                let word = g[k / pv];
                g_lo = widen4(word, 0u);
                g_hi = widen4(word, 1u);
            }
            var x_lo: array<vec4<f32>, 2>;
            var x_hi: array<vec4<f32>, 2>;
            for (var r = 0u; r < ROWS; r++) {
                let i = (x_row[r] + k) >> 2u;
                let lo = x[i];
                var hi = vec4<f32>(0.0);
                if DTYPE != 0u {
                    hi = x[i + 1u];
                }
                if NORM == 1u {
                    squares[r] += dot(lo, lo) + dot(hi, hi);
                }
                x_lo[r] = lo * g_lo;
                x_hi[r] = hi * g_hi;
            }
            for (var c = 0u; c < COLS; c++) {
                let i = (w_row[c] + k) / pv;
                let word = w[i];
                let w_lo = widen4(word, 0u);
                let w_hi = widen4(word, 1u);
                var u_lo = vec4<f32>(0.0);
                var u_hi = vec4<f32>(0.0);
                if EPILOGUE == 2u {
                    let word2 = w2[i];
                    u_lo = widen4(word2, 0u);
                    u_hi = widen4(word2, 1u);
                }
                for (var r = 0u; r < ROWS; r++) {
                    var a = dot(x_lo[r], w_lo);
                    var b = 0.0;
                    if DTYPE != 0u {
                        a += dot(x_hi[r], w_hi);
                    }
                    acc[c][r] += a;
                    if EPILOGUE == 2u {
                        b = dot(x_lo[r], u_lo);
                        if DTYPE != 0u {
                            b += dot(x_hi[r], u_hi);
                        }
                        acc2[c][r] += b;
                    }
                }
            }
        }
    }
    for (; k < p.inner; k += SPLIT) {
        let gk = norm_weight(k);
        var a: array<f32, 2>;
        for (var r = 0u; r < ROWS; r++) {
            let xa = x_at(x_row[r] + k);
            a[r] = xa * gk;
            if NORM == 1u {
                squares[r] += xa * xa;
            }
        }
        for (var c = 0u; c < COLS; c++) {
            let i = w_row[c] + k;
            let wk = w_at(i);
            var uk = 0.0;
            if EPILOGUE == 2u {
                uk = w2_at(i);
            }
            for (var r = 0u; r < ROWS; r++) {
                acc[c][r] += a[r] * wk;
                if EPILOGUE == 2u {
                    acc2[c][r] += a[r] * uk;
                }
            }
        }
    }
    if SPLIT > 1u {
        // Tree reduction of every partial sum over the SPLIT invocations of the tile.
        for (var c = 0u; c < COLS; c++) {
            for (var r = 0u; r < ROWS; r++) {
                partial[slot(c * 2u + r, lane)] = acc[c][r];
                partial[slot(8u + c * 2u + r, lane)] = acc2[c][r];
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            partial[slot(16u + r, lane)] = squares[r];
        }
        workgroupBarrier();
        for (var s = SPLIT / 2u; s > 0u; s /= 2u) {
            if j < s {
                for (var v = 0u; v < PARTIALS; v++) {
                    partial[slot(v, lane)] += partial[slot(v, lane + s)];
                }
            }
            workgroupBarrier();
        }
        for (var c = 0u; c < COLS; c++) {
            for (var r = 0u; r < ROWS; r++) {
                acc[c][r] = partial[slot(c * 2u + r, lane)];
                acc2[c][r] = partial[slot(8u + c * 2u + r, lane)];
            }
        }
        for (var r = 0u; r < ROWS; r++) {
            squares[r] = partial[slot(16u + r, lane)];
        }
    }
    if !in_range || j != 0u {
        return;
    }
    for (var r = 0u; r < ROWS; r++) {
        let row = row0 + r;
        if row >= p.n {
            continue;
        }
        var inv = 1.0;
        if NORM == 1u {
            inv = 1.0 / sqrt(squares[r] / f32(p.inner) + p.eps);
        }
        for (var c = 0u; c < COLS; c++) {
            let col = col0 + c;
            if col >= p.cols {
                continue;
            }
            let gate = acc[c][r] * inv;
            let out = row * p.out_features + p.col_start + col;
            switch EPILOGUE {
                case 1u: { y[out] = residual[out] + gate; }
                case 2u: { y[out] = silu(gate) * (acc2[c][r] * inv); }
                default: { y[out] = gate; }
            }
        }
    }
}

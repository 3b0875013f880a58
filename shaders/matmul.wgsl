// y = x · Wᵀ for x [n, inner] f32 and a packed weight W [out, inner] (f32 / bf16 / f16, widened exactly),
// f32 accumulation. Two entry points share the specialisations below:
//
// `matmul`: one invocation per block of COLS output columns × ROWS rows of x (register tiling): each
// weight word it loads serves ROWS rows and each x value COLS columns. No workgroup barriers, which
// software adapters (lavapipe, SwiftShader) execute very slowly. Where every weight row starts on a
// 16-byte word (`vectors`), weights, x and norm weights are read as vec4s (8 packed halves or 4 f32 per
// weight load), else one element at a time. Decode (one token) uses ROWS = 1 and the adapter's decode
// columns: 1 on GPUs (a GEMV with one tile per column, as many as possible in flight), 4 on CPU adapters,
// where an x value loaded once then serves 4 weight rows. A block (prefill) uses COLS = 8 and ROWS = 4
// (4 × 2 where SPLIT > 1). The accumulators are named matrices, not arrays indexed in loops: lavapipe keeps
// such arrays in memory, and at 16 accumulators that made a 4 × 4 tile slower than 4 × 2 (measured
// with `msa bench --kernels`).
// SPLIT (chosen per adapter, see `Variants`) is how many invocations share one tile: 1 on software
// adapters (no barriers); 64 on GPUs, where the whole workgroup strides over `inner` together, so
// consecutive invocations read consecutive weight words, and the partial sums meet in registers within
// a subgroup (SUBGROUP, see common.wgsl) and in workgroup memory across subgroups.
//
// `matmul_tiled` (further below): the workgroup-tiled GEMM for blocks of rows on GPUs.
//
// The weight may be a window of a larger buffer: this dispatch covers columns [col_start, col_start + cols).
//
// Specialisations fuse the bandwidth-bound ops around a projection into its one pass over the weights,
// so a decoder layer's MLP half takes three dispatches instead of eight:
// NORM 1: RMSNorm prologue. x is normalised on the fly with the norm weight g (same dtype as W):
//         y = (Σ_k g_k x_k W_ck) / sqrt(mean(x²) + eps), the sum of squares accumulated in the same loop.
// EPILOGUE 1: y = residual + x · Wᵀ (o_proj and down_proj with the residual add).
// EPILOGUE 2: y = silu(x · Gᵀ) ⊙ (x · Uᵀ), G = W and U = `w2` (gate_proj and up_proj with SwiGLU).
// Bindings a specialisation does not use are bound to any small buffer.

override ROWS: u32 = 2u;       // 1..=4
override COLS: u32 = 4u;       // 1..=4 or 8; at most 4 where SPLIT > 1 (the partial sums below)
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
    row_blocks: u32,  // ceil(n / ROWS) (matmul), ceil(n / TILE) (matmul_tiled)
    eps: f32,         // NORM
    col_blocks: u32,  // ceil(cols / COLS) (matmul), ceil(cols / TILE) (matmul_tiled)
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

// The weights of 16-byte word `i` of W and, under EPILOGUE 2, of U, widened: elements 0-3 in `lo`,
// 4-7 in `hi` (halves; an f32 word holds 4, in `lo`).
struct Words {
    w_lo: vec4<f32>,
    w_hi: vec4<f32>,
    u_lo: vec4<f32>,
    u_hi: vec4<f32>,
}

fn weight_words(i: u32) -> Words {
    let word = w[i];
    var words = Words(widen4(word, 0u), widen4(word, 1u), vec4<f32>(0.0), vec4<f32>(0.0));
    if EPILOGUE == 2u {
        let up = w2[i];
        words.u_lo = widen4(up, 0u);
        words.u_hi = widen4(up, 1u);
    }
    return words;
}

// g_k under NORM, 1 otherwise.
fn norm_weight(k: u32) -> f32 {
    if NORM == 1u {
        let word = word_of(k);
        return widen(g[word >> 2u][word & 3u], k);
    }
    return 1.0;
}

// The sums of a tile's column c live in a mat2x4, one component per row of the tile: [0] x · Wᵀ, [1]
// x · Uᵀ (EPILOGUE 2). The hot loops keep the COLS of them as named variables, not an array: lavapipe
// keeps an array indexed in a loop in memory, and a load from memory costs it dozens of FMAs.

// Raw x values k..k+7 of the row starting at element `row` (`lo`, `hi`; `hi` zero for f32 weights,
// whose 16-byte word holds 4): 16-byte words.
fn x_words(row: u32, k: u32) -> mat2x4<f32> {
    let i = (row + k) >> 2u;
    var hi = vec4<f32>(0.0);
    if DTYPE != 0u {
        hi = x[i + 1u];
    }
    return mat2x4<f32>(x[i], hi);
}

fn sum_squares(words: mat2x4<f32>) -> f32 {
    return dot(words[0], words[0]) + dot(words[1], words[1]);
}

// A column's dots with the tile's rows for weight word `i` (and U's); x_lo column r holds row r's
// values k..k+3, x_hi k+4..k+7.
fn column_dots(i: u32, x_lo: mat4x4<f32>, x_hi: mat4x4<f32>) -> mat2x4<f32> {
    let words = weight_words(i);
    var dots = mat2x4<f32>(words.w_lo * x_lo, vec4<f32>(0.0));
    if DTYPE != 0u {
        dots[0] += words.w_hi * x_hi;
    }
    if EPILOGUE == 2u {
        dots[1] = words.u_lo * x_lo;
        if DTYPE != 0u {
            dots[1] += words.u_hi * x_hi;
        }
    }
    return dots;
}

// A column's products with the tile's rows' values `xs` for element `i` of W (and U): the scalar path.
fn column_products(i: u32, xs: vec4<f32>) -> mat2x4<f32> {
    var products = mat2x4<f32>(xs * w_at(i), vec4<f32>(0.0));
    if EPILOGUE == 2u {
        products[1] = xs * w2_at(i);
    }
    return products;
}

// Partial sums per invocation, for the SPLIT reduction (COLS <= 4): each column's two sum vectors
// (2c, 2c + 1), then the squares per row (8).
const PARTIALS: u32 = 9u;
var<workgroup> partial: array<vec4<f32>, 576>;   // [PARTIALS][64]

// Whether this specialisation computes partial vector v: a decode GEMV reduces 1 of the 9.
fn used(v: u32) -> bool {
    if v == 8u {
        return NORM == 1u;
    }
    return v / 2u < COLS && (v % 2u == 0u || EPILOGUE == 2u);
}

// Slot of partial vector v of invocation `lane`.
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
    let x_rows = min(vec4<u32>(row0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.n - 1u)) * p.inner;
    let w_rows = vec4<u32>(p.w_base)
        + min(vec4<u32>(col0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.cols - 1u)) * p.inner;
    var a0 = mat2x4<f32>();
    var a1 = mat2x4<f32>();
    var a2 = mat2x4<f32>();
    var a3 = mat2x4<f32>();
    var a4 = mat2x4<f32>();
    var a5 = mat2x4<f32>();
    var a6 = mat2x4<f32>();
    var a7 = mat2x4<f32>();
    let w_rows_hi = vec4<u32>(p.w_base)
        + min(vec4<u32>(col0 + 4u) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.cols - 1u)) * p.inner;   // COLS 8
    var squares = vec4<f32>(0.0);   // NORM: Σ x² per row
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
            let r0 = x_words(x_rows[0], k);
            var r1 = mat2x4<f32>();
            var r2 = mat2x4<f32>();
            var r3 = mat2x4<f32>();
            if ROWS > 1u {
                r1 = x_words(x_rows[1], k);
            }
            if ROWS > 2u {
                r2 = x_words(x_rows[2], k);
                r3 = x_words(x_rows[3], k);
            }
            if NORM == 1u {
                squares += vec4<f32>(sum_squares(r0), sum_squares(r1), sum_squares(r2), sum_squares(r3));
            }
            let x_lo = mat4x4<f32>(r0[0] * g_lo, r1[0] * g_lo, r2[0] * g_lo, r3[0] * g_lo);
            let x_hi = mat4x4<f32>(r0[1] * g_hi, r1[1] * g_hi, r2[1] * g_hi, r3[1] * g_hi);
            a0 += column_dots((w_rows[0] + k) / pv, x_lo, x_hi);
            if COLS > 1u {
                a1 += column_dots((w_rows[1] + k) / pv, x_lo, x_hi);
            }
            if COLS > 2u {
                a2 += column_dots((w_rows[2] + k) / pv, x_lo, x_hi);
            }
            if COLS > 3u {
                a3 += column_dots((w_rows[3] + k) / pv, x_lo, x_hi);
            }
            if COLS > 4u {
                a4 += column_dots((w_rows_hi[0] + k) / pv, x_lo, x_hi);
                a5 += column_dots((w_rows_hi[1] + k) / pv, x_lo, x_hi);
                a6 += column_dots((w_rows_hi[2] + k) / pv, x_lo, x_hi);
                a7 += column_dots((w_rows_hi[3] + k) / pv, x_lo, x_hi);
            }
        }
    }
    for (; k < p.inner; k += SPLIT) {
        var xs = vec4<f32>(x_at(x_rows[0] + k), 0.0, 0.0, 0.0);
        if ROWS > 1u {
            xs.y = x_at(x_rows[1] + k);
        }
        if ROWS > 2u {
            xs.z = x_at(x_rows[2] + k);
            xs.w = x_at(x_rows[3] + k);
        }
        if NORM == 1u {
            squares += xs * xs;
        }
        xs *= norm_weight(k);
        a0 += column_products(w_rows[0] + k, xs);
        if COLS > 1u {
            a1 += column_products(w_rows[1] + k, xs);
        }
        if COLS > 2u {
            a2 += column_products(w_rows[2] + k, xs);
        }
        if COLS > 3u {
            a3 += column_products(w_rows[3] + k, xs);
        }
        if COLS > 4u {
            a4 += column_products(w_rows_hi[0] + k, xs);
            a5 += column_products(w_rows_hi[1] + k, xs);
            a6 += column_products(w_rows_hi[2] + k, xs);
            a7 += column_products(w_rows_hi[3] + k, xs);
        }
    }
    // Past the hot loops an array is fine: what remains runs once.
    var acc = array<mat2x4<f32>, 8>(a0, a1, a2, a3, a4, a5, a6, a7);
    if SPLIT > 1u {
        // Every partial sum over the SPLIT invocations of the tile: first over the runs of them that
        // share a subgroup, in registers; then, where the tile spans subgroups, a tree over the runs
        // in workgroup memory.
        let run = min(SPLIT, SUBGROUP);
        for (var c = 0u; c < COLS; c++) {
            acc[c][0] = span_sum4(acc[c][0], run);
            if EPILOGUE == 2u {
                acc[c][1] = span_sum4(acc[c][1], run);
            }
        }
        if NORM == 1u {
            squares = span_sum4(squares, run);
        }
        if run < SPLIT {
            for (var c = 0u; c < COLS; c++) {
                partial[slot(2u * c, lane)] = acc[c][0];
                partial[slot(2u * c + 1u, lane)] = acc[c][1];
            }
            partial[slot(8u, lane)] = squares;
            workgroupBarrier();
            for (var s = SPLIT / 2u; s >= run; s /= 2u) {
                if j < s {
                    for (var v = 0u; v < PARTIALS; v++) {
                        if used(v) {
                            partial[slot(v, lane)] += partial[slot(v, lane + s)];
                        }
                    }
                }
                workgroupBarrier();
            }
            for (var c = 0u; c < COLS; c++) {
                acc[c] = mat2x4<f32>(partial[slot(2u * c, lane)], partial[slot(2u * c + 1u, lane)]);
            }
            squares = partial[slot(8u, lane)];
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
        let inv = inverse_rms(squares[r]);
        for (var c = 0u; c < COLS; c++) {
            store(row, col0 + c, acc[c][0][r] * inv, acc[c][1][r] * inv);
        }
    }
}

// 1 / sqrt(mean(x²) + eps) of a row from its sum of squares under NORM, 1 otherwise.
fn inverse_rms(squares: f32) -> f32 {
    if NORM == 1u {
        return 1.0 / sqrt(squares / f32(p.inner) + p.eps);
    }
    return 1.0;
}

// Writes output (row, col) of this dispatch from x · Wᵀ (`gate`) and, under EPILOGUE 2, x · Uᵀ (`up`),
// both already normalised; columns past `cols` are not stored.
fn store(row: u32, col: u32, gate: f32, up: f32) {
    if col >= p.cols {
        return;
    }
    let out = row * p.out_features + p.col_start + col;
    switch EPILOGUE {
        case 1u: { y[out] = residual[out] + gate; }
        case 2u: { y[out] = silu(gate) * up; }
        default: { y[out] = gate; }
    }
}

// `matmul_tiled`, for blocks of rows on GPUs (`Variants::matmul_tiles`): the classic workgroup-tiled
// GEMM. A workgroup computes TILE rows × TILE columns; for each step of TILE along `inner` it loads the
// x block and the weight block (widened to f32, U's too under EPILOGUE 2) into workgroup memory, once
// for the whole workgroup, and each invocation accumulates a 4 × 4 sub-block from there: each value
// loaded from memory serves TILE / 4 × 4 FMAs instead of ROWS or COLS. Needs inner a multiple of
// TILE and every weight row on a 16-byte word (`vectors`).
const TILE: u32 = 32u;
var<workgroup> x_tile: array<f32, 1024>;    // [TILE k][TILE rows], scaled by g under NORM
var<workgroup> w_tile: array<f32, 1024>;    // [TILE k][TILE columns]
var<workgroup> u_tile: array<f32, 1024>;    // EPILOGUE 2

@compute @workgroup_size(64)
fn matmul_tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                @builtin(local_invocation_index) lane: u32) {
    let block = flat_workgroup(wg, groups);
    if block >= p.col_blocks * p.row_blocks { return; }
    let col0 = (block % p.col_blocks) * TILE;
    let row0 = (block / p.col_blocks) * TILE;
    // This invocation's outputs: rows ty + 8r and columns tx + 8c of the block (r, c < 4), so the
    // invocations of a row of 8 read consecutive columns of w_tile.
    let tx = lane % 8u;
    let ty = lane / 8u;
    // What it loads: the x quad `lane % 8` of rows lane / 8 + 8i (i < 4), every step; its squares
    // accumulate per row across steps.
    var squares: array<f32, 4>;
    var acc: array<f32, 16>;    // [c][r]
    var acc2: array<f32, 16>;   // EPILOGUE 2
    let pv = per_vector();
    let words_per_row = TILE / pv;
    for (var k0 = 0u; k0 < p.inner; k0 += TILE) {
        let quad = lane % 8u;
        var g4 = vec4<f32>(1.0);
        if NORM == 1u {
            let e = k0 + quad * 4u;
            g4 = widen4(g[e / pv], (e % pv) / 4u);
        }
        for (var i = 0u; i < 4u; i++) {
            let r = lane / 8u + 8u * i;
            let row = min(row0 + r, p.n - 1u);
            let xv = x[(row * p.inner + k0) / 4u + quad];
            if NORM == 1u {
                squares[i] += dot(xv, xv);
            }
            let scaled = xv * g4;
            for (var t = 0u; t < 4u; t++) {
                x_tile[(quad * 4u + t) * TILE + r] = scaled[t];
            }
        }
        for (var e = lane; e < TILE * words_per_row; e += 64u) {
            let c = e / words_per_row;
            let part = e % words_per_row;
            let index = (p.w_base + min(col0 + c, p.cols - 1u) * p.inner + k0) / pv + part;
            let k = part * pv;
            let words = weight_words(index);
            for (var t = 0u; t < 4u; t++) {
                w_tile[(k + t) * TILE + c] = words.w_lo[t];
                if EPILOGUE == 2u {
                    u_tile[(k + t) * TILE + c] = words.u_lo[t];
                }
                if DTYPE != 0u {
                    w_tile[(k + 4u + t) * TILE + c] = words.w_hi[t];
                    if EPILOGUE == 2u {
                        u_tile[(k + 4u + t) * TILE + c] = words.u_hi[t];
                    }
                }
            }
        }
        workgroupBarrier();
        for (var k = 0u; k < TILE; k++) {
            var xr = array<f32, 4>();
            for (var r = 0u; r < 4u; r++) {
                xr[r] = x_tile[k * TILE + ty + 8u * r];
            }
            for (var c = 0u; c < 4u; c++) {
                let wk = w_tile[k * TILE + tx + 8u * c];
                var uk = 0.0;
                if EPILOGUE == 2u {
                    uk = u_tile[k * TILE + tx + 8u * c];
                }
                for (var r = 0u; r < 4u; r++) {
                    acc[c * 4u + r] += xr[r] * wk;
                    if EPILOGUE == 2u {
                        acc2[c * 4u + r] += xr[r] * uk;
                    }
                }
            }
        }
        workgroupBarrier();
    }
    // Each row's sum of squares is spread over the 8 invocations that loaded its quads: meet in
    // x_tile (free after the last barrier) as [row][quad].
    if NORM == 1u {
        for (var i = 0u; i < 4u; i++) {
            x_tile[(lane / 8u + 8u * i) * 8u + lane % 8u] = squares[i];
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < 4u; r++) {
        let row = ty + 8u * r;
        if row0 + row >= p.n {
            continue;
        }
        var sum = 0.0;
        if NORM == 1u {
            for (var q = 0u; q < 8u; q++) {
                sum += x_tile[row * 8u + q];
            }
        }
        let inv = inverse_rms(sum);
        for (var c = 0u; c < 4u; c++) {
            store(row0 + row, col0 + tx + 8u * c, acc[c * 4u + r] * inv, acc2[c * 4u + r] * inv);
        }
    }
}

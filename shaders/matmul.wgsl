// y = x · Wᵀ for x [n, inner] f32 and a packed weight W [out, inner] (f32 / bf16 / f16, widened exactly),
// f32 accumulation. One workgroup per (output column, block of ROWS rows): its invocations stride over
// `inner` so weight reads are contiguous across the workgroup, then reduce in workgroup memory. For a
// single token this is the decode GEMV; for prefill every weight row is read once per ROWS tokens.
// The weight may be a window of a larger buffer: this dispatch covers columns [col_start, col_start + cols).

const WG: u32 = 64u;
const ROWS: u32 = 4u;

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

var<workgroup> partial: array<array<f32, WG>, ROWS>;

@compute @workgroup_size(WG)
fn matmul(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
          @builtin(local_invocation_index) lane: u32) {
    let id = flat_workgroup(wg, groups);
    if id >= p.cols * p.row_blocks { return; }
    let col = id % p.cols;
    let row0 = (id / p.cols) * ROWS;
    let rows = min(ROWS, p.n - row0);
    let w_row = p.w_base + col * p.inner;
    var acc: array<f32, ROWS>;
    for (var k = lane; k < p.inner; k += WG) {
        let i = w_row + k;
        let wk = widen(w[word_of(i)], i);
        for (var r = 0u; r < rows; r++) {
            acc[r] += x[(row0 + r) * p.inner + k] * wk;
        }
    }
    for (var r = 0u; r < ROWS; r++) {
        partial[r][lane] = acc[r];
    }
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        workgroupBarrier();
        if lane < stride {
            for (var r = 0u; r < ROWS; r++) {
                partial[r][lane] += partial[r][lane + stride];
            }
        }
    }
    if lane < rows {
        y[(row0 + lane) * p.out_features + p.col_start + col] = partial[lane][0];
    }
}

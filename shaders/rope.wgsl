// NeoX rotate-half RoPE on x [n, heads, d] with one position per row. The host supplies cos/sin of every
// (row, frequency) pair, computed once per position list in f64 (exact on every adapter, whatever the
// precision of its sin/cos at large angles) and shared by q and k of every layer.
// One invocation per (row, head, frequency) pair.

struct Params {
    pairs: u32,   // n * heads * half
    heads: u32,
    half: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> cos_sin: array<vec2<f32>>;   // [n, half]
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn rope(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let e = flat_workgroup(wg, groups) * 64u + lane;
    if e >= p.pairs { return; }
    let j = e % p.half;
    let row_head = e / p.half;
    let row = row_head / p.heads;
    let base = row_head * 2u * p.half;
    let cs = cos_sin[row * p.half + j];
    let a = x[base + j];
    let b = x[base + j + p.half];
    y[base + j] = a * cs.x - b * cs.y;
    y[base + j + p.half] = b * cs.x + a * cs.y;
}

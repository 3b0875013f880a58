// Softmax attention with GQA, flash style: keys are visited in tiles of WG with an online softmax (running
// max m, running sum l, rescaled accumulator), so no [queries × keys] matrix exists anywhere.
// q [nq, heads, d], k/v [nk, kv_heads, d]; the causal mask is bottom-right aligned (query i sees keys
// 0..=nk - nq + i: the whole prefix, then the query block causally). Packed (block-diagonal causal,
// several sequences in one block, nq == nk): query i also starts at `row_first[i]`, its sequence's start.
//
// `attend`: one workgroup per (query row, GROUP query heads sharing a KV head, split), so each key and
// value is read once for the GROUP heads. With one split it writes the normalised output; with several
// (split-KV, for decode where rows × heads alone cannot fill a GPU) it writes the unnormalised
// accumulator and (m, l) of its key range per head, and `combine` merges the splits.

const WG: u32 = 64u;

override GROUP: u32 = 1u;   // query heads per workgroup: 1, 2 or 4, dividing heads / kv_heads
override DIMS: u32 = 2u;    // output dims per invocation: ceil(d / WG), 1..=4

struct Params {
    nq: u32,
    nk: u32,
    heads: u32,
    kv_heads: u32,
    d: u32,
    causal: u32,
    splits: u32,
    split_len: u32,
    scale: f32,
    packed: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;           // [nq, heads, d] or partial [.., splits, d]
@group(0) @binding(5) var<storage, read_write> stats: array<vec2<f32>>;   // (m, l) per (row, head, split)
@group(0) @binding(9) var<storage, read> row_first: array<u32>;           // [nq] when packed, else unused

var<workgroup> q_tile: array<f32, 1024>;   // [GROUP][d], scaled: d <= 256
var<workgroup> scores: array<f32, 512>;    // [2][GROUP][WG]: two tiles' scores, alternately

// Per tile of WG keys: each invocation scores one key for the GROUP heads and writes the scores to
// workgroup memory; after one barrier every invocation walks the tile's scores in order, updating each
// head's running max, sum and the output dims it owns (the rescale is a branch every invocation takes
// alike). Scores alternate between two buffers, so a tile's writes never meet the previous tile's reads
// and one barrier per tile suffices: software adapters pay dearly for every barrier.
@compute @workgroup_size(WG)
fn attend(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
          @builtin(local_invocation_index) lane: u32) {
    let id = flat_workgroup(wg, groups);
    let head_groups = p.heads / GROUP;
    if id >= p.nq * head_groups * p.splits { return; }
    let split = id % p.splits;
    let row_group = id / p.splits;
    let h0 = (row_group % head_groups) * GROUP;
    let i = row_group / head_groups;
    let g = h0 / (p.heads / p.kv_heads);
    let visible = select(p.nk, p.nk - p.nq + i + 1u, p.causal == 1u);
    // This split's keys, then (packed) no earlier than the row's own sequence.
    var first = split * p.split_len;
    let end = min(first + p.split_len, visible);
    if p.packed == 1u {
        first = max(first, row_first[i]);
    }

    // The GROUP heads' query rows are contiguous in q.
    for (var c = lane; c < GROUP * p.d; c += WG) {
        q_tile[c] = q[(i * p.heads + h0) * p.d + c] * p.scale;
    }
    workgroupBarrier();

    var m: array<f32, 4>;            // [GROUP]
    var l: array<f32, 4>;
    var acc: array<f32, 16>;         // [GROUP][DIMS]
    for (var h = 0u; h < GROUP; h++) {
        m[h] = LOWEST;
    }
    var buffer = 0u;
    for (var t0 = first; t0 < end; t0 += WG) {
        let j = t0 + lane;
        var s = array<f32, 4>();     // [GROUP], zeroed explicitly (see routing.wgsl)
        if j < end {
            let key = (j * p.kv_heads + g) * p.d;
            for (var c = 0u; c < p.d; c++) {
                let kc = k[key + c];
                for (var h = 0u; h < GROUP; h++) {
                    s[h] += q_tile[h * p.d + c] * kc;
                }
            }
        }
        for (var h = 0u; h < GROUP; h++) {
            scores[(buffer * GROUP + h) * WG + lane] = s[h];
        }
        workgroupBarrier();
        let count = min(WG, end - t0);
        for (var jj = 0u; jj < count; jj++) {
            // Dims past d read the last one; they are not stored.
            let value = ((t0 + jj) * p.kv_heads + g) * p.d;
            var vd = array<f32, 4>();   // [DIMS]
            for (var c = 0u; c < DIMS; c++) {
                vd[c] = v[value + min(lane + c * WG, p.d - 1u)];
            }
            for (var h = 0u; h < GROUP; h++) {
                let score = scores[(buffer * GROUP + h) * WG + jj];
                if score > m[h] {
                    let correction = exp(m[h] - score);
                    l[h] *= correction;
                    for (var c = 0u; c < DIMS; c++) {
                        acc[h * DIMS + c] *= correction;
                    }
                    m[h] = score;
                }
                let prob = exp(score - m[h]);
                l[h] += prob;
                for (var c = 0u; c < DIMS; c++) {
                    acc[h * DIMS + c] += prob * vd[c];
                }
            }
        }
        buffer ^= 1u;
    }

    for (var h = 0u; h < GROUP; h++) {
        let row_head = i * p.heads + h0 + h;
        let part = row_head * p.splits + split;
        for (var c = 0u; c < DIMS; c++) {
            let dim = lane + c * WG;
            if dim < p.d {
                if p.splits == 1u {
                    out[row_head * p.d + dim] = acc[h * DIMS + c] / l[h];
                } else {
                    out[part * p.d + dim] = acc[h * DIMS + c];
                }
            }
        }
        if p.splits > 1u && lane == 0u {
            stats[part] = vec2<f32>(m[h], l[h]);
        }
    }
}

@group(0) @binding(6) var<storage, read> partial: array<f32>;
@group(0) @binding(7) var<storage, read> partial_stats: array<vec2<f32>>;
@group(0) @binding(8) var<storage, read_write> merged: array<f32>;

// One invocation per output element: rescale every split to the global max and normalise once.
@compute @workgroup_size(64)
fn combine(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
           @builtin(local_invocation_index) lane: u32) {
    let e = flat_workgroup(wg, groups) * 64u + lane;
    if e >= p.nq * p.heads * p.d { return; }
    let row_head = e / p.d;
    let dim = e % p.d;
    var m = LOWEST;
    for (var s = 0u; s < p.splits; s++) {
        m = max(m, partial_stats[row_head * p.splits + s].x);
    }
    var l = 0.0;
    var a = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        let part = row_head * p.splits + s;
        let weight = exp(partial_stats[part].x - m);
        l += partial_stats[part].y * weight;
        a += partial[part * p.d + dim] * weight;
    }
    merged[e] = a / l;
}

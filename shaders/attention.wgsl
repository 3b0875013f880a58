// Softmax attention with GQA, flash style: keys are visited in tiles of WG with an online softmax (running
// max m, running sum l, rescaled accumulator), so no [queries × keys] matrix exists anywhere.
// q [nq, heads, d], k/v [nk, kv_heads, d]; the causal mask is bottom-right aligned (query i sees keys
// 0..=nk - nq + i: the whole prefix, then the query block causally). Packed (block-diagonal causal,
// several sequences in one block, nq == nk): query i also starts at `row_first[i]`, its sequence's start.
//
// `attend`: one workgroup per (query row, head, split). With one split it writes the normalised output;
// with several (split-KV, for decode where rows × heads alone cannot fill a GPU) it writes the unnormalised
// accumulator and (m, l) of its key range, and `combine` merges the splits.

const WG: u32 = 64u;
const DIMS: u32 = 4u;          // head_dim <= WG * DIMS
const MAX_HEAD_DIM: u32 = 256u;

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

var<workgroup> q_tile: array<f32, MAX_HEAD_DIM>;
var<workgroup> scores: array<f32, WG>;
var<workgroup> probs: array<f32, WG>;

// Per tile of WG keys: each invocation scores one key; after a barrier every invocation takes the tile's
// max from workgroup memory and turns its own score into a probability; after a second barrier every
// invocation updates the output dims it owns from all the tile's probabilities. Two barriers per tile
// and no reduction trees: software adapters pay dearly for every barrier. The next tile writes `scores`
// only after everyone has read them (before the second barrier) and `probs` only after its own first
// barrier, so no third barrier is needed.
@compute @workgroup_size(WG)
fn attend(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
          @builtin(local_invocation_index) lane: u32) {
    let id = flat_workgroup(wg, groups);
    if id >= p.nq * p.heads * p.splits { return; }
    let split = id % p.splits;
    let row_head = id / p.splits;
    let h = row_head % p.heads;
    let i = row_head / p.heads;
    let g = h / (p.heads / p.kv_heads);
    let visible = select(p.nk, p.nk - p.nq + i + 1u, p.causal == 1u);
    // This split's keys, then (packed) no earlier than the row's own sequence.
    var first = split * p.split_len;
    let end = min(first + p.split_len, visible);
    if p.packed == 1u {
        first = max(first, row_first[i]);
    }

    for (var c = lane; c < p.d; c += WG) {
        q_tile[c] = q[row_head * p.d + c] * p.scale;
    }
    workgroupBarrier();

    var m = LOWEST;
    var l = 0.0;
    var acc: array<f32, DIMS>;
    for (var t0 = first; t0 < end; t0 += WG) {
        let j = t0 + lane;
        var score = LOWEST;
        if j < end {
            let key = (j * p.kv_heads + g) * p.d;
            var s = 0.0;
            for (var c = 0u; c < p.d; c++) {
                s += q_tile[c] * k[key + c];
            }
            score = s;
        }
        scores[lane] = score;
        workgroupBarrier();
        let count = min(WG, end - t0);
        var m_new = m;
        for (var jj = 0u; jj < count; jj++) {
            m_new = max(m_new, scores[jj]);
        }
        probs[lane] = select(0.0, exp(score - m_new), j < end);
        workgroupBarrier();
        let correction = exp(m - m_new);
        for (var c = 0u; c < DIMS; c++) {
            acc[c] *= correction;
        }
        var tile_sum = 0.0;
        for (var jj = 0u; jj < count; jj++) {
            let prob = probs[jj];
            tile_sum += prob;
            let value = ((t0 + jj) * p.kv_heads + g) * p.d;
            for (var c = 0u; c < DIMS; c++) {
                let dim = lane + c * WG;
                if dim < p.d {
                    acc[c] += prob * v[value + dim];
                }
            }
        }
        l = l * correction + tile_sum;
        m = m_new;
    }

    for (var c = 0u; c < DIMS; c++) {
        let dim = lane + c * WG;
        if dim < p.d {
            if p.splits == 1u {
                out[row_head * p.d + dim] = acc[c] / l;
            } else {
                out[id * p.d + dim] = acc[c];
            }
        }
    }
    if p.splits > 1u && lane == 0u {
        stats[id] = vec2<f32>(m, l);
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

// Softmax attention with GQA, flash style: keys are visited in tiles of WG × KEYS with an online softmax
// (running max m, running sum l, rescaled accumulator), so no [queries × keys] matrix exists anywhere.
// q [nq, heads, d], k/v [nk, kv_heads, d]; the causal mask is bottom-right aligned (query i sees keys
// 0..=nk - nq + i: the whole prefix, then the query block causally). Packed (block-diagonal causal,
// several sequences in one block, nq == nk): query i also starts at `row_first[i]`, its sequence's start.
//
// `attend`: one workgroup per (query row, GROUP query heads sharing a KV head, split), so each key and
// value is read once for the GROUP heads. With one split it writes the normalised output; with several
// (split-KV, for decode where rows × heads alone cannot fill a GPU) it writes the unnormalised
// accumulator and (m, l) of its key range per head, and `combine` merges the splits.

const WG: u32 = 64u;

override GROUP: u32 = 1u;         // query heads per workgroup: 1, 2 or 4, dividing heads / kv_heads
override KEYS: u32 = 1u;          // keys an invocation scores per tile: 1, 2 or 4
override WORDS: u32 = 1u;         // 16-byte words of the output dims an invocation owns: 1 or 2
override VECTORS: bool = false;   // d % 4 == 0: rows of k and v start on 16-byte words

const TILE: u32 = 256u;           // WG × the largest KEYS

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
@group(0) @binding(2) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;           // [nq, heads, d] or partial [.., splits, d]
@group(0) @binding(5) var<storage, read_write> stats: array<vec2<f32>>;   // (m, l) per (row, head, split)
@group(0) @binding(9) var<storage, read> row_first: array<u32>;           // [nq] when packed, else unused

// Per-head values travel as vec4s, one component per head of the GROUP (at most 4): a key's scores, its
// probabilities, the running max and sum. An output word's accumulators are a mat4x4, a column per head.
var<workgroup> q_tile: array<vec4<f32>, 256>;   // [GROUP][words of d], scaled, zero past d: d <= 256
var<workgroup> scores: array<vec4<f32>, WG>;    // per subgroup, its keys' max score (then the streams' sums)
var<workgroup> probs: array<vec4<f32>, TILE>;   // per key of the tile, exp(score - running max)
var<workgroup> tile_max: vec4<f32>;

// Elements c..c+3 of the key (or value) row starting at element `row`; zeros past d.
fn row_word(values: bool, row: u32, c: u32) -> vec4<f32> {
    if VECTORS {
        if values {
            return v[(row + c) >> 2u];
        }
        return k[(row + c) >> 2u];
    }
    var word = vec4<f32>();
    for (var i = 0u; i < 4u && c + i < p.d; i++) {
        let e = row + c + i;
        if values {
            word[i] = v[e >> 2u][e & 3u];
        } else {
            word[i] = k[e >> 2u][e & 3u];
        }
    }
    return word;
}

// Scores of key word `kc` for the GROUP heads, whose query words are `qw` (columns past GROUP zero).
fn head_dots(qw: mat4x4<f32>, kc: vec4<f32>) -> vec4<f32> {
    return kc * qw;
}

// `acc` with column h scaled by `c[h]`.
fn scale_columns(acc: mat4x4<f32>, c: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(acc[0] * c.x, acc[1] * c.y, acc[2] * c.z, acc[3] * c.w);
}

// Column h: `value` weighted by head h's probability.
fn outer(value: vec4<f32>, prob: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(value * prob.x, value * prob.y, value * prob.z, value * prob.w);
}

// Row (element index of k or v) of the tile's key `key`, clamped into the keys to visit: a clamped
// key repeats the last key's scores, harmless to the tile's max, and its probability is never read;
// no bounds branch needed.
fn key_row(key: u32, last: u32, g: u32) -> u32 {
    return (min(key, last) * p.kv_heads + g) * p.d;
}

// Per tile of WG × KEYS keys, in four phases split by three barriers: each invocation scores its KEYS
// keys for the GROUP heads (each query word loaded once for all of them) and posts their max; one
// invocation takes the tile's max; every invocation rescales its accumulators once and turns its keys'
// scores into probabilities; then each invocation owning WORDS 16-byte words of the output dims walks
// the tile's keys. Nothing is loaded once per invocation that one invocation could load for all:
// software adapters run every invocation's loads on the CPU, each costing dozens of FMAs, so their
// variant (KEYS 4, WORDS 2) loads each query word once per 4 keys and each probability once per 8 dims.
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

    // The GROUP heads' query rows (contiguous in q), a word per invocation.
    let words = (p.d + 3u) / 4u;
    for (var w = lane; w < GROUP * words; w += WG) {
        let head_row = (i * p.heads + h0 + w / words) * p.d;
        let c = 4u * (w % words);
        var word = vec4<f32>();
        for (var e = 0u; e < 4u && c + e < p.d; e++) {
            word[e] = q[head_row + c + e] * p.scale;
        }
        q_tile[w] = word;
    }
    workgroupBarrier();

    let tile = WG * KEYS;
    // Output words are grouped WORDS to an invocation; the WG invocations form `streams` copies of the
    // groups, stream r taking keys r, r + streams, ... of each tile, so (nearly) every invocation has
    // work (a software adapter runs idle invocations as slowly as busy ones). The streams are summed
    // at the end.
    let word_groups = (words + WORDS - 1u) / WORDS;
    let streams = WG / word_groups;
    let stream = lane / word_groups;
    let w0 = (lane % word_groups) * WORDS;   // this invocation's first output word
    var m = vec4<f32>(LOWEST);
    var l = vec4<f32>();
    var acc0 = mat4x4<f32>();        // output word w0, a column per head
    var acc1 = mat4x4<f32>();        // w0 + 1 (WORDS 2, where d has that word)
    let second = WORDS > 1u && w0 + 1u < words;
    for (var t0 = first; t0 < end; t0 += tile) {
        let count = min(tile, end - t0);
        // Keys t0 + lane + r·WG, r < KEYS.
        var s0 = vec4<f32>();
        var s1 = vec4<f32>();
        var s2 = vec4<f32>();
        var s3 = vec4<f32>();
        for (var c = 0u; c < p.d; c += 4u) {
            let w = c / 4u;
            var qw = mat4x4<f32>();
            qw[0] = q_tile[w];
            if GROUP > 1u {
                qw[1] = q_tile[words + w];
            }
            if GROUP > 2u {
                qw[2] = q_tile[2u * words + w];
                qw[3] = q_tile[3u * words + w];
            }
            s0 += head_dots(qw, row_word(false, key_row(t0 + lane, end - 1u, g), c));
            if KEYS > 1u {
                s1 += head_dots(qw, row_word(false, key_row(t0 + lane + WG, end - 1u, g), c));
            }
            if KEYS > 2u {
                s2 += head_dots(qw, row_word(false, key_row(t0 + lane + 2u * WG, end - 1u, g), c));
                s3 += head_dots(qw, row_word(false, key_row(t0 + lane + 3u * WG, end - 1u, g), c));
            }
        }
        // Clamped keys repeat the last key's scores, so they leave the max alone.
        var top = s0;
        if KEYS > 1u {
            top = max(top, s1);
        }
        if KEYS > 2u {
            top = max(top, max(s2, s3));
        }
        // The tile's max: within subgroups in registers, then over the WG / SUBGROUP subgroups by one
        // invocation (serially: a software adapter runs a barrier-free loop faster than a tree).
        top = span_max4(top, SUBGROUP);
        if lane % SUBGROUP == 0u {
            scores[lane / SUBGROUP] = top;
        }
        workgroupBarrier();
        if lane == 0u {
            for (var jj = 1u; jj < WG / SUBGROUP; jj++) {
                top = max(top, scores[jj]);
            }
            tile_max = top;
        }
        workgroupBarrier();
        let m_new = max(m, tile_max);
        let correction = exp(m - m_new);
        m = m_new;
        l *= correction;
        acc0 = scale_columns(acc0, correction);
        acc1 = scale_columns(acc1, correction);
        probs[lane] = exp(s0 - m);
        if KEYS > 1u {
            probs[lane + WG] = exp(s1 - m);
        }
        if KEYS > 2u {
            probs[lane + 2u * WG] = exp(s2 - m);
            probs[lane + 3u * WG] = exp(s3 - m);
        }
        workgroupBarrier();
        if stream < streams {
            for (var jj = stream; jj < count; jj += streams) {
                let prob = probs[jj];
                l += prob;
                let row = ((t0 + jj) * p.kv_heads + g) * p.d;
                acc0 += outer(row_word(true, row, 4u * w0), prob);
                if second {
                    acc1 += outer(row_word(true, row, 4u * w0 + 4u), prob);
                }
            }
        }
    }

    // The streams fold in halves (log2(streams) rounds, not streams - 1): while more than one remains,
    // each stream s of the upper half hands its accumulators and its sum to stream s - half, at that
    // stream's slots: probs[4·WORDS·((s - half)·word_groups + group) + 4·word + head] and
    // scores[s - half].
    let group = lane % word_groups;
    var remaining = streams;
    loop {
        if remaining <= 1u {
            break;
        }
        let half = (remaining + 1u) / 2u;
        workgroupBarrier();
        if stream >= half && stream < remaining {
            let slot = 4u * WORDS * ((stream - half) * word_groups + group);
            for (var h = 0u; h < 4u; h++) {
                probs[slot + h] = acc0[h];
                if WORDS > 1u {
                    probs[slot + 4u + h] = acc1[h];
                }
            }
            if group == 0u {
                scores[stream - half] = l;
            }
        }
        workgroupBarrier();
        if stream < remaining - half {
            let slot = 4u * WORDS * (stream * word_groups + group);
            acc0 += mat4x4<f32>(probs[slot], probs[slot + 1u], probs[slot + 2u], probs[slot + 3u]);
            if WORDS > 1u {
                acc1 += mat4x4<f32>(probs[slot + 4u], probs[slot + 5u], probs[slot + 6u], probs[slot + 7u]);
            }
            l += scores[stream];
        }
        remaining = half;
    }

    if stream != 0u { return; }
    for (var h = 0u; h < GROUP; h++) {
        let row_head = i * p.heads + h0 + h;
        let part = row_head * p.splits + split;
        for (var e = 0u; e < 4u * WORDS; e++) {
            let dim = 4u * w0 + e;
            let value = select(acc0[h][e & 3u], acc1[h][e & 3u], e >= 4u);
            if dim < p.d {
                if p.splits == 1u {
                    out[row_head * p.d + dim] = value / l[h];
                } else {
                    out[part * p.d + dim] = value;
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

// Routing scores (MSA-SPEC §3.3 a), fused: no [heads × tokens × chunks] tensor is ever written.
//
// `score_chunks`: one invocation per pooled chunk. The routing query q [tokens, heads, d] (already
// L2-normalised per head in cosine mode) is scored against the chunk's routing keys [kv_heads, d]
// (query head h reads KV head h / group), reduced over heads (mean or max), then over routing tokens
// (max or mean). The keys are packed in their stored dtype (DTYPE: f32, bf16 or f16) and widened exactly.
// They may be a window of a larger buffer: this dispatch scores chunks [chunk_start, chunk_start + chunks),
// reading them from element `key_base` of the window (windows start on a word, so parity is kept).
//
// `score_documents`: one invocation per document, reducing its contiguous chunk range (max or mean).
//
// `sum_groups` prepares the head mean: (1/H) Σ_h <q_h, k_{h/group}> = (1/H) Σ_g <Σ_{h in g} q_h, k_g>, so
// the query heads sharing a KV head are summed once and each key is read with one dot per KV head.

struct Params {
    chunks: u32,
    chunk_start: u32,
    key_base: u32,    // in elements of the stored dtype
    tokens: u32,
    q_heads: u32,     // query heads in q (the KV heads after sum_groups)
    kv_heads: u32,
    d: u32,
    head_mean: u32,
    query_mean: u32,
    chunk_mean: u32,
    documents: u32,
    scale: f32,
    inv_heads: f32,   // 1 / the model's query heads, for the head mean
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> keys: array<u32>;   // packed, DTYPE
@group(0) @binding(3) var<storage, read_write> chunk_scores: array<f32>;

@compute @workgroup_size(64)
fn score_chunks(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                @builtin(local_invocation_index) lane: u32) {
    let c = flat_workgroup(wg, groups) * 64u + lane;
    if c >= p.chunks { return; }
    let group = p.q_heads / p.kv_heads;
    let key = p.key_base + c * p.kv_heads * p.d;
    var token_acc = select(LOWEST, 0.0, p.query_mean == 1u);
    for (var t = 0u; t < p.tokens; t++) {
        var head_acc = select(LOWEST, 0.0, p.head_mean == 1u);
        for (var h = 0u; h < p.q_heads; h++) {
            let kh = key + (h / group) * p.d;
            let qh = (t * p.q_heads + h) * p.d;
            var s = 0.0;
            var i = 0u;
            if DTYPE != 0u && (kh & 1u) == 0u {
                // Packed pairs: one load for two keys.
                for (; i + 1u < p.d; i += 2u) {
                    let word = keys[(kh + i) >> 1u];
                    s += q[qh + i] * widen(word, 0u) + q[qh + i + 1u] * widen(word, 1u);
                }
            }
            for (; i < p.d; i++) {
                let ki = kh + i;
                s += q[qh + i] * widen(keys[word_of(ki)], ki);
            }
            s *= p.scale;
            head_acc = select(max(head_acc, s), head_acc + s, p.head_mean == 1u);
        }
        if p.head_mean == 1u {
            head_acc *= p.inv_heads;
        }
        token_acc = select(max(token_acc, head_acc), token_acc + head_acc, p.query_mean == 1u);
    }
    if p.query_mean == 1u {
        token_acc /= f32(p.tokens);
    }
    chunk_scores[p.chunk_start + c] = token_acc;
}

@group(0) @binding(4) var<storage, read> all_chunk_scores: array<f32>;
@group(0) @binding(5) var<storage, read> doc_chunk_offsets: array<u32>;   // [documents + 1]
@group(0) @binding(6) var<storage, read_write> doc_scores: array<f32>;

@compute @workgroup_size(64)
fn score_documents(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                   @builtin(local_invocation_index) lane: u32) {
    let doc = flat_workgroup(wg, groups) * 64u + lane;
    if doc >= p.documents { return; }
    let first = doc_chunk_offsets[doc];
    let end = doc_chunk_offsets[doc + 1u];
    var acc = select(LOWEST, 0.0, p.chunk_mean == 1u);
    for (var c = first; c < end; c++) {
        let s = all_chunk_scores[c];
        acc = select(max(acc, s), acc + s, p.chunk_mean == 1u);
    }
    if p.chunk_mean == 1u {
        acc /= f32(end - first);
    }
    doc_scores[doc] = acc;
}

@group(0) @binding(7) var<storage, read_write> summed: array<f32>;   // [tokens, kv_heads, d]

// One invocation per element of the summed query; `q_heads` is the model's query heads here.
@compute @workgroup_size(64)
fn sum_groups(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
              @builtin(local_invocation_index) lane: u32) {
    let e = flat_workgroup(wg, groups) * 64u + lane;
    if e >= p.tokens * p.kv_heads * p.d { return; }
    let group = p.q_heads / p.kv_heads;
    let i = e % p.d;
    let tg = e / p.d;               // t * kv_heads + g
    let first = tg * group * p.d;   // q[t, g * group, 0]
    var sum = 0.0;
    for (var j = 0u; j < group; j++) {
        sum += q[first + j * p.d + i];
    }
    summed[e] = sum;
}

// Routing scores (MSA-SPEC §3.3 a), fused: no [heads × tokens × chunks] tensor is ever written.
//
// `score_chunks`: CHUNKS pooled chunks per invocation (see `Variants`). The routing query q [tokens, heads, d] (already
// L2-normalised per head in cosine mode) is scored against the chunk's routing keys [kv_heads, d]
// (query head h reads KV head h / group), reduced over heads (mean or max), then over routing tokens
// (max or mean). The keys are packed in their stored dtype (DTYPE: f32, bf16 or f16) and widened exactly.
// They may be a window of a larger buffer: this dispatch scores chunks [chunk_start, chunk_start + chunks),
// reading them from element `key_base` of the window (windows start on a 16-byte word, so parity is kept).
// Each key is loaded once per TOKENS query tokens (register tiling: a longer query costs FMAs, not
// reads), in 16-byte words when `vectors` says every head's keys start on one (d and key_base multiples
// of a word's elements); otherwise a word at a time.
//
// `score_documents`: one invocation per document, reducing its contiguous chunk range (max or mean).
//
// `sum_groups` prepares the head mean: (1/H) Σ_h <q_h, k_{h/group}> = (1/H) Σ_g <Σ_{h in g} q_h, k_g>, so
// the query heads sharing a KV head are summed once and each key is read with one dot per KV head.

override TOKENS: u32 = 1u;   // query tokens per pass over the keys: 1, 2, 4 or 8
override CHUNKS: u32 = 1u;   // chunks per invocation: 1, 2, 4 or 8; CHUNKS × TOKENS <= 16

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
    vectors: u32,     // 1: 16-byte key loads (see above)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> keys: array<vec4<u32>>;   // packed, DTYPE
@group(0) @binding(3) var<storage, read_write> chunk_scores: array<f32>;

fn q_at(i: u32) -> f32 {
    return q[i >> 2u][i & 3u];
}

fn key_word(i: u32) -> u32 {
    return keys[i >> 2u][i & 3u];
}

@compute @workgroup_size(64)
fn score_chunks(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                @builtin(local_invocation_index) lane: u32) {
    let first = (flat_workgroup(wg, groups) * 64u + lane) * CHUNKS;
    if first >= p.chunks { return; }
    let group = p.q_heads / p.kv_heads;
    // Chunks past the last repeat it and rows past the last token repeat it; neither is counted.
    var key: array<u32, 8>;   // [CHUNKS]
    var token_acc: array<f32, 8>;   // [CHUNKS]
    for (var c = 0u; c < CHUNKS; c++) {
        key[c] = p.key_base + min(first + c, p.chunks - 1u) * p.kv_heads * p.d;
        token_acc[c] = select(LOWEST, 0.0, p.query_mean == 1u);
    }
    for (var t0 = 0u; t0 < p.tokens; t0 += TOKENS) {
        var q_row = array<u32, 8>();   // [TOKENS]
        for (var t = 0u; t < TOKENS; t++) {
            q_row[t] = min(t0 + t, p.tokens - 1u) * p.q_heads * p.d;
        }
        var head_acc = array<f32, 16>();   // [CHUNKS × TOKENS]
        for (var ct = 0u; ct < CHUNKS * TOKENS; ct++) {
            head_acc[ct] = select(LOWEST, 0.0, p.head_mean == 1u);
        }
        for (var h = 0u; h < p.q_heads; h++) {
            let kh = (h / group) * p.d;
            let qh = h * p.d;
            // [CHUNKS × TOKENS], zeroed explicitly: Chromium's WebGPU on SwiftShader kept the
            // previous head's sums in a loop-body `var` declared without an initializer.
            var s = array<f32, 16>();
            if p.vectors == 1u {
                for (var i = 0u; i < p.d; i += per_vector()) {
                    var q_lo = array<vec4<f32>, 8>();   // [TOKENS]
                    var q_hi = array<vec4<f32>, 8>();
                    for (var t = 0u; t < TOKENS; t++) {
                        let qi = (q_row[t] + qh + i) >> 2u;
                        q_lo[t] = q[qi];
                        if DTYPE != 0u {
                            q_hi[t] = q[qi + 1u];
                        }
                    }
                    for (var c = 0u; c < CHUNKS; c++) {
                        let word = keys[(key[c] + kh + i) / per_vector()];
                        let lo = widen4(word, 0u);
                        let hi = widen4(word, 1u);
                        for (var t = 0u; t < TOKENS; t++) {
                            var dot_t = dot(q_lo[t], lo);
                            if DTYPE != 0u {
                                dot_t += dot(q_hi[t], hi);
                            }
                            s[c * TOKENS + t] += dot_t;
                        }
                    }
                }
            } else {
                for (var i = 0u; i < p.d; i++) {
                    var q_i = array<f32, 8>();   // [TOKENS]
                    for (var t = 0u; t < TOKENS; t++) {
                        q_i[t] = q_at(q_row[t] + qh + i);
                    }
                    for (var c = 0u; c < CHUNKS; c++) {
                        let ki = key[c] + kh + i;
                        let k = widen(key_word(word_of(ki)), ki);
                        for (var t = 0u; t < TOKENS; t++) {
                            s[c * TOKENS + t] += q_i[t] * k;
                        }
                    }
                }
            }
            for (var ct = 0u; ct < CHUNKS * TOKENS; ct++) {
                let v = s[ct] * p.scale;
                head_acc[ct] = select(max(head_acc[ct], v), head_acc[ct] + v, p.head_mean == 1u);
            }
        }
        for (var c = 0u; c < CHUNKS; c++) {
            for (var t = 0u; t < min(TOKENS, p.tokens - t0); t++) {
                var v = head_acc[c * TOKENS + t];
                if p.head_mean == 1u {
                    v *= p.inv_heads;
                }
                token_acc[c] = select(max(token_acc[c], v), token_acc[c] + v, p.query_mean == 1u);
            }
        }
    }
    for (var c = 0u; c < CHUNKS; c++) {
        if first + c < p.chunks {
            var v = token_acc[c];
            if p.query_mean == 1u {
                v /= f32(p.tokens);
            }
            chunk_scores[p.chunk_start + first + c] = v;
        }
    }
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
        sum += q_at(first + j * p.d + i);
    }
    summed[e] = sum;
}

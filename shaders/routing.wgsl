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

override TOKENS: u32 = 1u;   // query tokens per pass over the keys: 1, 2 or 4
override CHUNKS: u32 = 1u;   // chunks per invocation: 1, 2, 4 or 8

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

// An invocation's sums live in two mat4x4s, a column per chunk (chunks 0-3, then 4-7) and a component
// per token of the pass, named rather than in arrays indexed in loops: lavapipe keeps such arrays in
// memory, where every access costs dozens of FMAs.

// Query values i..i+7 (`lo`, `hi`; `hi` zero for f32 keys, whose 16-byte word holds 4) of the head row
// starting at element `i`: 16-byte words.
fn query_words(i: u32) -> mat2x4<f32> {
    var hi = vec4<f32>(0.0);
    if DTYPE != 0u {
        hi = q[(i >> 2u) + 1u];
    }
    return mat2x4<f32>(q[i >> 2u], hi);
}

// A chunk's key word (`lo`, `hi`: its elements i..i+7, or i..i+3 for f32 keys) against the pass's
// query words (`q_lo`, `q_hi`, a column per token): a dot per token.
fn token_dots(lo: vec4<f32>, hi: vec4<f32>, q_lo: mat4x4<f32>, q_hi: mat4x4<f32>) -> vec4<f32> {
    if TOKENS == 1u {
        var one = dot(lo, q_lo[0]);
        if DTYPE != 0u {
            one += dot(hi, q_hi[0]);
        }
        return vec4<f32>(one, 0.0, 0.0, 0.0);
    }
    var dots = lo * q_lo;
    if DTYPE != 0u {
        dots += hi * q_hi;
    }
    return dots;
}

// The token dots of the key word at element `i` of a chunk's head row starting at element `key`.
fn chunk_dots(key: u32, i: u32, q_lo: mat4x4<f32>, q_hi: mat4x4<f32>) -> vec4<f32> {
    let word = keys[(key + i) / per_vector()];
    return token_dots(widen4(word, 0u), widen4(word, 1u), q_lo, q_hi);
}

// The head reduction of a pass's scores: running max or sum, column by column.
fn reduce_heads(acc: mat4x4<f32>, s: mat4x4<f32>) -> mat4x4<f32> {
    if p.head_mean == 1u {
        return acc + s;
    }
    return mat4x4<f32>(max(acc[0], s[0]), max(acc[1], s[1]), max(acc[2], s[2]), max(acc[3], s[3]));
}

@compute @workgroup_size(64)
fn score_chunks(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                @builtin(local_invocation_index) lane: u32) {
    let first = (flat_workgroup(wg, groups) * 64u + lane) * CHUNKS;
    if first >= p.chunks { return; }
    let group = p.q_heads / p.kv_heads;
    // Chunks past the last repeat it and rows past the last token repeat it; neither is counted.
    let chunk = vec4<u32>(0u, 1u, 2u, 3u);
    let row = p.kv_heads * p.d;
    let keys_lo = vec4<u32>(p.key_base) + min(vec4<u32>(first) + chunk, vec4<u32>(p.chunks - 1u)) * row;
    let keys_hi = vec4<u32>(p.key_base) + min(vec4<u32>(first + 4u) + chunk, vec4<u32>(p.chunks - 1u)) * row;
    var token_acc: array<f32, 8>;   // [CHUNKS]: the token reduction, once per pass
    for (var c = 0u; c < CHUNKS; c++) {
        token_acc[c] = select(LOWEST, 0.0, p.query_mean == 1u);
    }
    for (var t0 = 0u; t0 < p.tokens; t0 += TOKENS) {
        let q_rows = min(vec4<u32>(t0) + chunk, vec4<u32>(p.tokens - 1u)) * p.q_heads * p.d;
        let start = select(LOWEST, 0.0, p.head_mean == 1u);
        var head_lo = mat4x4<f32>(vec4<f32>(start), vec4<f32>(start), vec4<f32>(start), vec4<f32>(start));
        var head_hi = head_lo;
        for (var h = 0u; h < p.q_heads; h++) {
            let kh = (h / group) * p.d;
            let qh = h * p.d;
            // Zeroed explicitly: Chromium's WebGPU on SwiftShader kept the previous head's sums in a
            // loop-body `var` declared without an initializer.
            var s_lo = mat4x4<f32>();
            var s_hi = mat4x4<f32>();
            if p.vectors == 1u {
                for (var i = 0u; i < p.d; i += per_vector()) {
                    let q0 = query_words(q_rows[0] + qh + i);
                    var q1 = mat2x4<f32>();
                    var q2 = mat2x4<f32>();
                    var q3 = mat2x4<f32>();
                    if TOKENS > 1u {
                        q1 = query_words(q_rows[1] + qh + i);
                    }
                    if TOKENS > 2u {
                        q2 = query_words(q_rows[2] + qh + i);
                        q3 = query_words(q_rows[3] + qh + i);
                    }
                    let q_lo = mat4x4<f32>(q0[0], q1[0], q2[0], q3[0]);
                    let q_hi = mat4x4<f32>(q0[1], q1[1], q2[1], q3[1]);
                    s_lo[0] += chunk_dots(keys_lo[0] + kh, i, q_lo, q_hi);
                    if CHUNKS > 1u {
                        s_lo[1] += chunk_dots(keys_lo[1] + kh, i, q_lo, q_hi);
                    }
                    if CHUNKS > 2u {
                        s_lo[2] += chunk_dots(keys_lo[2] + kh, i, q_lo, q_hi);
                        s_lo[3] += chunk_dots(keys_lo[3] + kh, i, q_lo, q_hi);
                    }
                    if CHUNKS > 4u {
                        s_hi[0] += chunk_dots(keys_hi[0] + kh, i, q_lo, q_hi);
                        s_hi[1] += chunk_dots(keys_hi[1] + kh, i, q_lo, q_hi);
                        s_hi[2] += chunk_dots(keys_hi[2] + kh, i, q_lo, q_hi);
                        s_hi[3] += chunk_dots(keys_hi[3] + kh, i, q_lo, q_hi);
                    }
                }
            } else {
                for (var i = 0u; i < p.d; i++) {
                    var q_i = vec4<f32>(0.0);
                    for (var t = 0u; t < TOKENS; t++) {
                        q_i[t] = q_at(q_rows[t] + qh + i);
                    }
                    for (var c = 0u; c < CHUNKS; c++) {
                        let ki = select(keys_lo[c & 3u], keys_hi[c & 3u], c >= 4u) + kh + i;
                        let k = widen(key_word(word_of(ki)), ki);
                        if c < 4u {
                            s_lo[c] += q_i * k;
                        } else {
                            s_hi[c - 4u] += q_i * k;
                        }
                    }
                }
            }
            head_lo = reduce_heads(head_lo, s_lo * p.scale);
            head_hi = reduce_heads(head_hi, s_hi * p.scale);
        }
        for (var c = 0u; c < CHUNKS; c++) {
            let heads = select(head_lo[c & 3u], head_hi[c & 3u], c >= 4u);
            for (var t = 0u; t < min(TOKENS, p.tokens - t0); t++) {
                var v = heads[t];
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

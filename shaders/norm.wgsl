// Row norms over the last dimension, one workgroup per row:
// MODE 0: RMSNorm, w * x / sqrt(mean(x²) + eps) (per row for the hidden state, per head for q/k norm);
// MODE 1: L2 normalisation, x / max(‖x‖₂, 1e-12) (cosine routing); the weight binding is then unused.
// MODE 2: RMSNorm then NeoX RoPE, per head (q_norm/k_norm and the rotation in one dispatch): rows are
//         [n, heads] head rows of width d, and `cos_sin` holds rope.wgsl's table for the n positions.

override MODE: u32 = 0u;
const WG: u32 = 64u;

struct Params {
    rows: u32,
    width: u32,
    eps: f32,
    heads: u32,   // MODE 2
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> cos_sin: array<vec2<f32>>;   // MODE 2: [n, width / 2]

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn norm(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let row = flat_workgroup(wg, groups);
    if row >= p.rows { return; }
    let base = row * p.width;
    var sum = 0.0;
    for (var i = lane; i < p.width; i += WG) {
        sum += x[base + i] * x[base + i];
    }
    // Summed within subgroups in registers, then over the WG / SUBGROUP subgroups in workgroup memory.
    let subgroup_sum = span_sum4(vec4<f32>(sum, 0.0, 0.0, 0.0), SUBGROUP).x;
    if lane % SUBGROUP == 0u {
        partial[lane / SUBGROUP] = subgroup_sum;
    }
    for (var stride = WG / SUBGROUP / 2u; stride > 0u; stride /= 2u) {
        workgroupBarrier();
        if lane < stride {
            partial[lane] += partial[lane + stride];
        }
    }
    workgroupBarrier();
    let total = partial[0];
    if MODE == 0u {
        let inv = 1.0 / sqrt(total / f32(p.width) + p.eps);
        for (var i = lane; i < p.width; i += WG) {
            y[base + i] = widen(w[word_of(i)], i) * (x[base + i] * inv);
        }
    } else if MODE == 2u {
        let inv = 1.0 / sqrt(total / f32(p.width) + p.eps);
        let half = p.width / 2u;
        let table = (row / p.heads) * half;
        for (var j = lane; j < half; j += WG) {
            let a = widen(w[word_of(j)], j) * (x[base + j] * inv);
            let b = widen(w[word_of(j + half)], j + half) * (x[base + j + half] * inv);
            let cs = cos_sin[table + j];
            y[base + j] = a * cs.x - b * cs.y;
            y[base + j + half] = b * cs.x + a * cs.y;
        }
    } else {
        let norm = max(sqrt(total), 1e-12);
        for (var i = lane; i < p.width; i += WG) {
            y[base + i] = x[base + i] / norm;
        }
    }
}

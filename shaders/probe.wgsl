// Roofline probes of the adapter (`msa bench --probe`): what the device can do, measured with the same
// machinery as the kernels, so every kernel's figure can be printed as a fraction of it.
//
// `read_rate`: a bandwidth-bound read. Invocation i sums vec4s i, i + stride, … (consecutive invocations read
// consecutive 16-byte words: coalesced on a GPU, vectorised on a CPU adapter) and writes one float.
// `fma`: peak f32 FMA rate. Each invocation runs four independent chains of vec4 FMAs (16 per iteration,
// 32 FLOPs), enough independent work to fill the pipelines, and writes their sum so nothing is dead.

struct Params {
    words: u32,        // vec4s in `src` (read)
    iterations: u32,   // loop trips (fma)
    invocations: u32,  // invocations in the grid
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> sink: array<f32>;

const WG: u32 = 256u;

@compute @workgroup_size(256)
fn read_rate(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
            @builtin(local_invocation_index) lane: u32) {
    let i = flat_workgroup(wg, groups) * WG + lane;
    if i >= p.invocations { return; }
    var acc = vec4<f32>(0.0);
    for (var w = i; w < p.words; w += p.invocations) {
        acc += src[w];
    }
    sink[i] = acc.x + acc.y + acc.z + acc.w;
}

@compute @workgroup_size(256)
fn fma_rate(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
            @builtin(local_invocation_index) lane: u32) {
    let i = flat_workgroup(wg, groups) * WG + lane;
    if i >= p.invocations { return; }
    let seed = f32(i) * 1e-7;
    var a = vec4<f32>(seed, seed + 0.1, seed + 0.2, seed + 0.3);
    var b = a + 0.01;
    var c = a + 0.02;
    var d = a + 0.03;
    let m = vec4<f32>(0.9999999);
    let k = vec4<f32>(1e-7);
    for (var n = 0u; n < p.iterations; n++) {
        a = fma(a, m, k);
        b = fma(b, m, k);
        c = fma(c, m, k);
        d = fma(d, m, k);
    }
    let s = a + b + c + d;
    sink[i] = s.x + s.y + s.z + s.w;
}

// The f16 FMA rate (`msa bench --probe`, adapters with `shader-f16` only; the device compiles this family
// behind `enable f16;`): fma_rate of probe.wgsl in vec4<f16>, four independent chains of vec4 FMAs per
// invocation (16 FMAs, 32 FLOPs per iteration), their sum written as f32 so nothing is dead.

struct Params {
    words: u32,
    iterations: u32,
    invocations: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read_write> sink: array<f32>;

@compute @workgroup_size(256)
fn fma_rate_f16(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                @builtin(local_invocation_index) lane: u32) {
    let i = flat_workgroup(wg, groups) * 256u + lane;
    if i >= p.invocations { return; }
    // Values stay near 0.1..0.4: m < 1 and k small keep every chain finite and normal in f16.
    let seed = f16(i & 1023u) * 1e-4h;
    var a = vec4<f16>(seed, seed + 0.1h, seed + 0.2h, seed + 0.3h);
    var b = a + 0.01h;
    var c = a + 0.02h;
    var d = a + 0.03h;
    let m = vec4<f16>(0.999h);
    let k = vec4<f16>(1e-4h);
    for (var n = 0u; n < p.iterations; n++) {
        a = fma(a, m, k);
        b = fma(b, m, k);
        c = fma(c, m, k);
        d = fma(d, m, k);
    }
    let s = vec4<f32>(a + b + c + d);
    sink[i] = s.x + s.y + s.z + s.w;
}

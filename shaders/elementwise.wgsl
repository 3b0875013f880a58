// Elementwise ops, one invocation per element: OP 0 = a + b (residual), OP 1 = silu(a) * b (SwiGLU).

override OP: u32 = 0u;

struct Params {
    elements: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn elementwise(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
               @builtin(local_invocation_index) lane: u32) {
    let e = flat_workgroup(wg, groups) * 64u + lane;
    if e >= p.elements { return; }
    if OP == 0u {
        y[e] = a[e] + b[e];
    } else {
        y[e] = silu(a[e]) * b[e];
    }
}

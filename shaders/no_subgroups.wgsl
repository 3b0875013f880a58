// Prepended to every kernel family on devices without subgroup operations: SUBGROUP is 1 there (see
// common.wgsl), every invocation is its own subgroup and nothing calls these.
fn exchange4(v: vec4<f32>, mask: u32) -> vec4<f32> {
    return v;
}

fn exchange4u(v: vec4<u32>, mask: u32) -> vec4<u32> {
    return v;
}

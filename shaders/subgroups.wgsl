// Prepended to every kernel family on devices whose reductions use subgroup operations (SUBGROUP > 1,
// see common.wgsl): the register exchange between invocations of one subgroup.
//
// Invocation `lane` trades `v` with invocation `lane ^ mask` of its subgroup. The device checks, when it
// opens, that subgroups are consecutive runs of local_invocation_index (WebGPU does not promise it), so
// that this is also `local_invocation_index ^ mask`.
fn exchange4(v: vec4<f32>, mask: u32) -> vec4<f32> {
    return subgroupShuffleXor(v, mask);
}

fn exchange4u(v: vec4<u32>, mask: u32) -> vec4<u32> {
    return subgroupShuffleXor(v, mask);
}

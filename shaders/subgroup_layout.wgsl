// Compiled only where the device has subgroup operations: when it opens, the device checks what the
// reductions assume (see SUBGROUP in common.wgsl) on one 64-wide workgroup. Each invocation writes its
// subgroup lane, its subgroup's size, and the sum of the local indices of its aligned run of SUBGROUP
// invocations as the reductions' register exchange computes it. Where subgroups are consecutive runs
// of local_invocation_index, the lane is the index modulo the size and the sum is that of the run.

struct Params {
    lanes: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read_write> lanes: array<vec4<u32>>;

@compute @workgroup_size(64)
fn subgroup_layout(@builtin(local_invocation_index) lane: u32,
                   @builtin(subgroup_invocation_id) subgroup_lane: u32,
                   @builtin(subgroup_size) size: u32) {
    let run_sum = span_sum4(vec4<f32>(f32(lane)), SUBGROUP).x;
    if lane < p.lanes {
        lanes[lane] = vec4<u32>(subgroup_lane, size, u32(run_sum), 0u);
    }
}

// Chunk-mean pooling: the mean of every `chunk` consecutive rows (the last group may be shorter), for the
// pooled K, V and routing keys of a document. One invocation per output element.

struct Params {
    elements: u32,   // chunks * width
    rows: u32,
    width: u32,
    chunk: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn pool(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let e = flat_workgroup(wg, groups) * 64u + lane;
    if e >= p.elements { return; }
    let c = e / p.width;
    let col = e % p.width;
    let first = c * p.chunk;
    let last = min(first + p.chunk, p.rows);
    var sum = 0.0;
    for (var r = first; r < last; r++) {
        sum += x[r * p.width + col];
    }
    y[e] = sum / f32(last - first);
}

// Row gather: the embedding lookup (packed weight rows, widened) and gather_rows (f32 rows).
// One invocation per output element. The source may be bound as a window of a larger buffer: only ids in
// [row_start, row_end) are written by this dispatch, read at `src_base + (id - row_start) * width`.

struct Params {
    elements: u32,   // ids * width
    width: u32,
    row_start: u32,
    row_end: u32,
    src_base: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> src: array<u32>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(64)
fn gather(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
          @builtin(local_invocation_index) lane: u32) {
    let e = flat_workgroup(wg, groups) * 64u + lane;
    if e >= p.elements { return; }
    let row = ids[e / p.width];
    if row < p.row_start || row >= p.row_end { return; }
    let i = p.src_base + (row - p.row_start) * p.width + e % p.width;
    dst[e] = widen(src[word_of(i)], i);
}

// Top-k selection on the device: highest score first, ties to the lower index, NaN ranked as -inf and
// -0.0 equal to 0.0 (the rule of the CPU reference's `select_top_k`).
//
// One workgroup per block of BLOCK candidates picks its k best; the host repeats the same kernel over
// the (blocks × k) survivors until one block remains. Each round r picks the best candidate strictly
// below the previous pick in the total order (score desc, index asc), so nothing needs marking.
// Input: raw f32 scores (index = position) or, after the first round, (raw score bits, index) pairs.

const WG: u32 = 64u;
const ITEMS: u32 = 16u;
const BLOCK: u32 = WG * ITEMS;
const INVALID: u32 = 0xffffffffu;

struct Params {
    count: u32,    // candidates in the input
    k: u32,
    pairs: u32,    // 1: input is (raw, index) pairs; 0: raw scores
    blocks: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec2<u32>>;   // [blocks * k] (raw, index)

var<workgroup> best_key: array<u32, WG>;
var<workgroup> best_raw: array<u32, WG>;
var<workgroup> best_index: array<u32, WG>;

// Maps a score to a u32 whose unsigned order is the score order.
fn order_key(raw: u32, index: u32) -> u32 {
    if index == INVALID { return 0u; }
    var bits = raw;
    if bits == 0x80000000u { bits = 0u; }                        // -0.0 ranks as 0.0
    if (bits & 0x7fffffffu) > 0x7f800000u { bits = 0xff800000u; } // NaN ranks as -inf
    if (bits & 0x80000000u) != 0u { return ~bits; }
    return bits | 0x80000000u;
}

fn ranks_before(key_a: u32, index_a: u32, key_b: u32, index_b: u32) -> bool {
    return key_a > key_b || (key_a == key_b && index_a < index_b);
}

@compute @workgroup_size(WG)
fn select_top_k(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
                @builtin(local_invocation_index) lane: u32) {
    let block = flat_workgroup(wg, groups);
    if block >= p.blocks { return; }
    let first = block * BLOCK;
    let end = min(first + BLOCK, p.count);
    // The previous pick; the first round accepts everything.
    var prev_key = 0xffffffffu;
    var prev_index = 0u;
    for (var r = 0u; r < p.k; r++) {
        var key = 0u;
        var raw = 0u;
        var index = INVALID;
        for (var e = first + lane; e < end; e += WG) {
            var c_raw = src[e];
            var c_index = e;
            if p.pairs == 1u {
                c_raw = src[2u * e];
                c_index = src[2u * e + 1u];
            }
            let c_key = order_key(c_raw, c_index);
            let below_prev = ranks_before(prev_key, prev_index, c_key, c_index) || r == 0u;
            if c_index != INVALID && below_prev && ranks_before(c_key, c_index, key, index) {
                key = c_key;
                raw = c_raw;
                index = c_index;
            }
        }
        // The best within each subgroup by register exchanges, then over the WG / SUBGROUP subgroups'
        // bests in workgroup memory.
        for (var mask = 1u; mask < SUBGROUP; mask <<= 1u) {
            let other = exchange4u(vec4<u32>(key, raw, index, 0u), mask);
            if ranks_before(other.x, other.z, key, index) {
                key = other.x;
                raw = other.y;
                index = other.z;
            }
        }
        if lane % SUBGROUP == 0u {
            best_key[lane / SUBGROUP] = key;
            best_raw[lane / SUBGROUP] = raw;
            best_index[lane / SUBGROUP] = index;
        }
        for (var stride = WG / SUBGROUP / 2u; stride > 0u; stride /= 2u) {
            workgroupBarrier();
            if lane < stride && ranks_before(best_key[lane + stride], best_index[lane + stride],
                                             best_key[lane], best_index[lane]) {
                best_key[lane] = best_key[lane + stride];
                best_raw[lane] = best_raw[lane + stride];
                best_index[lane] = best_index[lane + stride];
            }
        }
        workgroupBarrier();
        prev_key = best_key[0];
        prev_index = best_index[0];
        if lane == 0u {
            dst[block * p.k + r] = vec2<u32>(best_raw[0], prev_index);
        }
        workgroupBarrier();
    }
}

// Prepended to every kernel family by msa-wgpu's pipeline cache (the one template mechanism: plain
// concatenation plus `override` constants), so these helpers are written once.

// Storage dtype of a packed operand: 0 = f32 (one value per u32), 1 = bf16 and 2 = f16 (two per u32,
// element 2i in the low half). Weights stay as stored and are widened here, exactly.
override DTYPE: u32 = 0u;

// Element `i` of a packed buffer word `word`.
fn widen(word: u32, i: u32) -> f32 {
    let half_bits = select(word & 0xffffu, word >> 16u, (i & 1u) == 1u);
    switch DTYPE {
        case 1u: { return bitcast<f32>(half_bits << 16u); }
        case 2u: { return f16_bits_to_f32(half_bits); }
        default: { return bitcast<f32>(word); }
    }
}

// IEEE binary16 → f32, exact, in integer arithmetic (needs neither `shader-f16` nor unpack2x16float,
// which some downlevel backends lack).
fn f16_bits_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let exponent = (h >> 10u) & 0x1fu;
    let mantissa = h & 0x3ffu;
    if exponent == 0u {
        // Zero or subnormal: mantissa × 2^-24.
        return bitcast<f32>(sign | bitcast<u32>(f32(mantissa) * 5.9604645e-8));
    }
    if exponent == 31u {
        return bitcast<f32>(sign | 0x7f800000u | (mantissa << 13u));
    }
    return bitcast<f32>(sign | ((exponent + 112u) << 23u) | (mantissa << 13u));
}

// Elements of the stored dtype in one 16-byte word (a vec4<u32>).
fn per_vector() -> u32 {
    return select(8u, 4u, DTYPE == 0u);
}

// The 4 elements of a 16-byte word's half `part` (0 or 1), widened exactly; an f32 word holds 4
// (part 0).
fn widen4(word: vec4<u32>, part: u32) -> vec4<f32> {
    if DTYPE == 0u {
        return bitcast<vec4<f32>>(word);
    }
    let a = select(word.x, word.z, part == 1u);
    let b = select(word.y, word.w, part == 1u);
    if DTYPE == 1u {
        return bitcast<vec4<f32>>(vec4<u32>(a << 16u, a & 0xffff0000u, b << 16u, b & 0xffff0000u));
    }
    return vec4<f32>(widen(a, 0u), widen(a, 1u), widen(b, 0u), widen(b, 1u));
}

// Invocations whose values a reduction exchanges in registers before it turns to workgroup memory: a
// power of two, 1 (no exchange) where the device has no subgroup operations, else the adapter's smallest
// subgroup size (at most 64, a workgroup). Where subgroups are consecutive runs of invocations (checked
// on one pipeline when the device opens), aligned runs of SUBGROUP invocations lie in one subgroup
// whatever size the driver picks for a pipeline.
override SUBGROUP: u32 = 1u;

// v summed (or maxed) over each aligned run of `span` invocations (a power of two, at most SUBGROUP),
// every invocation of the run receiving the result: a butterfly of register exchanges.
fn span_sum4(v: vec4<f32>, span: u32) -> vec4<f32> {
    var s = v;
    for (var mask = 1u; mask < span; mask <<= 1u) {
        s += exchange4(s, mask);
    }
    return s;
}

fn span_max4(v: vec4<f32>, span: u32) -> vec4<f32> {
    var s = v;
    for (var mask = 1u; mask < span; mask <<= 1u) {
        s = max(s, exchange4(s, mask));
    }
    return s;
}

// Index of the u32 word holding element `i`.
fn word_of(i: u32) -> u32 {
    return select(i, i >> 1u, DTYPE != 0u);
}

// Grids larger than 65,535 workgroups are dispatched as 2-D (x, y); this is the flat workgroup index.
fn flat_workgroup(wg: vec3<u32>, groups: vec3<u32>) -> u32 {
    return wg.x + wg.y * groups.x;
}

// Lowest finite f32, standing in for -inf (WGSL cannot spell infinities).
const LOWEST: f32 = -3.4028234e38;

// SiLU (SwiGLU's gate activation), as the CPU reference computes it.
fn silu(v: f32) -> f32 {
    return v / (1.0 + exp(-v));
}

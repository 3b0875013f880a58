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

//! Every kernel family's WGSL (shared helpers + family file, exactly as the device compiles it) parses and
//! validates with naga, without a GPU. Driver-side compilation is covered by the op tests on an adapter.

use msa_wgpu::kernels::Family;
use naga::valid::{Capabilities, ValidationFlags, Validator};

fn validate(
    name: &str,
    source: &str,
    capabilities: Capabilities,
) -> Result<naga::valid::ModuleInfo, String> {
    let module = naga::front::wgsl::parse_str(source)
        .map_err(|e| e.emit_to_string_with_path(source, name))?;
    Validator::new(ValidationFlags::all(), capabilities)
        .validate(&module)
        .map_err(|e| e.emit_to_string_with_path(source, name))
}

/// Every family, with the subgroup prelude and without. Without, no optional capability: the kernels
/// must run on every WebGPU adapter (no f16, no subgroups). The f16 probe alone needs `shader-f16` and
/// the subgroup layout check subgroups (each runs only where the device has it).
#[test]
fn every_kernel_family_validates_with_naga() {
    let mut failures = Vec::new();
    for subgroups in [false, true] {
        for family in Family::ALL {
            if family.needs_subgroups() && !subgroups {
                continue;
            }
            let mut capabilities = Capabilities::empty();
            if family.needs_f16() {
                capabilities |= Capabilities::SHADER_FLOAT16;
            }
            if subgroups {
                capabilities |= Capabilities::SUBGROUP;
            }
            let source = family.source(subgroups);
            if let Err(e) = validate(family.file_name(), &source, capabilities) {
                failures.push(format!("subgroups {subgroups}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Without the capability the f16 family and the subgroup prelude are refused: they must stay
    // behind their features.
    let f16 = Family::ProbeF16;
    assert!(validate(f16.file_name(), &f16.source(false), Capabilities::empty()).is_err());
    let norm = Family::Norm;
    assert!(validate(norm.file_name(), &norm.source(true), Capabilities::empty()).is_err());
}

/// A `var` declared inside a block (a loop body, a branch) without an initializer must be zero each
/// time the declaration runs, but Chromium's WebGPU on SwiftShader kept the previous iteration's
/// values (routing scores went wrong in the browser tests). Every such declaration is therefore
/// initialised explicitly; one at the top of a function body (4 spaces deep) runs once and may rely on
/// zero-initialisation.
#[test]
fn block_local_variables_are_initialised_explicitly() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shaders");
    let mut bare = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let source = std::fs::read_to_string(&path).unwrap();
        for (number, line) in source.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            let depth = code.len() - code.trim_start().len();
            let declaration = code.trim();
            if depth > 4 && declaration.starts_with("var ") && !declaration.contains('=') {
                let name = path.file_name().unwrap().to_string_lossy();
                bare.push(format!("{name} line {}: {}", number + 1, line.trim()));
            }
        }
    }
    assert!(
        bare.is_empty(),
        "declare with `= T()`:\n{}",
        bare.join("\n")
    );
}

#[test]
fn families_are_the_shader_files_plus_the_shared_helpers() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shaders");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".wgsl") && !PRELUDES.contains(&name.as_str()))
        .collect();
    on_disk.sort();
    let mut families: Vec<String> = Family::ALL
        .iter()
        .map(|f| f.file_name().to_string())
        .collect();
    families.sort();
    assert_eq!(
        on_disk, families,
        "every shader file is a family and vice versa"
    );
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let common = read("common.wgsl");
    for family in Family::ALL {
        let body = read(family.file_name());
        let enables = if family.needs_f16() {
            "enable f16;\n"
        } else {
            ""
        };
        for (subgroups, prelude) in [(false, "no_subgroups.wgsl"), (true, "subgroups.wgsl")] {
            let prelude = read(prelude);
            assert_eq!(
                family.source(subgroups),
                format!("{enables}{prelude}\n{common}\n{body}")
            );
        }
    }
}

/// Shader files prepended to every family rather than families themselves.
const PRELUDES: [&str; 3] = ["common.wgsl", "subgroups.wgsl", "no_subgroups.wgsl"];

#[test]
fn a_broken_shader_is_reported_with_its_location() {
    let source = Family::Matmul.source(false);
    let broken = source.replace("a0 += column_dots(", "a0 += 1u + column_dots(");
    assert_ne!(broken, source, "the line to break is gone from matmul.wgsl");
    let err = validate("matmul.wgsl", &broken, Capabilities::empty()).unwrap_err();
    assert!(err.contains("matmul.wgsl"), "{err}");
}

//! Every kernel family's WGSL (shared helpers + family file, exactly as the device compiles it) parses and
//! validates with naga, without a GPU. Driver-side compilation is covered by the op tests on an adapter.

use msa_wgpu::kernels::Family;
use naga::valid::{Capabilities, ValidationFlags, Validator};

fn validate(name: &str, source: &str) -> Result<naga::valid::ModuleInfo, String> {
    let module = naga::front::wgsl::parse_str(source)
        .map_err(|e| e.emit_to_string_with_path(source, name))?;
    // No optional capability: the kernels must run on every WebGPU adapter (no f16, no subgroups).
    Validator::new(ValidationFlags::all(), Capabilities::empty())
        .validate(&module)
        .map_err(|e| e.emit_to_string_with_path(source, name))
}

#[test]
fn every_kernel_family_validates_with_naga() {
    let failures: Vec<String> = Family::ALL
        .iter()
        .filter_map(|family| validate(family.file_name(), &family.source()).err())
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn families_are_the_shader_files_plus_the_shared_helpers() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shaders");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".wgsl") && name != "common.wgsl")
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
    let common = std::fs::read_to_string(dir.join("common.wgsl")).unwrap();
    for family in Family::ALL {
        let body = std::fs::read_to_string(dir.join(family.file_name())).unwrap();
        assert_eq!(family.source(), format!("{common}\n{body}"));
    }
}

#[test]
fn a_broken_shader_is_reported_with_its_location() {
    let broken = Family::Matmul
        .source()
        .replace("acc[c][r] += ", "acc[c][r] += 1u + ");
    let err = validate("matmul.wgsl", &broken).unwrap_err();
    assert!(err.contains("matmul.wgsl"), "{err}");
}

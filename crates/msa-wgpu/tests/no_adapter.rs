//! With no usable adapter the backend returns a clear error saying how to get one, instead of panicking.
//! This binary holds one test because it changes the process environment before wgpu reads it.

use msa_wgpu::{DeviceOptions, WgpuBackend, WgpuError};

#[test]
fn no_adapter_is_a_clear_error_naming_the_fix() {
    // `noop` is a backend this build does not compile in, so the instance finds no adapter at all.
    // SAFETY: the only test of this binary; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("WGPU_BACKEND", "noop") };
    let error = match pollster::block_on(WgpuBackend::new(DeviceOptions::default())) {
        Ok(_) => panic!("an adapter opened with WGPU_BACKEND=noop"),
        Err(e) => e,
    };
    assert!(matches!(error, WgpuError::NoAdapter { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("mesa-vulkan-drivers"), "{message}");
    assert!(message.contains("WGPU_BACKEND"), "{message}");
    let engine_error: msa_engine::Error = error.into();
    assert!(engine_error.to_string().contains("no GPU adapter"));
}

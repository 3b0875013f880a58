//! Errors of opening a wgpu device. Failures while running ops surface as [`msa_engine::Error`]
//! variants (`DeviceLost`, `OutOfDeviceMemory`, `Device`), like every other backend's.

#[derive(Debug, thiserror::Error)]
pub enum WgpuError {
    #[error(
        "no GPU adapter found ({detail}). Install a driver with Vulkan, Metal or DX12 support, or a \
         software Vulkan driver: on Debian/Ubuntu `apt-get install mesa-vulkan-drivers libvulkan1` \
         provides lavapipe. WGPU_BACKEND chooses the API (vulkan, metal, dx12, gl)."
    )]
    NoAdapter { detail: String },

    #[error("no adapter matches `{wanted}`; adapters found: {available}")]
    AdapterNotFound { wanted: String, available: String },

    #[error("could not open a device on `{adapter}`: {reason}")]
    RequestDevice { adapter: String, reason: String },
}

impl From<WgpuError> for msa_engine::Error {
    fn from(error: WgpuError) -> Self {
        msa_engine::Error::Device {
            backend: "wgpu".into(),
            message: error.to_string(),
        }
    }
}

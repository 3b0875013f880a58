//! msa-wgpu: the WGSL backend of msa. Every op of the engine's [`Backend`](msa_engine::Backend) trait is a
//! compute shader under `shaders/` (one file per kernel family), run by wgpu on Vulkan, Metal, DX12, GL
//! or a browser's WebGPU.
//!
//! ```no_run
//! use msa_engine::Backend;
//! use msa_wgpu::{DeviceOptions, WgpuBackend};
//!
//! let gpu = pollster::block_on(WgpuBackend::new(DeviceOptions::from_env()))?;
//! println!("{}", gpu.describe());
//! let x = gpu.upload(&[1.0, 2.0, 3.0, 4.0], &[2, 2])?;
//! let y = gpu.add(&x, &x)?;
//! assert_eq!(pollster::block_on(gpu.read(&y))?, vec![2.0, 4.0, 6.0, 8.0]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Execution model: ops record into one command encoder; it is submitted when the host needs a value
//! (`read`, `top_k`), so a prefill submits once per router layer and a decode step once per token.
//! [`WgpuBackend::stats`] counts dispatches, submits and readbacks.

mod backend;
mod context;
mod device;
mod error;
pub mod kernels;
#[cfg(not(target_arch = "wasm32"))]
pub mod probe;

pub use backend::{WgpuBackend, WgpuTensor, WgpuWeight};
pub use context::ExecutionStats;
pub use device::{Capabilities, DeviceOptions, Variants, list_adapters, matching_adapters};
pub use error::WgpuError;
/// The wgpu this backend is built on (adapter and device types for embedders).
pub use wgpu;

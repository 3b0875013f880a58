//! msa-cuda: the CUDA backend of msa.
//!
//! Every [`msa_engine::Backend`] op runs on an NVIDIA GPU through [cudarc]: projections of more than a few
//! rows as cuBLAS GEMMs (bf16 and f16 weights on tensor cores, with the activations rounded to the
//! weight's dtype and f32 accumulation; f32 weights in full f32), decode projections, norms, RoPE,
//! attention, pooling and routing as kernels compiled once per process by NVRTC for the device's
//! architecture.
//!
//! Nothing links against CUDA: the driver, NVRTC and cuBLAS libraries are loaded when a backend is
//! opened, so the crate builds anywhere and [`CudaBackend::new`] reports a missing library as an error.
//!
//! ```no_run
//! use msa_cuda::{CudaBackend, CudaOptions};
//! use msa_engine::Backend;
//!
//! let gpu = CudaBackend::new(CudaOptions::default())?;
//! let x = gpu.upload(&[1.0, 2.0, 3.0], &[1, 3])?;
//! let y = gpu.add(&x, &x)?;
//! assert_eq!(pollster::block_on(gpu.read(&y))?, [2.0, 4.0, 6.0]);
//! # Ok::<(), msa_engine::Error>(())
//! ```

mod backend;
mod clique;
mod counts;
mod device;
mod kernel_abi;
mod link;
mod probe;

pub use backend::{CudaBackend, CudaTensor, CudaWeight};
pub use clique::{nccl_missing, nccl_version};
pub use counts::{ExecutionCounts, KernelTime, KernelTimes};
pub use device::{
    COPY_KERNEL, CompiledKernels, CudaDeviceInfo, CudaOptions, KERNELS, compile_kernels,
    device_count, devices, libraries_missing, nvrtc_present,
};
pub use probe::CudaRoofline;

//! Shared helpers for the golden parity tests: fixture loading and tolerance checks that record the
//! largest deviation of every tensor (printed with `--nocapture`).

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

/// Every golden check runs on each backend: `on_every_backend!(test_fn, ...)` makes a `cpu`, a `wgpu` and
/// a `cuda` module with one `#[test]` per function, calling `test_fn(backend)`. The CUDA tests skip on a
/// machine without an NVIDIA GPU unless `MSA_REQUIRE_CUDA` is set.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod cpu {
            $(#[test]
            fn $name() {
                super::$name(msa::engine::CpuBackend::new());
            })*
        }
        mod wgpu {
            $(#[test]
            fn $name() {
                if let Some(gpu) = super::common::wgpu_backend() {
                    super::$name(gpu);
                }
            })*
        }
        mod cuda {
            $(#[test]
            fn $name() {
                if let Some(gpu) = msa::cuda::CudaBackend::open_or_skip(Default::default()) {
                    super::$name(gpu);
                }
            })*
        }
    };
}

/// `on_wgpu_with_small_limits!(test_fn, ...)`: a `wgpu_small_limits` module running each test on
/// [`wgpu_backend_with_small_limits`].
#[macro_export]
macro_rules! on_wgpu_with_small_limits {
    ($($name:ident),* $(,)?) => {
        mod wgpu_small_limits {
            $(#[test]
            fn $name() {
                if let Some(gpu) = super::common::wgpu_backend_with_small_limits() {
                    super::$name(gpu);
                }
            })*
        }
    };
}

/// The wgpu backend on the environment's adapter; see `WgpuBackend::open_or_skip` for when a missing
/// adapter fails instead of skipping (`cargo xtask test` and CI).
pub fn wgpu_backend() -> Option<msa::wgpu::WgpuBackend> {
    pollster::block_on(msa::wgpu::WgpuBackend::open_or_skip(
        msa::wgpu::DeviceOptions::from_env(),
    ))
}

/// The wgpu backend with its buffer and binding limits cut to the tiny fixtures' scale, as a browser's
/// default limits (256 MiB buffers, 128 MiB bindings) are to MSA-4B's: the 128 KiB embedding is split
/// into two buffers, each bound in windows, while the longest document's activations (~100 KB) fit.
pub fn wgpu_backend_with_small_limits() -> Option<msa::wgpu::WgpuBackend> {
    pollster::block_on(msa::wgpu::WgpuBackend::open_or_skip(
        msa::wgpu::DeviceOptions {
            max_buffer_bytes: Some(112 << 10),
            max_binding_bytes: Some(104 << 10),
            ..msa::wgpu::DeviceOptions::from_env()
        },
    ))
}

/// Whether a backend computes each row of a batch with the same bits whatever else the batch holds: the
/// CPU reference and the WGSL kernels sum every output in one fixed order; cuBLAS picks its GEMM
/// algorithm (tiling, split-K) by the whole batch's shape, so a row's last bits depend on its batch.
pub trait BatchInvariance {
    const BATCH_INVARIANT: bool;
}

impl BatchInvariance for msa::CpuBackend {
    const BATCH_INVARIANT: bool = true;
}

impl BatchInvariance for msa::wgpu::WgpuBackend {
    const BATCH_INVARIANT: bool = true;
}

impl BatchInvariance for msa::cuda::CudaBackend {
    const BATCH_INVARIANT: bool = false;
}

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A golden safetensors file of a fixture, read whole.
pub struct Golden {
    bytes: Vec<u8>,
    name: String,
}

impl Golden {
    pub fn open(fixture: &str, file: &str) -> Self {
        let path = fixture_dir(fixture).join(file);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Golden {
            bytes,
            name: format!("{fixture}/{file}"),
        }
    }

    fn view(&self, tensor: &str) -> (Dtype, Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("fixture parses");
        let t = st
            .tensor(tensor)
            .unwrap_or_else(|e| panic!("{}: {tensor}: {e}", self.name));
        (t.dtype(), t.shape().to_vec(), t.data().to_vec())
    }

    pub fn f32(&self, tensor: &str) -> (Vec<usize>, Vec<f32>) {
        let (dtype, shape, data) = self.view(tensor);
        assert_eq!(dtype, Dtype::F32, "{tensor}");
        let values = data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (shape, values)
    }

    pub fn ids(&self, tensor: &str) -> Vec<u32> {
        let (dtype, _, data) = self.view(tensor);
        match dtype {
            Dtype::I64 => data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
                .collect(),
            Dtype::U8 => data.iter().map(|&b| b as u32).collect(),
            other => panic!("{tensor}: unexpected dtype {other:?}"),
        }
    }
}

/// Reorders `[a, b, c]` (row-major) into `[b, a, c]`: golden `[kv_heads, tokens, d]` → engine
/// `[tokens, kv_heads, d]`.
pub fn swap_leading(values: &[f32], a: usize, b: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for i in 0..a {
        for j in 0..b {
            out[(j * a + i) * c..][..c].copy_from_slice(&values[(i * b + j) * c..][..c]);
        }
    }
    out
}

/// Records the largest absolute deviation of every compared tensor.
#[derive(Default)]
pub struct Deviations {
    rows: Vec<(String, f32, f32, usize)>,
}

impl Deviations {
    /// Asserts `|actual - expected| <= atol` elementwise and records the maximum deviation.
    pub fn check(&mut self, name: &str, actual: &[f32], expected: &[f32], atol: f32) {
        assert_eq!(
            actual.len(),
            expected.len(),
            "{name}: {} values, golden has {}",
            actual.len(),
            expected.len()
        );
        let (mut worst, mut at) = (0.0f32, 0);
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            let d = (a - e).abs();
            assert!(!d.is_nan(), "{name}[{i}]: {a} vs golden {e}");
            if d > worst {
                (worst, at) = (d, i);
            }
        }
        assert!(
            worst <= atol,
            "{name}: max |diff| {worst:.3e} at index {at} ({} vs golden {}) exceeds atol {atol:.0e}",
            actual[at],
            expected[at]
        );
        self.rows
            .push((name.to_string(), worst, atol, actual.len()));
    }

    pub fn print(&self, title: &str) {
        println!("{title}: largest deviation per tensor");
        for (name, worst, atol, n) in &self.rows {
            println!("  {name:<40} {worst:>10.3e}  (atol {atol:.0e}, {n} values)");
        }
    }
}

/// One stored tensor, owned.
#[derive(Clone)]
pub struct Tensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Every tensor of a safetensors file, sorted by name.
pub fn read_tensors(path: &Path) -> Vec<Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("fixture parses");
    let mut out: Vec<Tensor> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| Tensor {
            name,
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            data: view.data().to_vec(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

pub fn write_tensors(path: &Path, tensors: &[Tensor]) {
    let views = tensors.iter().map(|t| {
        let view = safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.data)
            .unwrap_or_else(|e| panic!("{}: {e}", t.name));
        (t.name.clone(), view)
    });
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(metadata)).expect("serializes");
    std::fs::write(path, bytes).unwrap();
}

/// The weights of a fixture's `model.safetensors`.
pub fn fixture_tensors(fixture: &str) -> Vec<Tensor> {
    read_tensors(&fixture_dir(fixture).join("model.safetensors"))
}

/// A temporary copy of a fixture's model directory (config, tokenizer when present, weights).
pub fn copy_fixture(fixture: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        let from = fixture_dir(fixture).join(file);
        if from.is_file() {
            std::fs::copy(&from, dir.path().join(file)).unwrap();
        }
    }
    dir
}

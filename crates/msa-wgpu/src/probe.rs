//! The adapter's roofline: buffer-copy bandwidth, a bandwidth-bound read kernel and the peak f32 FMA
//! rate (and the f16 rate on devices with `shader-f16`), each timed as recorded work plus one wait for the device (device time on a GPU; on a CPU
//! adapter such as lavapipe, the machine's). Kernel benchmarks print their figures as fractions of
//! these, measured in the same run, so a figure reads the same on lavapipe, a browser or an H100.

use std::time::{Duration, Instant};

use msa_engine::{Backend, Result};

use crate::backend::WgpuBackend;
use crate::context::bind;
use crate::kernels::{Family, Kernel};

/// Invocations per workgroup of the probe kernels (`WG` in probe.wgsl).
const WG: u32 = 256;
/// Bytes read by the copy and read probes: past any cache, within a browser's binding limit.
const PROBE_BYTES: u64 = 64 << 20;
/// vec4s each invocation of the read probe sums.
const WORDS_PER_INVOCATION: u64 = 16;
/// Invocations and loop trips of the FMA probe: 2^30 FMAs of 2 FLOPs per dispatch.
const FMA_INVOCATIONS: u32 = 1 << 18;
const FMA_ITERATIONS: u32 = 256;
/// A timed run lasts at least this long (dispatches are repeated until it does).
const MIN_RUN: Duration = Duration::from_millis(50);

/// One probe of the roofline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Buffer-to-buffer copy (`copy_buffer_to_buffer`): bytes read plus bytes written.
    Copy,
    /// A kernel summing a buffer with coalesced vec4 loads: bytes read.
    Read,
    /// Independent f32 vec4 FMA chains: FLOPs (an FMA is 2).
    FmaF32,
    /// The same in f16, on devices with `shader-f16`.
    FmaF16,
}

impl Probe {
    pub const ALL: [Probe; 4] = [Probe::Copy, Probe::Read, Probe::FmaF32, Probe::FmaF16];

    pub fn name(self) -> &'static str {
        match self {
            Probe::Copy => "buffer copy",
            Probe::Read => "read kernel",
            Probe::FmaF32 => "f32 FMA",
            Probe::FmaF16 => "f16 FMA",
        }
    }
}

/// What the adapter did in the probes: bytes per second moved or read, FLOPs per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Roofline {
    /// Copy bandwidth, counting bytes read and written.
    pub copy_bytes_per_s: f64,
    /// Read bandwidth of a kernel: the ceiling of a bandwidth-bound kernel.
    pub read_bytes_per_s: f64,
    /// f32 FMA rate in FLOPs per second: the ceiling of a compute-bound kernel.
    pub f32_flops_per_s: f64,
    /// f16 FMA rate in FLOPs per second; `None` where the device has no `shader-f16`.
    pub f16_flops_per_s: Option<f64>,
}

/// The probes' buffers on one device.
pub struct RooflineProbe {
    gpu: WgpuBackend,
    src: wgpu::Buffer,
    dst: wgpu::Buffer,
    sink: wgpu::Buffer,
    bytes: u64,
}

impl RooflineProbe {
    pub fn new(gpu: &WgpuBackend) -> Result<Self> {
        let ctx = &gpu.ctx;
        // Whole 16-byte words of one binding.
        let bytes = PROBE_BYTES.min(ctx.caps.max_binding_bytes) / 16 * 16;
        let invocations = (bytes / 16 / WORDS_PER_INVOCATION).max(u64::from(FMA_INVOCATIONS));
        Ok(RooflineProbe {
            gpu: gpu.clone(),
            src: ctx.storage(bytes, "probe source")?,
            dst: ctx.storage(bytes, "probe copy")?,
            sink: ctx.storage(invocations * 4, "probe sink")?,
            bytes,
        })
    }

    /// Bytes (copy, read) or FLOPs (FMA) of one run of `probe`.
    pub fn work(&self, probe: Probe) -> f64 {
        match probe {
            Probe::Copy => 2.0 * self.bytes as f64,
            Probe::Read => self.bytes as f64,
            Probe::FmaF32 | Probe::FmaF16 => {
                32.0 * f64::from(FMA_INVOCATIONS) * f64::from(FMA_ITERATIONS)
            }
        }
    }

    /// Whether the device can run `probe` (the f16 probe needs `shader-f16`).
    pub fn supports(&self, probe: Probe) -> bool {
        probe != Probe::FmaF16 || self.gpu.ctx.caps.shader_f16
    }

    /// Records one run of `probe` (submitted with the next wait). A probe the device cannot run
    /// is an error naming the missing feature.
    pub fn record(&self, probe: Probe) -> Result<()> {
        let ctx = &self.gpu.ctx;
        if !self.supports(probe) {
            return Err(msa_engine::Error::Device {
                backend: "wgpu".into(),
                message: format!(
                    "the {} probe needs shader-f16, which `{}` does not offer",
                    probe.name(),
                    ctx.info.name
                ),
            });
        }
        let words = (self.bytes / 16) as u32;
        let sink = bind(2, &self.sink);
        let dispatch =
            |family, entry: &'static str, invocations: u32, iterations: u32, bindings| {
                ctx.dispatch(
                    &Kernel::new(family, entry),
                    &[words, iterations, invocations],
                    bindings,
                    invocations.div_ceil(WG) as usize,
                )
            };
        match probe {
            Probe::Copy => {
                ctx.copy(&self.src, 0, &self.dst, 0, self.bytes);
                Ok(())
            }
            Probe::Read => dispatch(
                Family::Probe,
                "read_rate",
                (u64::from(words) / WORDS_PER_INVOCATION).max(1) as u32,
                0,
                &[bind(1, &self.src), sink],
            ),
            Probe::FmaF32 => dispatch(
                Family::Probe,
                "fma_rate",
                FMA_INVOCATIONS,
                FMA_ITERATIONS,
                &[sink],
            ),
            Probe::FmaF16 => dispatch(
                Family::ProbeF16,
                "fma_rate_f16",
                FMA_INVOCATIONS,
                FMA_ITERATIONS,
                &[sink],
            ),
        }
    }

    /// Seconds per run of `probe`: runs are repeated until one timing lasts [`MIN_RUN`], then the
    /// best of three such timings counts.
    pub async fn seconds(&self, probe: Probe) -> Result<f64> {
        self.timed(probe, 1).await?; // warm-up: pipeline creation, first touch of the buffers
        let mut runs = 1;
        let mut elapsed = self.timed(probe, runs).await?;
        while elapsed < MIN_RUN && runs < 1 << 14 {
            runs *= 4;
            elapsed = self.timed(probe, runs).await?;
        }
        for _ in 0..2 {
            elapsed = elapsed.min(self.timed(probe, runs).await?);
        }
        Ok(elapsed.as_secs_f64() / f64::from(runs))
    }

    async fn timed(&self, probe: Probe, runs: u32) -> Result<Duration> {
        let start = Instant::now();
        for _ in 0..runs {
            self.record(probe)?;
        }
        self.gpu.synchronize().await?;
        Ok(start.elapsed())
    }

    /// Every probe the device supports, measured now.
    pub async fn measure(&self) -> Result<Roofline> {
        let rate =
            async |probe| Ok::<_, msa_engine::Error>(self.work(probe) / self.seconds(probe).await?);
        Ok(Roofline {
            copy_bytes_per_s: rate(Probe::Copy).await?,
            read_bytes_per_s: rate(Probe::Read).await?,
            f32_flops_per_s: rate(Probe::FmaF32).await?,
            f16_flops_per_s: if self.supports(Probe::FmaF16) {
                Some(rate(Probe::FmaF16).await?)
            } else {
                None
            },
        })
    }
}

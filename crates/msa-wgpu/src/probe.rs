//! The adapter's roofline: buffer-copy bandwidth, a bandwidth-bound read kernel and the peak f32 FMA
//! rate, each timed as recorded work plus one wait for the device (device time on a GPU; on a CPU
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
}

impl Probe {
    pub const ALL: [Probe; 3] = [Probe::Copy, Probe::Read, Probe::FmaF32];

    pub fn name(self) -> &'static str {
        match self {
            Probe::Copy => "buffer copy",
            Probe::Read => "read kernel",
            Probe::FmaF32 => "f32 FMA",
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
            Probe::FmaF32 => 32.0 * f64::from(FMA_INVOCATIONS) * f64::from(FMA_ITERATIONS),
        }
    }

    /// Records one run of `probe` (submitted with the next wait).
    pub fn record(&self, probe: Probe) -> Result<()> {
        let ctx = &self.gpu.ctx;
        let words = (self.bytes / 16) as u32;
        let sink = bind(2, &self.sink);
        let dispatch = |entry: &'static str, invocations: u32, iterations: u32, bindings| {
            ctx.dispatch(
                &Kernel::new(Family::Probe, entry),
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
                "read_rate",
                (u64::from(words) / WORDS_PER_INVOCATION).max(1) as u32,
                0,
                &[bind(1, &self.src), sink],
            ),
            Probe::FmaF32 => dispatch("fma_rate", FMA_INVOCATIONS, FMA_ITERATIONS, &[sink]),
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

    /// Every probe, measured now.
    pub async fn measure(&self) -> Result<Roofline> {
        let mut rates = [0.0; 3];
        for (rate, probe) in rates.iter_mut().zip(Probe::ALL) {
            *rate = self.work(probe) / self.seconds(probe).await?;
        }
        let [copy_bytes_per_s, read_bytes_per_s, f32_flops_per_s] = rates;
        Ok(Roofline {
            copy_bytes_per_s,
            read_bytes_per_s,
            f32_flops_per_s,
        })
    }
}

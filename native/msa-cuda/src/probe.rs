//! What the GPU itself can do, measured in the same run as a benchmark: the denominators of its
//! fractions (routing and decode against device-memory bandwidth, fetches against host-to-device);
//! and the region an attached profiler records.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{profiler_start, profiler_stop};
use msa_engine::Result;

use crate::CudaBackend;
use crate::device::guarded;

/// Bandwidths measured on one device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CudaRoofline {
    /// A device-to-device copy, counting the bytes read and written (what HBM moves), in bytes/s.
    pub device_copy_bytes_per_s: f64,
    /// A copy from pinned host memory to the device, in bytes/s.
    pub host_to_device_bytes_per_s: f64,
}

/// Bytes each probe moves per repetition: large enough to leave the caches (an H200 has 60 MB of L2).
const PROBE_BYTES: usize = 1 << 30;
const REPETITIONS: usize = 5;

impl CudaBackend {
    /// Starts (`true`) or stops collection by an attached CUDA profiler in this device's context:
    /// under `ncu --profile-from-start off` (or `nsys profile -c cudaProfilerApi`) only the kernels
    /// launched in between are recorded. Without a profiler it does nothing.
    pub fn profile_region(&self, on: bool) -> Result<()> {
        let device = &self.device;
        let error = |e| device.error(e);
        device.stream.context().bind_to_thread().map_err(error)?;
        let switch = if on { profiler_start } else { profiler_stop };
        guarded(switch)?.map_err(error)
    }

    /// Measures [`CudaRoofline`]: each copy once to warm up, then the best of five, timed with events.
    pub fn measure_roofline(&self) -> Result<CudaRoofline> {
        let device = &self.device;
        let stream = &device.stream;
        let error = |e| device.error(e);
        let elements = PROBE_BYTES / 4;
        let source = self.alloc_zeroed(elements)?;
        let mut target = self.alloc_zeroed(elements)?;
        let device_copy = best_of(self, || {
            stream.memcpy_dtod(&source, &mut target).map_err(error)
        })?;
        // SAFETY: the pinned buffer is written (zeroed) before it is copied.
        let mut pinned =
            unsafe { stream.context().alloc_pinned::<f32>(elements) }.map_err(error)?;
        pinned
            .as_mut_slice()
            .map_err(error)?
            .iter_mut()
            .for_each(|v| *v = 0.0);
        let host_copy = best_of(self, || {
            stream.memcpy_htod(&pinned, &mut target).map_err(error)
        })?;
        Ok(CudaRoofline {
            device_copy_bytes_per_s: 2.0 * PROBE_BYTES as f64 / device_copy,
            host_to_device_bytes_per_s: PROBE_BYTES as f64 / host_copy,
        })
    }
}

/// The shortest of [`REPETITIONS`] timings of `work` queued on the stream, in seconds, after one
/// untimed run.
fn best_of(backend: &CudaBackend, mut work: impl FnMut() -> Result<()>) -> Result<f64> {
    let device = &backend.device;
    let error = |e| device.error(e);
    let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let context = device.stream.context();
    let (start, end) = (
        context.new_event(timing).map_err(error)?,
        context.new_event(timing).map_err(error)?,
    );
    work()?;
    let mut best = f64::INFINITY;
    for _ in 0..REPETITIONS {
        start.record(&device.stream).map_err(error)?;
        work()?;
        end.record(&device.stream).map_err(error)?;
        best = best.min(f64::from(start.elapsed_ms(&end).map_err(error)?) / 1e3);
    }
    Ok(best)
}

//! The device context: buffers, windows over large buffers, recording dispatches into one command
//! encoder, submitting, reading back, and turning wgpu's error callbacks into `msa_engine::Error`s.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};

use msa_engine::{Error, Result};
use wgpu::util::DeviceExt;

use crate::device::Capabilities;
use crate::kernels::{Kernel, PipelineCache};

/// Dispatches recorded before the encoder is submitted even without a readback, so long runs of ops
/// without a host decision (stage-1 encoding) do not hold every intermediate buffer alive.
const MAX_PENDING_DISPATCHES: u64 = 1024;

/// Counters of device work, for benchmarks ("dispatches and submits per token").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecutionStats {
    pub dispatches: u64,
    pub submits: u64,
    pub readbacks: u64,
    /// Bytes copied back to the host.
    pub readback_bytes: u64,
    /// Copies from one device buffer to another (growing contexts, stacking rows, the bandwidth
    /// probe's; not readbacks or uploads).
    pub copies: u64,
    /// Bytes those copies wrote.
    pub copied_bytes: u64,
}

impl std::ops::Sub for ExecutionStats {
    type Output = ExecutionStats;
    fn sub(self, rhs: Self) -> Self {
        ExecutionStats {
            dispatches: self.dispatches - rhs.dispatches,
            submits: self.submits - rhs.submits,
            readbacks: self.readbacks - rhs.readbacks,
            readback_bytes: self.readback_bytes - rhs.readback_bytes,
            copies: self.copies - rhs.copies,
            copied_bytes: self.copied_bytes - rhs.copied_bytes,
        }
    }
}

#[derive(Default)]
struct Counters {
    dispatches: AtomicU64,
    submits: AtomicU64,
    readbacks: AtomicU64,
    readback_bytes: AtomicU64,
    copies: AtomicU64,
    copied_bytes: AtomicU64,
    pending: AtomicU64,
}

/// The first fatal device event, kept until the backend is dropped: every later op reports it.
#[derive(Clone, Debug)]
enum Fault {
    Lost(String),
    OutOfMemory(String),
    Other(String),
}

impl Fault {
    fn to_error(&self) -> Error {
        let backend = "wgpu".to_string();
        match self.clone() {
            Fault::Lost(reason) => Error::DeviceLost { backend, reason },
            Fault::OutOfMemory(detail) => Error::OutOfDeviceMemory { backend, detail },
            Fault::Other(message) => Error::Device { backend, message },
        }
    }
}

/// A storage binding: a buffer, or a window of one starting at an aligned offset.
pub struct Binding<'a> {
    pub slot: u32,
    pub buffer: &'a wgpu::Buffer,
    pub range: Option<(u64, u64)>,
}

impl Binding<'_> {
    /// Binds `size` bytes from `offset` instead of the whole buffer.
    pub fn window(self, offset: u64, size: u64) -> Self {
        Binding {
            range: Some((offset, size)),
            ..self
        }
    }
}

/// Binds the whole of `buffer` at `slot`.
pub fn bind(slot: u32, buffer: &wgpu::Buffer) -> Binding<'_> {
    Binding {
        slot,
        buffer,
        range: None,
    }
}

/// A window of rows of a large buffer that fits one binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub rows: Range<usize>,
    /// Byte offset and size of the binding.
    pub offset: u64,
    pub size: u64,
    /// Element index of the first row inside the window.
    pub base: u32,
}

pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub caps: Capabilities,
    pipelines: PipelineCache,
    encoder: Mutex<Option<wgpu::CommandEncoder>>,
    counters: Counters,
    fault: Arc<Mutex<Option<Fault>>>,
    /// A small buffer bound where a kernel specialisation leaves a binding unused.
    pub placeholder: wgpu::Buffer,
}

impl GpuContext {
    pub fn new(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        caps: Capabilities,
    ) -> Self {
        let fault: Arc<Mutex<Option<Fault>>> = Arc::default();
        // wgpu's default handler panics; record the first error instead and fail the next op with it.
        let on_error = fault.clone();
        device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
            let fault = match &error {
                wgpu::Error::OutOfMemory { .. } => Fault::OutOfMemory(error.to_string()),
                _ => Fault::Other(error.to_string()),
            };
            on_error.lock().expect("fault lock").get_or_insert(fault);
        }));
        let on_lost = fault.clone();
        device.set_device_lost_callback(move |reason, message| {
            on_lost
                .lock()
                .expect("fault lock")
                .get_or_insert(Fault::Lost(format!("{reason:?}: {message}")));
        });
        let placeholder = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("unused binding"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        GpuContext {
            placeholder,
            device,
            queue,
            info,
            caps,
            pipelines: PipelineCache::default(),
            encoder: Mutex::new(None),
            counters: Counters::default(),
            fault,
        }
    }

    pub fn stats(&self) -> ExecutionStats {
        let c = &self.counters;
        ExecutionStats {
            dispatches: c.dispatches.load(Ordering::Relaxed),
            submits: c.submits.load(Ordering::Relaxed),
            readbacks: c.readbacks.load(Ordering::Relaxed),
            readback_bytes: c.readback_bytes.load(Ordering::Relaxed),
            copies: c.copies.load(Ordering::Relaxed),
            copied_bytes: c.copied_bytes.load(Ordering::Relaxed),
        }
    }

    /// The recorded fault, if any.
    pub fn check(&self) -> Result<()> {
        match &*self.fault.lock().expect("fault lock") {
            Some(fault) => Err(fault.to_error()),
            None => Ok(()),
        }
    }

    pub fn limit_error(&self, what: String) -> Error {
        Error::Device {
            backend: "wgpu".into(),
            message: format!("{what} (adapter `{}`)", self.info.name),
        }
    }

    /// The size of a storage buffer for `bytes`, in whole 16-byte words (kernels may read any buffer as
    /// vec4s; WebGPU bindings cannot be empty), checked against the adapter's largest buffer before anything is allocated.
    fn buffer_size(&self, bytes: u64, label: &str) -> Result<u64> {
        let size = bytes.max(16).next_multiple_of(16);
        if size > self.caps.max_buffer_bytes {
            return Err(self.limit_error(format!(
                "{label}: {size} bytes exceed the largest buffer of {} bytes",
                self.caps.max_buffer_bytes
            )));
        }
        self.check()?;
        Ok(size)
    }

    /// A storage buffer of `bytes`.
    pub fn storage(&self, bytes: u64, label: &str) -> Result<wgpu::Buffer> {
        let size = self.buffer_size(bytes, label)?;
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }))
    }

    /// A storage buffer holding `bytes`, zero-padded to a multiple of 16.
    pub fn storage_with(&self, bytes: &[u8], label: &str) -> Result<wgpu::Buffer> {
        let size = self.buffer_size(bytes.len() as u64, label)?;
        let mut padded;
        let contents = if bytes.len() as u64 == size {
            bytes
        } else {
            padded = bytes.to_vec();
            padded.resize(size as usize, 0);
            &padded
        };
        Ok(self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
            }))
    }

    /// Checks that a whole buffer fits one binding (activations; weights and keys use windows). The
    /// description is only built for the error: this runs for every operand of every op.
    pub fn fits(&self, buffer: &wgpu::Buffer, what: impl FnOnce() -> String) -> Result<()> {
        if buffer.size() > self.caps.max_binding_bytes {
            return Err(self.limit_error(format!(
                "{}: {} bytes exceed the storage binding limit of {} bytes",
                what(),
                buffer.size(),
                self.caps.max_binding_bytes
            )));
        }
        Ok(())
    }

    /// Splits `rows` rows of `row_elements` elements of `element_bytes` each, stored from byte 0 of a
    /// buffer of `buffer_bytes`, into windows that each fit one binding.
    pub fn windows(
        &self,
        what: &str,
        buffer_bytes: u64,
        rows: usize,
        row_elements: usize,
        element_bytes: usize,
    ) -> Result<Vec<Window>> {
        let limit = self.caps.max_binding_bytes;
        if buffer_bytes <= limit {
            return Ok(vec![Window {
                rows: 0..rows,
                offset: 0,
                size: buffer_bytes,
                base: 0,
            }]);
        }
        let align = u64::from(self.caps.storage_offset_alignment);
        let row_bytes = (row_elements * element_bytes) as u64;
        // A window starts up to `align` bytes before its first row.
        let rows_per_window = (limit.saturating_sub(align) / row_bytes.max(1)) as usize;
        if rows_per_window == 0 {
            return Err(self.limit_error(format!(
                "{what}: one row of {row_bytes} bytes does not fit the storage binding limit of {limit} bytes"
            )));
        }
        let mut windows = Vec::new();
        let mut first = 0;
        while first < rows {
            let end = (first + rows_per_window).min(rows);
            let start_byte = first as u64 * row_bytes;
            let offset = start_byte / align * align;
            // Whole 16-byte words, so kernels may read the window as vec4s.
            let end_byte = (end as u64 * row_bytes)
                .next_multiple_of(16)
                .min(buffer_bytes);
            windows.push(Window {
                rows: first..end,
                offset,
                size: end_byte - offset,
                base: ((start_byte - offset) / element_bytes as u64) as u32,
            });
            first = end;
        }
        Ok(windows)
    }

    /// Compiles `kernel`'s pipeline now, returning what validation or the driver reports instead of
    /// keeping it as the device's fault: for optional paths the device can do without.
    pub async fn try_pipeline(&self, kernel: &Kernel) -> std::result::Result<(), String> {
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let internal = self.device.push_error_scope(wgpu::ErrorFilter::Internal);
        self.pipelines
            .get(&self.device, kernel, self.caps.subgroup_width);
        // Scopes pop innermost first; the guards are not held across the awaits.
        let (internal, validation) = (internal.pop(), validation.pop());
        match (internal.await, validation.await) {
            (Some(e), _) | (None, Some(e)) => Err(e.to_string()),
            (None, None) => Ok(()),
        }
    }

    /// Records one dispatch of `kernel` over `workgroups` workgroups (tiled into 2-D past the
    /// per-dimension limit) with a uniform block of `params` at binding 0.
    pub fn dispatch(
        &self,
        kernel: &Kernel,
        params: &[u32],
        bindings: &[Binding<'_>],
        workgroups: usize,
    ) -> Result<()> {
        self.check()?;
        if workgroups == 0 {
            return Ok(());
        }
        let max = self.caps.max_workgroups_per_dimension as usize;
        let x = workgroups.min(max);
        let y = workgroups.div_ceil(x);
        if y > max {
            return Err(self.limit_error(format!(
                "{}: {workgroups} workgroups exceed a {max} × {max} grid",
                kernel.entry
            )));
        }
        let pipeline = self
            .pipelines
            .get(&self.device, kernel, self.caps.subgroup_width);
        // Uniform blocks are padded to 16 bytes.
        let mut words = params.to_vec();
        words.resize(params.len().next_multiple_of(4).max(4), 0);
        let uniform = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytemuck::cast_slice(&words),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        }];
        entries.extend(bindings.iter().map(|b| wgpu::BindGroupEntry {
            binding: b.slot,
            resource: match b.range {
                None => b.buffer.as_entire_binding(),
                Some((offset, size)) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b.buffer,
                    offset,
                    size: wgpu::BufferSize::new(size),
                }),
            },
        }));
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel.entry),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        self.record(|encoder| {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(kernel.entry),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(x as u32, y as u32, 1);
        });
        self.counters.dispatches.fetch_add(1, Ordering::Relaxed);
        if self.counters.pending.fetch_add(1, Ordering::Relaxed) + 1 >= MAX_PENDING_DISPATCHES {
            self.submit();
        }
        self.check()
    }

    /// Records a buffer-to-buffer copy (counted in [`ExecutionStats::copies`]).
    pub fn copy(
        &self,
        src: &wgpu::Buffer,
        src_offset: u64,
        dst: &wgpu::Buffer,
        dst_offset: u64,
        bytes: u64,
    ) {
        if bytes > 0 {
            self.record(|encoder| {
                encoder.copy_buffer_to_buffer(src, src_offset, dst, dst_offset, bytes)
            });
            self.counters.copies.fetch_add(1, Ordering::Relaxed);
            self.counters
                .copied_bytes
                .fetch_add(bytes, Ordering::Relaxed);
        }
    }

    fn record(&self, f: impl FnOnce(&mut wgpu::CommandEncoder)) {
        let mut slot = self.encoder.lock().expect("encoder lock");
        let encoder = slot.get_or_insert_with(|| {
            self.device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("msa") })
        });
        f(encoder);
    }

    /// Submits everything recorded so far.
    pub fn submit(&self) -> Option<wgpu::SubmissionIndex> {
        let encoder = self.encoder.lock().expect("encoder lock").take();
        encoder.map(|encoder| {
            let index = self.queue.submit([encoder.finish()]);
            self.counters.submits.fetch_add(1, Ordering::Relaxed);
            self.counters.pending.store(0, Ordering::Relaxed);
            index
        })
    }

    /// Copies the first `bytes` of `buffer` to the host once every recorded op has run. The work is
    /// submitted now; the future waits for that submission only, so ops recorded and submitted after
    /// this call run on the device while the host waits or does other work.
    pub fn read_bytes(
        &self,
        buffer: &wgpu::Buffer,
        bytes: u64,
    ) -> impl Future<Output = Result<Vec<u8>>> + use<> {
        let size = bytes.next_multiple_of(4);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: size.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        // Not through `copy`: a readback is counted as one.
        if size > 0 {
            self.record(|encoder| encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, size));
        }
        let submission = self.submit();
        self.counters.readbacks.fetch_add(1, Ordering::Relaxed);
        self.counters
            .readback_bytes
            .fetch_add(bytes, Ordering::Relaxed);
        let mapped = MapFuture::default();
        let signal = mapped.state.clone();
        staging.map_async(wgpu::MapMode::Read, .., move |result| {
            let mut state = signal.lock().expect("map lock");
            state.0 = Some(result.map_err(|e| e.to_string()));
            if let Some(waker) = state.1.take() {
                waker.wake();
            }
        });
        let (device, fault) = (self.device.clone(), self.fault.clone());
        async move {
            // Natively the map completes only when the device is polled; the browser drives it itself.
            #[cfg(not(target_arch = "wasm32"))]
            device
                .poll(wgpu::PollType::Wait {
                    submission_index: submission,
                    timeout: None,
                })
                .map_err(|e| Error::Device {
                    backend: "wgpu".into(),
                    message: format!("waiting for the device: {e}"),
                })?;
            #[cfg(target_arch = "wasm32")]
            let _ = (&device, submission);
            if let Some(fault) = &*fault.lock().expect("fault lock") {
                return Err(fault.to_error());
            }
            // A browser fails the map of a lost device before it reports the loss: prefer the loss.
            mapped
                .await
                .map_err(|message| match &*fault.lock().expect("fault lock") {
                    Some(fault) => fault.to_error(),
                    None => Error::Device {
                        backend: "wgpu".into(),
                        message: format!("reading back a buffer: {message}"),
                    },
                })?;
            let data = staging.get_mapped_range(..).map_err(|e| Error::Device {
                backend: "wgpu".into(),
                message: format!("reading back a buffer: {e}"),
            })?[..bytes as usize]
                .to_vec();
            staging.unmap();
            Ok(data)
        }
    }
}

type MapState = (Option<std::result::Result<(), String>>, Option<Waker>);

/// Resolves when a `map_async` callback has fired.
#[derive(Default)]
struct MapFuture {
    state: Arc<Mutex<MapState>>,
}

impl Future for MapFuture {
    type Output = std::result::Result<(), String>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let mut state = self.state.lock().expect("map lock");
        match state.0.take() {
            Some(result) => Poll::Ready(result),
            None => {
                state.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

//! Counts of the work a device was given, for benchmarks: how many kernels a decoded token launches,
//! what it copies between device allocations, and how long the host waits for the device meanwhile.
//! A host that spends most of a token waiting has queued its work faster than the device runs it; one
//! that hardly waits holds the device up. With
//! [`CudaOptions::time_kernels`](crate::CudaOptions::time_kernels), also each kernel's (and copy's)
//! device time, from a pair of events around every launch.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaEvent, DriverError};

/// What a [`CudaBackend`](crate::CudaBackend) was given since it opened (see
/// [`CudaBackend::execution_counts`](crate::CudaBackend::execution_counts)); the difference of two
/// readings is the work between them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecutionCounts {
    /// Kernels launched and cuBLAS calls made (each one or more kernels).
    pub launches: u64,
    /// Times the host blocked until the device reached a point: a read-back, a synchronisation, a
    /// buffer's earlier copy, the kernel timer falling 4,096 launches behind (not counted: large
    /// pageable uploads, and reading the kernel times).
    pub host_waits: u64,
    /// The time the host spent blocked in them.
    pub host_wait: Duration,
    /// Copies from one device allocation to another (growing contexts, stacking rows; not uploads,
    /// read-backs or the bandwidth probe's).
    pub copies: u64,
    /// Bytes those copies wrote.
    pub copied_bytes: u64,
}

/// A device's running counts, shared by everything that launches or waits on it.
#[derive(Default)]
pub(crate) struct Counters {
    launches: AtomicU64,
    host_waits: AtomicU64,
    host_wait_nanos: AtomicU64,
    copies: AtomicU64,
    copied_bytes: AtomicU64,
}

impl Counters {
    pub(crate) fn launched(&self) {
        self.launches.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn copied(&self, bytes: usize) {
        self.copies.fetch_add(1, Ordering::Relaxed);
        (self.copied_bytes).fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Runs `wait`, a call in which the host blocks for the device, and counts it and its time.
    pub(crate) fn wait<T>(&self, wait: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let result = wait();
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.host_waits.fetch_add(1, Ordering::Relaxed);
        self.host_wait_nanos.fetch_add(nanos, Ordering::Relaxed);
        result
    }

    pub(crate) fn read(&self) -> ExecutionCounts {
        ExecutionCounts {
            launches: self.launches.load(Ordering::Relaxed),
            host_waits: self.host_waits.load(Ordering::Relaxed),
            host_wait: Duration::from_nanos(self.host_wait_nanos.load(Ordering::Relaxed)),
            copies: self.copies.load(Ordering::Relaxed),
            copied_bytes: self.copied_bytes.load(Ordering::Relaxed),
        }
    }
}

/// Launches and device time of one kernel (one of msa's, or a kind of cuBLAS call).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KernelTime {
    pub launches: u64,
    /// Summed from each launch's start and end events, so it includes the gaps the GPU leaves
    /// between a launch's start and its kernel (about a microsecond).
    pub time: Duration,
}

/// Device time per kernel name since the backend opened (see
/// [`CudaBackend::kernel_times`](crate::CudaBackend::kernel_times)).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelTimes(pub BTreeMap<&'static str, KernelTime>);

impl KernelTimes {
    /// The launches and time between an `earlier` reading and this one (kernels with none left out).
    pub fn since(&self, earlier: &KernelTimes) -> KernelTimes {
        let mut between = BTreeMap::new();
        for (&kernel, now) in &self.0 {
            let before = earlier.0.get(kernel).copied().unwrap_or_default();
            if now.launches > before.launches {
                between.insert(
                    kernel,
                    KernelTime {
                        launches: now.launches - before.launches,
                        time: now.time.saturating_sub(before.time),
                    },
                );
            }
        }
        KernelTimes(between)
    }

    /// These times and `other`'s together.
    pub fn plus(mut self, other: &KernelTimes) -> KernelTimes {
        for (&kernel, time) in &other.0 {
            let total = self.0.entry(kernel).or_default();
            total.launches += time.launches;
            total.time += time.time;
        }
        self
    }
}

/// Launches recorded but not yet added up: at this many, the host waits for them all (a counted host
/// wait: the device is that far behind the host).
const PENDING_LAUNCHES: usize = 4096;
/// Every this many launches pending, the ones that have run are added up without waiting.
const ADD_UP_EVERY: usize = 256;

/// The events around each timed launch, added up per kernel once they have fired, and then recorded
/// again for later launches (recording an event costs less than creating one).
#[derive(Default)]
pub(crate) struct KernelTimer {
    pending: VecDeque<(&'static str, CudaEvent, CudaEvent)>,
    spare: Vec<CudaEvent>,
    totals: KernelTimes,
}

impl KernelTimer {
    /// An event to record: a spare one, or one `new` creates.
    pub(crate) fn event(
        &mut self,
        new: impl FnOnce() -> Result<CudaEvent, DriverError>,
    ) -> Result<CudaEvent, DriverError> {
        self.spare.pop().map_or_else(new, Ok)
    }

    /// Takes a launch of `kernel` between two recorded events.
    pub(crate) fn record(
        &mut self,
        kernel: &'static str,
        start: CudaEvent,
        end: CudaEvent,
        counters: &Counters,
    ) -> Result<(), DriverError> {
        self.pending.push_back((kernel, start, end));
        if self.pending.len() >= PENDING_LAUNCHES {
            counters.wait(|| self.add_up(true))?;
        } else if self.pending.len().is_multiple_of(ADD_UP_EVERY) {
            self.add_up(false)?;
        }
        Ok(())
    }

    /// Waits for every recorded launch and returns the totals.
    pub(crate) fn read(&mut self) -> Result<KernelTimes, DriverError> {
        self.add_up(true)?;
        Ok(self.totals.clone())
    }

    /// Adds up the launches that have run, oldest first (one stream runs them in order), or with
    /// `wait`, every one recorded.
    fn add_up(&mut self, wait: bool) -> Result<(), DriverError> {
        while let Some((_, _, end)) = self.pending.front() {
            if !wait && !end.try_is_complete()? {
                break;
            }
            let (kernel, start, end) = self.pending.pop_front().expect("a front launch");
            let ms = start.elapsed_ms(&end)?;
            let total = self.totals.0.entry(kernel).or_default();
            total.launches += 1;
            total.time += Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3);
            self.spare.extend([start, end]);
        }
        Ok(())
    }
}

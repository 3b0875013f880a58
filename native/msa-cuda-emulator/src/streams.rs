//! Streams and events. Work queued on a stream runs in the stream's order, but no sooner than
//! something waits for it: a synchronisation of the stream, or of an event recorded on it (or a
//! poll of that event, which finds it not ready the first time); a stream that waits for such an
//! event and is itself waited for; a copy to pageable host memory (synchronous in the driver too);
//! a free that is not stream-ordered, which runs its device's queued work first. So work the
//! program forgot to order before a read has, as a rule, not run when the read does: a missing
//! event or stream wait, or page-locked memory read or rewritten before its copy was waited for,
//! changes the results. (Another thread's synchronisation of the same streams, or its free on the
//! same device, may run the work sooner, as a GPU may.) The null stream runs its work at once
//! (cudarc's streams do not synchronise with it).
//!
//! Any thread that waits runs the work itself, one item of a stream at a time; it waits for an item
//! another thread is running. A wait for work queued behind the item running it would never end on a
//! GPU: it is reported instead (`CUDA_ERROR_ILLEGAL_STATE`).
//!
//! A kernel that fails when it runs fails its stream: the stream's later work is skipped, and every
//! synchronisation with it reports the error. (A GPU fails the whole context; a stream keeps tests of
//! one process, each with its own streams, apart.)

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::ThreadId;

use cudarc::driver::sys::CUresult::CUDA_ERROR_ILLEGAL_STATE;
use cudarc::driver::sys::{CUdevice, CUresult, CUstream};

/// Work queued on a stream: a copy, memset, launch, GEMM, free or collective.
pub(crate) type Work = Box<dyn FnOnce() -> Result<(), CUresult> + Send>;

enum Item {
    Work(Work),
    /// Record `number` of an event.
    Record(Arc<Event>, u64),
    /// Waits for another stream's items up to a sequence number.
    Wait(Arc<Stream>, u64),
}

pub(crate) struct Stream {
    pub(crate) device: CUdevice,
    queue: Mutex<Queue>,
    /// Signalled each time an item has run.
    progress: Condvar,
}

/// Items not yet run, each with its sequence number (from 1, in the order queued), and the thread
/// running the one taken off, if any.
#[derive(Default)]
struct Queue {
    items: VecDeque<(u64, Item)>,
    queued: u64,
    done: u64,
    running: Option<ThreadId>,
    failed: Option<CUresult>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every stream made, for the synchronisations of a whole device.
static STREAMS: Mutex<Vec<Weak<Stream>>> = Mutex::new(Vec::new());

impl Stream {
    pub(crate) fn new(device: CUdevice) -> Arc<Stream> {
        let stream = Arc::new(Stream {
            device,
            queue: Mutex::default(),
            progress: Condvar::new(),
        });
        let mut streams = lock(&STREAMS);
        streams.retain(|s| s.strong_count() > 0);
        streams.push(Arc::downgrade(&stream));
        stream
    }

    fn push(&self, item: Item) -> u64 {
        let mut queue = lock(&self.queue);
        queue.queued += 1;
        let seq = queue.queued;
        queue.items.push_back((seq, item));
        seq
    }

    /// Runs this stream's items up to sequence number `upto`, or waits while another thread runs
    /// one of them.
    pub(crate) fn drain(&self, upto: u64) -> Result<(), CUresult> {
        let me = std::thread::current().id();
        let mut queue = lock(&self.queue);
        loop {
            if queue.done >= upto {
                return queue.failed.map_or(Ok(()), Err);
            }
            match queue.running {
                Some(thread) if thread == me => {
                    eprintln!(
                        "msa-cuda-emulator: work waits for work queued behind itself on its own \
                         stream (through an event or a collective): a GPU would hang"
                    );
                    return Err(CUDA_ERROR_ILLEGAL_STATE);
                }
                Some(_) => {
                    queue = self
                        .progress
                        .wait(queue)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
                None => {
                    let (seq, item) = queue
                        .items
                        .pop_front()
                        .expect("items up to `upto` are queued");
                    let skip = queue.failed.is_some();
                    queue.running = Some(me);
                    drop(queue);
                    let result = match item {
                        Item::Work(_) if skip => Ok(()),
                        Item::Work(work) => work(),
                        Item::Record(event, number) => {
                            event.fire(number);
                            Ok(())
                        }
                        Item::Wait(stream, upto) => stream.drain(upto),
                    };
                    queue = lock(&self.queue);
                    queue.running = None;
                    queue.done = seq;
                    if let Err(e) = result {
                        queue.failed.get_or_insert(e);
                    }
                    self.progress.notify_all();
                }
            }
        }
    }

    /// Runs everything queued so far.
    pub(crate) fn synchronize(&self) -> Result<(), CUresult> {
        let queued = lock(&self.queue).queued;
        self.drain(queued)
    }

    /// Whether every item queued so far has run.
    pub(crate) fn idle(&self) -> bool {
        let queue = lock(&self.queue);
        queue.done == queue.queued
    }
}

/// The stream behind a handle from cuStreamCreate; `None` for the null stream (also named
/// `CU_STREAM_LEGACY`, 1, and `CU_STREAM_PER_THREAD`, 2).
///
/// # Safety
/// `handle` is one of those or a handle from cuStreamCreate not yet destroyed.
pub(crate) unsafe fn stream(handle: CUstream) -> Option<Arc<Stream>> {
    if (handle as usize) <= 2 {
        return None;
    }
    // SAFETY: the caller's handle is a live `Box<Arc<Stream>>`.
    unsafe { handle.cast::<Arc<Stream>>().as_ref() }.cloned()
}

/// Queues `work` on `handle`'s stream; at once on the null stream. Returns where it was queued.
///
/// # Safety
/// As [`stream`].
pub(crate) unsafe fn queue(
    handle: CUstream,
    work: Work,
) -> Result<Option<(Arc<Stream>, u64)>, CUresult> {
    match unsafe { stream(handle) } {
        None => work().map(|()| None),
        Some(stream) => {
            let seq = stream.push(Item::Work(work));
            Ok(Some((stream, seq)))
        }
    }
}

/// Queues `work` on `handle`'s stream and waits for it (and so for everything queued before it).
///
/// # Safety
/// As [`stream`].
pub(crate) unsafe fn queue_and_wait(handle: CUstream, work: Work) -> Result<(), CUresult> {
    match unsafe { queue(handle, work) }? {
        Some((stream, seq)) => stream.drain(seq),
        None => Ok(()),
    }
}

/// Runs the work queued so far on every stream of `device`.
pub(crate) fn synchronize_device(device: CUdevice) -> Result<(), CUresult> {
    let streams: Vec<Arc<Stream>> = lock(&STREAMS).iter().filter_map(Weak::upgrade).collect();
    let mut result = Ok(());
    for stream in streams.iter().filter(|s| s.device == device) {
        result = result.and(stream.synchronize());
    }
    result
}

/// An event: whether it times, and its records.
pub(crate) struct Event {
    pub(crate) timing: bool,
    state: Mutex<EventState>,
}

#[derive(Default)]
struct EventState {
    /// Where its latest record is queued; `None` when it was on the null stream, or never.
    latest: Option<(Arc<Stream>, u64)>,
    /// Records made, and the last that ran, with when it ran ([`crate::now`]).
    records: u64,
    fired: u64,
    at: u64,
}

impl Event {
    pub(crate) fn new(timing: bool) -> Arc<Event> {
        Arc::new(Event {
            timing,
            state: Mutex::default(),
        })
    }

    fn fire(&self, number: u64) {
        let mut state = lock(&self.state);
        if number > state.fired {
            state.fired = number;
            state.at = crate::now();
        }
    }

    /// Records the event behind the work queued on `handle` so far.
    ///
    /// # Safety
    /// As [`stream`].
    pub(crate) unsafe fn record(self: &Arc<Event>, handle: CUstream) {
        let mut state = lock(&self.state);
        state.records += 1;
        let number = state.records;
        match unsafe { stream(handle) } {
            None => {
                state.latest = None;
                drop(state);
                self.fire(number);
            }
            Some(stream) => {
                let seq = stream.push(Item::Record(self.clone(), number));
                state.latest = Some((stream, seq));
            }
        }
    }

    /// Runs the work before the latest record.
    pub(crate) fn synchronize(&self) -> Result<(), CUresult> {
        let latest = lock(&self.state).latest.clone();
        latest.map_or(Ok(()), |(stream, seq)| stream.drain(seq))
    }

    /// Makes `handle`'s later work wait for the latest record (nothing, if none).
    ///
    /// # Safety
    /// As [`stream`].
    pub(crate) unsafe fn wait_on(&self, handle: CUstream) -> Result<(), CUresult> {
        let Some((recorded, seq)) = lock(&self.state).latest.clone() else {
            return Ok(());
        };
        match unsafe { stream(handle) } {
            None => recorded.drain(seq),
            Some(waiting) => {
                waiting.push(Item::Wait(recorded, seq));
                Ok(())
            }
        }
    }

    /// Whether the latest record has run (or the event was never recorded).
    pub(crate) fn fired(&self) -> bool {
        let state = lock(&self.state);
        state.fired == state.records
    }

    /// When the latest record ran; `None` if it has not, or the event was never recorded.
    pub(crate) fn recorded_at(&self) -> Option<u64> {
        let state = lock(&self.state);
        (state.records > 0 && state.fired == state.records).then_some(state.at)
    }
}

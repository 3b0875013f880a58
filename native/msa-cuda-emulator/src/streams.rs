//! Streams and events. Work queued on a stream runs in the stream's order, but no sooner than something
//! waits for it: a synchronisation of the stream, or of an event recorded on it; a stream that waits
//! for such an event and is itself waited for; a copy to pageable host memory (synchronous in the driver
//! too); a free that synchronises. So each piece of work runs as late as the program lets it, and work
//! the program forgot to order before a read has not run when the read does: a missing event or stream
//! wait, or page-locked memory read or rewritten before its copy was waited for, changes the results.
//! The null stream runs its work at once (cudarc's streams do not synchronise with it).
//!
//! A kernel that fails when it runs fails its stream, as on a GPU: the stream's later work is skipped,
//! and every synchronisation with it reports the error.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

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
    /// Held while this stream's items run, so they run one at a time, in order.
    runner: Mutex<()>,
}

/// Items not yet run, each with its sequence number (from 1, in the order queued).
#[derive(Default)]
struct Queue {
    items: VecDeque<(u64, Item)>,
    queued: u64,
    done: u64,
    failed: Option<CUresult>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every stream made, for the synchronisations that wait for all of them.
static STREAMS: Mutex<Vec<Weak<Stream>>> = Mutex::new(Vec::new());

impl Stream {
    pub(crate) fn new(device: CUdevice) -> Arc<Stream> {
        let stream = Arc::new(Stream {
            device,
            queue: Mutex::default(),
            runner: Mutex::new(()),
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

    /// Whether the items up to `upto` have run, and if so how the stream stands.
    fn reached(&self, upto: u64) -> Option<Result<(), CUresult>> {
        let queue = lock(&self.queue);
        (queue.done >= upto).then(|| queue.failed.map_or(Ok(()), Err))
    }

    /// Runs this stream's items up to sequence number `upto`.
    pub(crate) fn drain(&self, upto: u64) -> Result<(), CUresult> {
        // Without taking the runner when nothing is left to run: a collective's part waits for the
        // other ranks' streams to reach theirs, which may be running on other threads right now.
        if let Some(result) = self.reached(upto) {
            return result;
        }
        let _runner = lock(&self.runner);
        loop {
            let (seq, item, failed) = {
                let mut queue = lock(&self.queue);
                if queue.done >= upto {
                    return queue.failed.map_or(Ok(()), Err);
                }
                let (seq, item) = queue
                    .items
                    .pop_front()
                    .expect("items up to `upto` are queued");
                (seq, item, queue.failed.is_some())
            };
            let result = match item {
                Item::Work(_) if failed => Ok(()),
                Item::Work(work) => work(),
                Item::Record(event, number) => {
                    event.fire(number);
                    Ok(())
                }
                Item::Wait(stream, upto) => stream.drain(upto),
            };
            let mut queue = lock(&self.queue);
            queue.done = seq;
            if let Err(e) = result {
                queue.failed.get_or_insert(e);
            }
        }
    }

    /// Runs everything queued so far.
    pub(crate) fn synchronize(&self) -> Result<(), CUresult> {
        let queued = lock(&self.queue).queued;
        self.drain(queued)
    }
}

/// The stream behind a handle from cuStreamCreate; `None` for the null stream.
///
/// # Safety
/// `handle` is null or a handle from cuStreamCreate not yet destroyed.
pub(crate) unsafe fn stream(handle: CUstream) -> Option<Arc<Stream>> {
    // SAFETY: the caller's handle is a live `Box<Arc<Stream>>`, or null.
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

/// Runs the work queued on every stream so far, of `device` or of all devices.
pub(crate) fn synchronize_all(device: Option<CUdevice>) -> Result<(), CUresult> {
    let streams: Vec<Arc<Stream>> = lock(&STREAMS).iter().filter_map(Weak::upgrade).collect();
    let mut result = Ok(());
    for stream in streams {
        if device.is_none_or(|d| d == stream.device) {
            result = result.and(stream.synchronize());
        }
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

    /// When the latest record ran; `None` if it has not, or the event was never recorded.
    pub(crate) fn recorded_at(&self) -> Option<u64> {
        let state = lock(&self.state);
        (state.records > 0 && state.fired == state.records).then_some(state.at)
    }
}

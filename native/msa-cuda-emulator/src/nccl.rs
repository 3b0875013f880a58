//! A stand-in for NCCL (`libnccl.so`): cliques of this process's emulated devices made by
//! `ncclCommInitAll`, and the broadcast msa-cuda sends router queries with, inside NCCL groups.
//!
//! A group's collectives are queued on the ranks' streams when it ends; each runs when the first of
//! its ranks' streams gets to it and is waited for, once every rank's stream has run the work queued
//! before its part. A clique one thread drives must record every rank's part in one group (NCCL's
//! own rule for that case, which would otherwise hang). Checked, and refused with NCCL's error codes
//! and a message in `ncclGetLastError`:
//! - arguments as NCCL checks them: a root outside the clique, a null buffer, an unknown type;
//! - every rank's part of a collective agrees on count, type and root;
//! - the group holds every rank's part of each collective it starts (a part left waiting for a rank
//!   that never comes would hang a GPU);
//! - each buffer lies inside one allocation of its rank's device, and each stream is that device's;
//! - one device per rank, as NCCL requires.
//!
//! After a group, the device of its last part stays current, as NCCL may leave it: the caller must
//! make its own context current again.

use std::cell::RefCell;
use std::ffi::{CString, c_char, c_int, c_void};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{CUdevice, CUresult};
use cudarc::nccl::sys::{cudaStream_t, ncclComm_t, ncclDataType_t, ncclResult_t};

use crate::streams::{self, Stream};
use crate::{CURRENT, check_device, check_on, stream_device, take_back, token};
use ncclResult_t::{ncclInvalidArgument, ncclInvalidUsage, ncclSuccess, ncclUnhandledCudaError};

/// The version reported: that of the NCCL API msa-cuda's bindings (cudarc's `nccl-02026`) describe.
const VERSION: c_int = 22600;

/// One rank of a communicator.
#[derive(Clone)]
pub(crate) struct Comm {
    pub(crate) kind: Kind,
    pub(crate) rank: usize,
    pub(crate) world: usize,
    pub(crate) device: CUdevice,
}

/// How a communicator's ranks reach each other.
#[derive(Clone)]
pub(crate) enum Kind {
    /// Devices of this process (`ncclCommInitAll`): memory copies.
    Clique(Arc<()>),
    /// Ranks in any process (`ncclCommInitRank`): sockets ([`crate::nccl_ranks`]).
    Ranks(Arc<crate::nccl_ranks::Peers>),
}

impl Comm {
    fn clique(&self) -> Option<&Arc<()>> {
        match &self.kind {
            Kind::Clique(clique) => Some(clique),
            Kind::Ranks(_) => None,
        }
    }
}

/// One rank's part of a broadcast, as recorded.
struct Part {
    comm: Comm,
    clique: Arc<()>,
    send: *const u8,
    receive: *mut u8,
    bytes: usize,
    datatype: u32,
    root: usize,
    stream: usize,
}

thread_local! {
    /// Open groups on this thread: their depth, and the parts recorded inside them.
    static GROUP: RefCell<(usize, Vec<Part>)> = const { RefCell::new((0, Vec::new())) };
    /// The message of this thread's last failed call, for `ncclGetLastError`.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records why a call fails, prints it (as the driver's stand-in does) and returns its code.
pub(crate) fn fail(code: ncclResult_t, why: String) -> ncclResult_t {
    eprintln!("msa-cuda-emulator (NCCL): {why}");
    LAST_ERROR.set(CString::new(why).unwrap_or_default());
    code
}

pub(crate) fn result(body: impl FnOnce() -> Result<(), (ncclResult_t, String)>) -> ncclResult_t {
    match body() {
        Ok(()) => ncclSuccess,
        Err((code, why)) => fail(code, why),
    }
}

/// Bytes per element of an NCCL data type.
pub(crate) fn element_size(datatype: u32) -> Option<usize> {
    use ncclDataType_t::*;
    [
        (ncclInt8, 1),
        (ncclUint8, 1),
        (ncclInt32, 4),
        (ncclUint32, 4),
        (ncclInt64, 8),
        (ncclUint64, 8),
        (ncclFloat16, 2),
        (ncclFloat32, 4),
        (ncclFloat64, 8),
        (ncclBfloat16, 2),
    ]
    .into_iter()
    .find(|(t, _)| *t as u32 == datatype)
    .map(|(_, size)| size)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclGetVersion(version: *mut c_int) -> ncclResult_t {
    if version.is_null() {
        return fail(ncclInvalidArgument, "ncclGetVersion: a null pointer".into());
    }
    // SAFETY: a non-null out-pointer.
    unsafe { version.write(VERSION) };
    ncclSuccess
}

#[unsafe(no_mangle)]
pub extern "C" fn ncclGetErrorString(code: u32) -> *const c_char {
    match code {
        0 => c"no error",
        1 => c"unhandled cuda error (run with NCCL_DEBUG=INFO for details)",
        2 => c"unhandled system error (run with NCCL_DEBUG=INFO for details)",
        4 => c"invalid argument (run with NCCL_DEBUG=WARN for details)",
        5 => c"invalid usage (run with NCCL_DEBUG=WARN for details)",
        _ => c"an NCCL error msa-cuda-emulator does not raise",
    }
    .as_ptr()
}

/// This thread's last error, whatever the communicator (as NCCL, which keeps one per thread).
#[unsafe(no_mangle)]
pub extern "C" fn ncclGetLastError(_comm: ncclComm_t) -> *const c_char {
    // The string lives until this thread's next failed call.
    LAST_ERROR.with_borrow(|text| text.as_ptr())
}

/// A clique of `ndev` ranks, rank r on device `devlist[r]` (device r for a null list).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclCommInitAll(
    comms: *mut ncclComm_t,
    ndev: c_int,
    devlist: *const c_int,
) -> ncclResult_t {
    result(|| {
        let world = usize::try_from(ndev).ok().filter(|&n| n > 0).ok_or((
            ncclInvalidArgument,
            format!("ncclCommInitAll: {ndev} devices"),
        ))?;
        if comms.is_null() {
            return Err((
                ncclInvalidArgument,
                "ncclCommInitAll: a null pointer".into(),
            ));
        }
        let devices: Vec<CUdevice> = match devlist.is_null() {
            // SAFETY: the caller's list holds `ndev` devices.
            false => unsafe { std::slice::from_raw_parts(devlist, world) }.to_vec(),
            true => (0..ndev).collect(),
        };
        for (rank, &device) in devices.iter().enumerate() {
            if check_device(device).is_err() {
                return Err((
                    ncclUnhandledCudaError,
                    format!("ncclCommInitAll: rank {rank}'s device {device} does not exist"),
                ));
            }
            if devices[..rank].contains(&device) {
                return Err((
                    ncclInvalidUsage,
                    format!("ncclCommInitAll: duplicate GPU detected: device {device} twice"),
                ));
            }
        }
        let clique = Arc::new(());
        for (rank, device) in devices.into_iter().enumerate() {
            let comm = Comm {
                kind: Kind::Clique(clique.clone()),
                rank,
                world,
                device,
            };
            // SAFETY: the caller's array holds `ndev` communicators.
            unsafe { comms.add(rank).write(Box::into_raw(Box::new(comm)).cast()) };
        }
        Ok(())
    })
}

unsafe fn destroy(comm: ncclComm_t) -> ncclResult_t {
    // SAFETY: the caller passes a communicator from ncclCommInitAll, not yet destroyed.
    match unsafe { take_back::<Comm, _>(comm) } {
        true => ncclSuccess,
        false => fail(ncclInvalidArgument, "a null communicator".into()),
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclCommDestroy(comm: ncclComm_t) -> ncclResult_t {
    unsafe { destroy(comm) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclCommAbort(comm: ncclComm_t) -> ncclResult_t {
    // SAFETY: the caller passes a communicator from this library, not yet destroyed.
    if let Some(Comm {
        kind: Kind::Ranks(peers),
        ..
    }) = unsafe { comm.cast::<Comm>().as_ref() }
    {
        peers.abort();
    }
    unsafe { destroy(comm) }
}

#[unsafe(no_mangle)]
pub extern "C" fn ncclGroupStart() -> ncclResult_t {
    GROUP.with_borrow_mut(|(depth, _)| *depth += 1);
    ncclSuccess
}

#[unsafe(no_mangle)]
pub extern "C" fn ncclGroupEnd() -> ncclResult_t {
    let parts = GROUP.with_borrow_mut(|(depth, parts)| match depth {
        0 => None,
        1 => {
            *depth = 0;
            Some(std::mem::take(parts))
        }
        _ => {
            *depth -= 1;
            Some(Vec::new())
        }
    });
    match parts {
        None => fail(
            ncclInvalidUsage,
            "ncclGroupEnd without ncclGroupStart".into(),
        ),
        Some(parts) => result(|| run(parts)),
    }
}

/// Copies the root's buffer into every rank's, for each broadcast of `parts`, once every part is
/// found and agrees.
fn run(parts: Vec<Part>) -> Result<(), (ncclResult_t, String)> {
    // Each clique's parts, rank by rank, in the order recorded.
    let mut cliques: Vec<Vec<Vec<&Part>>> = Vec::new();
    for part in &parts {
        let at = cliques.iter().position(|ranks| {
            ranks
                .iter()
                .flatten()
                .any(|p| Arc::ptr_eq(&p.clique, &part.clique))
        });
        let ranks = match at {
            Some(at) => &mut cliques[at],
            None => {
                cliques.push(vec![Vec::new(); part.comm.world]);
                cliques.last_mut().expect("just pushed")
            }
        };
        ranks[part.comm.rank].push(part);
    }
    for ranks in &cliques {
        let recorded: Vec<usize> = ranks.iter().map(Vec::len).collect();
        if recorded.iter().any(|&n| n != recorded[0]) {
            return Err((
                ncclInvalidUsage,
                format!(
                    "a group ended with broadcasts recorded per rank {recorded:?}: every rank's \
                     part must be recorded in the group (one thread driving a clique would hang \
                     waiting for the others)"
                ),
            ));
        }
        for call in 0..recorded[0] {
            let first = ranks[0][call];
            for part in ranks.iter().map(|calls| calls[call]) {
                if (part.bytes, part.datatype, part.root)
                    != (first.bytes, first.datatype, first.root)
                {
                    return Err((
                        ncclInvalidUsage,
                        format!(
                            "broadcast {call} of a group: rank {} asks for {} bytes of type {} from \
                             root {}, rank 0 for {} bytes of type {} from root {}",
                            part.comm.rank,
                            part.bytes,
                            part.datatype,
                            part.root,
                            first.bytes,
                            first.datatype,
                            first.root
                        ),
                    ));
                }
            }
        }
    }
    for ranks in &cliques {
        for call in 0..ranks[0].len() {
            let source = ranks[ranks[0][call].root][call];
            let broadcast = Arc::new(Broadcast {
                send: source.send as usize,
                receive: ranks
                    .iter()
                    .map(|calls| calls[call].receive as usize)
                    .collect(),
                bytes: source.bytes,
                devices: ranks.iter().map(|calls| calls[call].comm.device).collect(),
                root: source.comm.rank,
                parts: OnceLock::new(),
                done: Mutex::new(false),
            });
            let mut queued = Vec::new();
            for (rank, part) in ranks.iter().map(|calls| calls[call]).enumerate() {
                let work = {
                    let broadcast = broadcast.clone();
                    Box::new(move || broadcast.run(rank))
                };
                // SAFETY: a stream checked when the part was recorded, not the null one: the part runs
                // when the stream is waited for, once `parts` is set below.
                let at = unsafe { streams::queue(part.stream as *mut _, work) }
                    .map_err(|e| (ncclUnhandledCudaError, format!("ncclGroupEnd: {e:?}")))?;
                queued.push(at.expect("queued on a stream"));
            }
            let _ = broadcast.parts.set(queued);
        }
    }
    if let Some(last) = parts.last() {
        CURRENT.set(token(last.comm.device as usize).cast());
    }
    Ok(())
}

/// One broadcast of a group, its part queued on every rank's stream.
struct Broadcast {
    send: usize,
    receive: Vec<usize>,
    bytes: usize,
    /// Each rank's device, and the root's rank.
    devices: Vec<CUdevice>,
    root: usize,
    /// Where each rank's part is queued.
    parts: OnceLock<Vec<(Arc<Stream>, u64)>>,
    done: Mutex<bool>,
}

impl Broadcast {
    /// Rank `rank`'s stream got to its part: the others' streams run up to theirs, then the root's
    /// buffer is copied to every rank's, once.
    fn run(&self, rank: usize) -> Result<(), CUresult> {
        // Another thread's synchronisation may get to a part before the thread ending the group has
        // queued them all.
        let parts = self.parts.wait();
        for (other, (stream, seq)) in parts.iter().enumerate() {
            if other != rank {
                stream.drain(seq - 1)?;
            }
        }
        let mut done = self
            .done
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !*done {
            // Memory freed since the parts were recorded is refused, not touched.
            for (rank, &buffer) in self.receive.iter().enumerate() {
                check_on(buffer, self.bytes, self.devices[rank])?;
            }
            check_on(self.send, self.bytes, self.devices[self.root])?;
            for &receive in &self.receive {
                // SAFETY: both buffers were checked inside allocations of `bytes` when recorded;
                // the root's may be its own receive buffer.
                unsafe { std::ptr::copy(self.send as *const u8, receive as *mut u8, self.bytes) };
            }
            *done = true;
        }
        Ok(())
    }
}

/// Refuses the null stream (msa-cuda-emulator queues NCCL's work on its rank's own stream) and a
/// stream of another device than `comm`'s.
///
/// # Safety
/// `stream` is null or a stream handle from cuStreamCreate.
pub(crate) unsafe fn check_stream(
    call: &str,
    comm: &Comm,
    stream: cudaStream_t,
) -> Result<(), (ncclResult_t, String)> {
    if stream.is_null() {
        return Err((
            ncclInvalidArgument,
            format!(
                "{call}: rank {} on the null stream (msa-cuda-emulator queues NCCL's work on each \
                 rank's own stream)",
                comm.rank
            ),
        ));
    }
    // SAFETY: as the caller promises.
    let on = unsafe { stream_device(stream.cast()) };
    if on != Ok(comm.device) {
        return Err((
            ncclUnhandledCudaError,
            format!(
                "{call}: rank {} of device {} queued on a stream of device {on:?}",
                comm.rank, comm.device
            ),
        ));
    }
    Ok(())
}

/// Records one rank's part of a broadcast of `count` elements from rank `root`'s `send` into every
/// rank's `receive`; it runs at the end of the group (at once outside one).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclBroadcast(
    send: *const c_void,
    receive: *mut c_void,
    count: usize,
    datatype: u32,
    root: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    // SAFETY: the caller passes a communicator from ncclCommInitAll, not yet destroyed.
    let Some(comm) = (unsafe { comm.cast::<Comm>().as_ref() }) else {
        return fail(
            ncclInvalidArgument,
            "ncclBroadcast: a null communicator".into(),
        );
    };
    let recorded = result(|| {
        let invalid = |why: String| (ncclInvalidArgument, format!("ncclBroadcast: {why}"));
        let clique = comm.clique().ok_or((
            ncclInvalidUsage,
            "ncclBroadcast on a communicator of ncclCommInitRank: msa-cuda-emulator broadcasts \
             within cliques of ncclCommInitAll only"
                .to_string(),
        ))?;
        let size = element_size(datatype).ok_or_else(|| invalid(format!("type {datatype}")))?;
        let root = usize::try_from(root)
            .ok()
            .filter(|&r| r < comm.world)
            .ok_or_else(|| invalid(format!("root {root} of a clique of {}", comm.world)))?;
        let bytes = count
            .checked_mul(size)
            .ok_or_else(|| invalid(format!("{count} elements")))?;
        let is_root = comm.rank == root;
        if receive.is_null() || (is_root && send.is_null()) {
            return Err(invalid(format!("a null buffer on rank {}", comm.rank)));
        }
        // A part on the null stream would run at once, before the others are queued.
        // SAFETY: a stream handle from cuStreamCreate, or null.
        unsafe { check_stream("ncclBroadcast", comm, stream) }?;
        let mut buffers = vec![receive as usize];
        if is_root {
            buffers.push(send as usize);
        }
        for buffer in buffers {
            check_on(buffer, bytes, comm.device).map_err(|e: CUresult| {
                (
                    ncclUnhandledCudaError,
                    format!("ncclBroadcast: rank {}'s buffer: {e:?}", comm.rank),
                )
            })?;
        }
        let part = Part {
            comm: comm.clone(),
            clique: clique.clone(),
            send: send.cast(),
            receive: receive.cast(),
            bytes,
            datatype,
            root,
            stream: stream as usize,
        };
        GROUP.with_borrow_mut(|(_, parts)| parts.push(part));
        Ok(())
    });
    if recorded != ncclSuccess {
        return recorded;
    }
    // Outside a group, the call is a group of its own.
    match GROUP.with_borrow(|(depth, _)| *depth) {
        0 => {
            let parts = GROUP.with_borrow_mut(|(_, parts)| std::mem::take(parts));
            result(|| run(parts))
        }
        _ => ncclSuccess,
    }
}

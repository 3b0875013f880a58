//! NCCL cliques: CUDA devices of this process, one per GPU, that copy tensors to each other without the
//! host (Memory Parallel's router queries, [`msa_engine::Backend::broadcast`]).

use std::ffi::CStr;
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;
use cudarc::nccl::result::NcclError;
use cudarc::nccl::safe::{Comm, group_end, group_start};
use msa_engine::{Error, Result};

use crate::backend::{CudaBackend, CudaTensor};
use crate::device::{guarded, unavailable};

/// Why NCCL cannot be used, or `None` when its library loads. Checked before any NCCL call, since
/// cudarc panics on a missing library.
pub fn nccl_missing() -> Option<String> {
    // SAFETY: only tries to dlopen the library by its usual names.
    let present = unsafe { cudarc::nccl::sys::is_culib_present() };
    (!present).then(|| {
        "NCCL (libnccl.so) could not be loaded: install NCCL (libnccl2 and libnccl-dev), or link the \
         nvidia-nccl wheel's libnccl.so.2 as libnccl.so, on LD_LIBRARY_PATH"
            .into()
    })
}

/// The NCCL version as `major.minor.patch`, or why NCCL cannot be used.
pub fn nccl_version() -> Result<String> {
    if let Some(missing) = nccl_missing() {
        return Err(unavailable(missing));
    }
    let code =
        guarded(cudarc::nccl::result::get_nccl_version)?.map_err(|e| nccl_error("version", e))?;
    Ok(format!(
        "{}.{}.{}",
        code / 10000,
        code % 10000 / 100,
        code % 100
    ))
}

/// One communicator per member, in rank order.
pub(crate) struct Clique {
    comms: Mutex<Comms>,
    world: usize,
}

struct Comms(Vec<Comm>);

// SAFETY: a communicator is a handle any thread may use, one call at a time: the clique's lock
// serialises them, and one thread records every rank's part of a collective inside one NCCL group.
unsafe impl Send for Comms {}

/// A backend's place in its clique.
#[derive(Clone)]
pub(crate) struct Member {
    clique: Arc<Clique>,
    rank: usize,
}

pub(crate) fn nccl_error(what: &str, e: NcclError) -> Error {
    // SAFETY: both return static strings NCCL owns (the last error of this thread, or empty).
    // `ncclGetLastError` came with NCCL 2.13: an older library has none to look up.
    let text = |s: *const std::ffi::c_char| unsafe { CStr::from_ptr(s) }.to_string_lossy();
    let name = guarded(|| text(unsafe { cudarc::nccl::sys::ncclGetErrorString(e.0) }).into_owned());
    let detail = guarded(|| {
        text(unsafe { cudarc::nccl::sys::ncclGetLastError(std::ptr::null_mut()) }).into_owned()
    });
    let mut message = format!(
        "NCCL {what}: {}",
        name.unwrap_or_else(|_| format!("{:?}", e.0))
    );
    if let Some(detail) = detail.ok().filter(|d| !d.is_empty()) {
        message.push_str(&format!(" ({detail})"));
    }
    unavailable(message)
}

/// An open NCCL group, ended when dropped, also when recording a part of it panics: a group left open
/// would swallow every later collective this thread records.
struct Group;

impl Group {
    fn start() -> Result<Group> {
        group_start().map_err(|e| nccl_error("group", e))?;
        Ok(Group)
    }

    /// Ends the group: NCCL launches what it holds.
    fn end(self) -> Result<()> {
        std::mem::forget(self);
        group_end()
            .map(drop)
            .map_err(|e| nccl_error("broadcast", e))
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let _ = group_end();
    }
}

impl CudaBackend {
    /// Joins `backends`, one per GPU, into an NCCL clique: from then on [`Backend::broadcast`] from
    /// any of them to the others copies device to device. A missing NCCL library, two backends on one
    /// GPU (NCCL refuses them) or a failed set-up is an error, and the backends stay as they were.
    ///
    /// [`Backend::broadcast`]: msa_engine::Backend::broadcast
    pub fn join_clique(backends: &mut [CudaBackend]) -> Result<()> {
        if backends.is_empty() {
            return Err(unavailable("an NCCL clique of no device"));
        }
        let ordinals: Vec<usize> = backends.iter().map(|b| b.ordinal()).collect();
        for (i, ordinal) in ordinals.iter().enumerate() {
            if let Some(j) = ordinals[..i].iter().position(|o| o == ordinal) {
                return Err(unavailable(format!(
                    "an NCCL clique takes one device per GPU: devices {j} and {i} are both CUDA \
                     device {ordinal}"
                )));
            }
        }
        nccl_version()?;
        let streams = backends.iter().map(|b| b.device.stream.clone()).collect();
        let comms = guarded(|| Comm::from_devices(streams))?
            .map_err(|e| nccl_error("set-up of the clique", e))?;
        let clique = Arc::new(Clique {
            world: comms.len(),
            comms: Mutex::new(Comms(comms)),
        });
        for (rank, backend) in backends.iter_mut().enumerate() {
            backend.member = Some(Member {
                clique: clique.clone(),
                rank,
            });
        }
        Ok(())
    }

    /// [`Backend::broadcast`] through NCCL: `None` unless this backend and every peer are members of one
    /// clique, and the peers are all its other members (this one may be among them), each once.
    ///
    /// [`Backend::broadcast`]: msa_engine::Backend::broadcast
    pub(crate) fn broadcast_in_clique(
        &self,
        tensor: &CudaTensor,
        peers: &[&CudaBackend],
    ) -> Option<Result<Vec<CudaTensor>>> {
        let root = self.member.as_ref()?;
        // Which peer each rank copies into; a collective needs every rank but the root's.
        let mut destination: Vec<Option<usize>> = vec![None; root.clique.world];
        for (i, peer) in peers.iter().enumerate() {
            let member = peer.member.as_ref()?;
            if !Arc::ptr_eq(&member.clique, &root.clique)
                || destination[member.rank].replace(i).is_some()
            {
                return None;
            }
        }
        if (0..root.clique.world).any(|rank| rank != root.rank && destination[rank].is_none()) {
            return None;
        }
        Some(guarded(|| self.broadcast_to(root, tensor, peers, &destination)).and_then(|r| r))
    }

    fn broadcast_to(
        &self,
        root: &Member,
        tensor: &CudaTensor,
        peers: &[&CudaBackend],
        destination: &[Option<usize>],
    ) -> Result<Vec<CudaTensor>> {
        let len = tensor.len();
        // Each copy lands in memory of its peer's stream, the stream its communicator runs on; a root
        // outside `peers` receives into scratch memory, as an out-of-place broadcast needs.
        let mut received = peers
            .iter()
            .map(|peer| peer.alloc::<f32>(len))
            .collect::<Result<Vec<CudaSlice<f32>>>>()?;
        let mut scratch = match destination[root.rank] {
            Some(_) => None,
            None => Some(self.alloc::<f32>(len)?),
        };
        // A panic while a broadcast was recorded may have left some ranks waiting for the others.
        let comms = root
            .clique
            .comms
            .lock()
            .map_err(|_| unavailable("the NCCL clique broke in an earlier broadcast"))?;
        let group = Group::start()?;
        let mut recorded = Ok(());
        // Every rank's part is recorded, even after one fails, so the group can end.
        for (rank, comm) in comms.0.iter().enumerate() {
            let sent = (rank == root.rank).then_some(tensor.data.as_ref());
            let into = match (destination[rank], &mut scratch) {
                (Some(i), _) => &mut received[i],
                (None, Some(scratch)) => scratch,
                (None, None) => unreachable!("every rank but the root's has a peer"),
            };
            let result = comm.broadcast(sent, into, root.rank as i32);
            if recorded.is_ok() {
                recorded = result.map(drop).map_err(|e| nccl_error("broadcast", e));
            }
        }
        let ended = group.end();
        // NCCL switches devices as it records each rank's part.
        self.device
            .stream
            .context()
            .bind_to_thread()
            .map_err(|e| self.device.error(e))?;
        recorded.and(ended)?;
        Ok(received
            .into_iter()
            .map(|data| CudaBackend::wrap(data, tensor.shape.clone()))
            .collect())
    }
}

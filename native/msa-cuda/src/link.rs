//! Device links ([`msa_engine::DeviceLink`]): NCCL communicators of two ranks, this process's GPU and
//! one in another process or on another machine, which carry a remote shard's router queries GPU to
//! GPU. The end that asks makes an NCCL unique id ([`Backend::link_rendezvous`]) and hands it to the
//! other over a connection it has (msa-shard's TCP connection); both then join
//! ([`Backend::join_link`]). NCCL picks the transport: NVLink or PCIe on one machine, InfiniBand or
//! sockets between machines.
//!
//! [`Backend::link_rendezvous`]: msa_engine::Backend::link_rendezvous
//! [`Backend::join_link`]: msa_engine::Backend::join_link

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaEvent, CudaStream};

use cudarc::nccl::safe::{Comm, Id};
use msa_engine::{DeviceLink, Result};

use crate::backend::{CudaBackend, CudaTensor};
use crate::clique::{nccl_error, nccl_version};
use crate::device::{guarded, unavailable};

/// Bytes of an NCCL unique id.
const ID_BYTES: usize = 128;

/// One end of a link: its communicator until aborted, on a stream of its own, so a transfer waiting for
/// the other end holds up neither this backend's stream nor the transfers of its other links (two
/// processes each linked to the same two others may send to them in opposite orders).
struct NcclLink {
    backend: CudaBackend,
    stream: Arc<CudaStream>,
    comm: Mutex<Option<LinkComm>>,
    /// The last tensor sent and the event its send completes: held until the next send, when the
    /// backend's stream waits for that event before the tensor can be freed there. (By then the
    /// send is done: the other end received it before answering the request it came with.)
    in_flight: Mutex<Option<(CudaTensor, CudaEvent)>>,
    peer: i32,
    describe: String,
}

struct LinkComm(Comm);

// SAFETY: a communicator is a handle any thread may use, one call at a time: the lock serialises them.
unsafe impl Send for LinkComm {}

impl CudaBackend {
    /// `"NCCL x.y.z"` where NCCL loads: both ends of a link must run the same version.
    pub(crate) fn nccl_link_kind(&self) -> Option<String> {
        nccl_version().ok().map(|version| format!("NCCL {version}"))
    }

    /// A new NCCL unique id, as bytes.
    pub(crate) fn nccl_rendezvous(&self) -> Result<Vec<u8>> {
        nccl_version()?;
        let id = guarded(Id::new)?.map_err(|e| nccl_error("unique id", e))?;
        Ok(id.internal().iter().map(|&c| c as u8).collect())
    }

    /// Joins the two-rank communicator of `rendezvous` as rank `end`, on a new stream.
    pub(crate) fn join_nccl_link(
        &self,
        rendezvous: &[u8],
        end: usize,
    ) -> Result<Box<dyn DeviceLink<CudaBackend>>> {
        let version = nccl_version()?;
        let internal: [u8; ID_BYTES] = rendezvous.try_into().map_err(|_| {
            unavailable(format!(
                "an NCCL link's rendezvous is a unique id of {ID_BYTES} bytes, not {}",
                rendezvous.len()
            ))
        })?;
        if end > 1 {
            return Err(unavailable(format!("a link has ends 0 and 1, not {end}")));
        }
        let device = &self.device;
        let context = device.stream.context();
        let stream = context.new_stream().map_err(|e| device.error(e))?;
        // NCCL joins on the current device.
        context.bind_to_thread().map_err(|e| device.error(e))?;
        let id = Id::uninit(internal.map(|b| b as std::ffi::c_char));
        let comm = guarded(|| Comm::from_rank(stream.clone(), end, 2, id))?
            .map_err(|e| nccl_error("set-up of the link", e))?;
        Ok(Box::new(NcclLink {
            backend: self.clone(),
            stream,
            comm: Mutex::new(Some(LinkComm(comm))),
            in_flight: Mutex::new(None),
            peer: 1 - end as i32,
            describe: format!(
                "NCCL {version} from CUDA device {} (end {end} of the link)",
                self.ordinal()
            ),
        }))
    }
}

/// A link's lock, also after a panic while it was held (the communicator is then aborted or unused).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl NcclLink {
    /// Runs `call` with the communicator, this backend's context current.
    fn with_comm<T>(&self, call: impl FnOnce(&Comm) -> Result<T>) -> Result<T> {
        let comm = (self.comm.lock())
            .map_err(|_| unavailable("the NCCL link broke in an earlier transfer"))?;
        let comm = comm
            .as_ref()
            .ok_or_else(|| unavailable("the NCCL link was aborted"))?;
        let device = &self.backend.device;
        (device.stream.context().bind_to_thread()).map_err(|e| device.error(e))?;
        guarded(|| call(&comm.0))?
    }

    /// Lets the backend's stream free the last tensor sent once its send is done.
    fn release(&self, sent: Option<(CudaTensor, CudaEvent)>) -> Result<()> {
        match sent {
            Some((tensor, done)) => {
                let device = &self.backend.device;
                let waited = device.stream.wait(&done).map_err(|e| device.error(e));
                drop(tensor);
                waited
            }
            None => Ok(()),
        }
    }
}

impl DeviceLink<CudaBackend> for NcclLink {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn send(&self, tensor: &CudaTensor) -> Result<()> {
        let device = &self.backend.device;
        let done = self.with_comm(|comm| {
            // After the ops that wrote the tensor; only its elements (its allocation may be longer).
            self.stream
                .join(&device.stream)
                .map_err(|e| device.error(e))?;
            let elements = tensor.data.slice(0..tensor.len());
            comm.send(&elements, self.peer)
                .map_err(|e| nccl_error("send over the link", e))?;
            self.stream.record_event(None).map_err(|e| device.error(e))
        })?;
        let sent = (tensor.clone(), done);
        let previous = lock(&self.in_flight).replace(sent);
        self.release(previous)
    }

    fn receive(&self, shape: &[usize]) -> Result<CudaTensor> {
        let len = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let len = len.ok_or_else(|| {
            unavailable(format!("a receive of shape {shape:?}: too many elements"))
        })?;
        let mut data = self.backend.alloc::<f32>(len)?;
        let device = &self.backend.device;
        self.with_comm(|comm| {
            // The buffer is allocated in the backend's stream's order; the ops after it read it.
            self.stream
                .join(&device.stream)
                .map_err(|e| device.error(e))?;
            let mut elements = data.slice_mut(0..len);
            comm.recv(&mut elements, self.peer)
                .map_err(|e| nccl_error("receive over the link", e))?;
            device
                .stream
                .join(&self.stream)
                .map_err(|e| device.error(e))
        })?;
        Ok(CudaBackend::wrap(data, shape.to_vec()))
    }

    fn abort(&self) {
        let taken = lock(&self.comm).take();
        // Dropping the communicator aborts it (ncclCommAbort), which ends its kernels; a failed
        // abort (cudarc panics on one) leaves nothing more to do.
        let _ = guarded(|| drop(taken));
    }
}

impl Drop for NcclLink {
    fn drop(&mut self) {
        self.abort();
        let sent = lock(&self.in_flight).take();
        let _ = self.release(sent);
    }
}

//! NCCL communicators whose ranks may live in different processes (`ncclGetUniqueId`,
//! `ncclCommInitRank`), and their point-to-point transfers (`ncclSend`, `ncclRecv`), as msa-cuda's
//! device links to shard servers use them.
//!
//! As in NCCL, the unique id names a bootstrap listener: the process that made it holds a TCP socket
//! on 127.0.0.1, and the other ranks connect to it. So the ranks must run on this machine, and rank 0
//! must join in the process that made the id (NCCL lets any rank hold it). Rank 0 keeps one socket to
//! each other rank and transfers cross them, so only transfers between rank 0 and another rank are
//! emulated. At set-up, rank 0 checks what NCCL checks: one world size, ranks each once, and one GPU
//! per rank (every rank is on this machine, so two ranks on one device are refused, across processes
//! too).
//!
//! A send or receive is queued on its stream: a receive runs when the stream is waited for, reading
//! from the socket, and checks that the two sides agree on the bytes and type (a GPU would hang or
//! corrupt memory). A send runs as soon as its stream gets to it, without waiting for a wait (a thread
//! of its own drains the stream to it), since the other rank may wait for it while nothing here waits:
//! so work queued before a send on its stream is not held back as [`crate::streams`] holds other work.
//! A transfer that fails fails its stream, unless its communicator was aborted: `ncclCommAbort` shuts
//! its sockets down, and transfers waiting on them end without an error, their data undefined. Transfers are
//! queued as they are called, inside a group or not: msa-cuda never pairs a send with a receive on one
//! thread, which a real group would need.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUresult;
use cudarc::nccl::sys::{cudaStream_t, ncclComm_t, ncclResult_t, ncclUniqueId};

use crate::nccl::{Comm, Kind, check_stream, element_size, fail, result};
use crate::{check_device, check_on, current_device, machine_device, streams};
use ncclResult_t::{
    ncclInvalidArgument, ncclInvalidUsage, ncclSystemError, ncclUnhandledCudaError,
};

/// Starts the id, before the bootstrap's address.
const MAGIC: &[u8] = b"msa-cuda-emulator nccl ";

/// How long set-up waits for the other ranks (NCCL waits for ever; a test should not).
const SET_UP: Duration = Duration::from_secs(60);

/// Bootstrap listeners of the ids this process made, by address, until rank 0 joins.
static BOOTSTRAPS: Mutex<Option<HashMap<String, TcpListener>>> = Mutex::new(None);

/// A communicator's sockets, by rank: rank 0 holds one to every other rank, the others one to rank 0.
pub(crate) struct Peers {
    sockets: Vec<Option<Socket>>,
    /// Set by `ncclCommAbort`.
    aborted: AtomicBool,
}

impl Peers {
    /// `ncclCommAbort`: transfers waiting on a socket end, without an error (as NCCL's kernels end
    /// when their communicator is aborted), and so do later ones.
    pub(crate) fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        for socket in self.sockets.iter().flatten() {
            let _ = socket.stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A connection to one rank; a send and a receive may cross it at once, each direction one at a time.
struct Socket {
    stream: TcpStream,
    sending: Mutex<()>,
    receiving: Mutex<()>,
}

impl Socket {
    fn new(stream: TcpStream) -> Socket {
        Socket {
            stream,
            sending: Mutex::new(()),
            receiving: Mutex::new(()),
        }
    }
}

type Failure = (ncclResult_t, String);

fn system(what: &str) -> impl Fn(std::io::Error) -> Failure + '_ {
    move |e| (ncclSystemError, format!("{what}: {e}"))
}

/// A new unique id: the address of a bootstrap listener of this process.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclGetUniqueId(id: *mut ncclUniqueId) -> ncclResult_t {
    result(|| {
        if id.is_null() {
            return Err((
                ncclInvalidArgument,
                "ncclGetUniqueId: a null pointer".into(),
            ));
        }
        let listener = TcpListener::bind("127.0.0.1:0").map_err(system("ncclGetUniqueId"))?;
        let address = listener
            .local_addr()
            .map_err(system("ncclGetUniqueId"))?
            .to_string();
        let mut internal = [0 as std::ffi::c_char; 128];
        for (to, &byte) in internal
            .iter_mut()
            .zip(MAGIC.iter().chain(address.as_bytes()))
        {
            *to = byte as std::ffi::c_char;
        }
        let mut bootstraps = BOOTSTRAPS.lock().unwrap_or_else(|p| p.into_inner());
        bootstraps.get_or_insert_default().insert(address, listener);
        // SAFETY: a non-null out-pointer.
        unsafe { id.write(ncclUniqueId { internal }) };
        Ok(())
    })
}

/// The bootstrap address an id names.
fn address(id: &ncclUniqueId) -> Option<String> {
    let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
    let text = bytes.strip_prefix(MAGIC)?;
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    String::from_utf8(text[..end].to_vec()).ok()
}

/// Rank `rank` of `nranks`, on the current context's device, of the communicator `id` names. Waits
/// for every rank to join.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclCommInitRank(
    comm: *mut ncclComm_t,
    nranks: c_int,
    id: ncclUniqueId,
    rank: c_int,
) -> ncclResult_t {
    result(|| {
        let invalid = |why: String| (ncclInvalidArgument, format!("ncclCommInitRank: {why}"));
        let world = usize::try_from(nranks)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| invalid(format!("{nranks} ranks")))?;
        let rank = usize::try_from(rank)
            .ok()
            .filter(|&r| r < world)
            .ok_or_else(|| invalid(format!("rank {rank} of {world}")))?;
        if comm.is_null() {
            return Err(invalid("a null pointer".into()));
        }
        let device = current_device()
            .and_then(|d| check_device(d).map(|()| d))
            .map_err(|e| {
                (
                    ncclUnhandledCudaError,
                    format!("ncclCommInitRank: no current device ({e:?})"),
                )
            })?;
        let address =
            address(&id).ok_or_else(|| invalid("an id not made by ncclGetUniqueId".into()))?;
        let sockets = match rank {
            0 => accept_ranks(&address, world, machine_device(device))?,
            _ => join_root(&address, rank, world, machine_device(device))?,
        };
        let peers = Arc::new(Peers {
            sockets,
            aborted: AtomicBool::new(false),
        });
        let made = Comm {
            kind: Kind::Ranks(peers),
            rank,
            world,
            device,
        };
        // SAFETY: a non-null out-pointer.
        unsafe { comm.write(Box::into_raw(Box::new(made)).cast()) };
        Ok(())
    })
}

/// What each rank tells rank 0 on joining: rank, world size and device of the machine.
fn hello(rank: usize, world: usize, device: i32) -> [u8; 12] {
    let mut bytes = [0; 12];
    bytes[..4].copy_from_slice(&(rank as u32).to_le_bytes());
    bytes[4..8].copy_from_slice(&(world as u32).to_le_bytes());
    bytes[8..].copy_from_slice(&device.to_le_bytes());
    bytes
}

/// Rank 0: takes every other rank's connection on the id's bootstrap, checks them, and answers each
/// with an empty message (joined) or why the set-up failed.
fn accept_ranks(address: &str, world: usize, device: i32) -> Result<Vec<Option<Socket>>, Failure> {
    let listener = BOOTSTRAPS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_default()
        .remove(address)
        .ok_or((
            ncclInvalidUsage,
            format!(
                "ncclCommInitRank: rank 0 of the id of {address} joins in a process without its \
                 bootstrap, or the id was used already (msa-cuda-emulator's rank 0 joins in the \
                 process that made the id, once)"
            ),
        ))?;
    let setup = system("ncclCommInitRank: bootstrap");
    listener.set_nonblocking(true).map_err(&setup)?;
    let deadline = Instant::now() + SET_UP;
    let mut joined: Vec<(TcpStream, usize, usize, i32)> = Vec::new();
    while joined.len() + 1 < world {
        let socket = match listener.accept() {
            Ok((socket, _)) => socket,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err((
                    ncclSystemError,
                    format!(
                        "ncclCommInitRank: {} of the {} other ranks joined within {} s",
                        joined.len(),
                        world - 1,
                        SET_UP.as_secs()
                    ),
                ));
            }
            Err(e) => return Err(setup(e)),
        };
        socket.set_nonblocking(false).map_err(&setup)?;
        socket.set_read_timeout(Some(SET_UP)).map_err(&setup)?;
        let mut hello = [0u8; 12];
        (&socket).read_exact(&mut hello).map_err(&setup)?;
        let word = |i: usize| u32::from_le_bytes(hello[i..i + 4].try_into().expect("4 bytes"));
        joined.push((socket, word(0) as usize, word(4) as usize, word(8) as i32));
    }
    let mut problem = None;
    for (i, &(_, rank, their_world, their_device)) in joined.iter().enumerate() {
        let earlier = &joined[..i];
        problem = problem.or(if their_world != world {
            Some(format!(
                "rank {rank} joined a world of {their_world}, rank 0 one of {world}"
            ))
        } else if rank == 0 || rank >= world || earlier.iter().any(|j| j.1 == rank) {
            Some(format!(
                "rank {rank} of {world} joined twice, or is out of range"
            ))
        } else if their_device == device || earlier.iter().any(|j| j.3 == their_device) {
            Some(format!(
                "duplicate GPU detected: rank {rank} is on device {their_device} of this machine, \
                 as another rank is"
            ))
        } else {
            None
        });
    }
    let answer = problem.clone().unwrap_or_default();
    let mut sockets: Vec<Option<Socket>> = (0..world).map(|_| None).collect();
    for (mut socket, rank, ..) in joined {
        let _ = send_message(&mut socket, &answer);
        socket.set_read_timeout(None).map_err(&setup)?;
        if rank < world {
            sockets[rank] = Some(Socket::new(socket));
        }
    }
    match problem {
        Some(why) => Err((ncclInvalidUsage, format!("ncclCommInitRank: {why}"))),
        None => Ok(sockets),
    }
}

/// Any other rank: connects to rank 0's bootstrap and waits for its answer.
fn join_root(
    address: &str,
    rank: usize,
    world: usize,
    device: i32,
) -> Result<Vec<Option<Socket>>, Failure> {
    let mut socket = TcpStream::connect(address).map_err(|e| {
        (
            ncclSystemError,
            format!("ncclCommInitRank: cannot reach the bootstrap of the id at {address}: {e}"),
        )
    })?;
    let setup = system("ncclCommInitRank: bootstrap");
    socket.set_nodelay(true).map_err(&setup)?;
    socket.set_read_timeout(Some(SET_UP)).map_err(&setup)?;
    socket
        .write_all(&hello(rank, world, device))
        .map_err(&setup)?;
    let answer = receive_message(&mut socket).map_err(&setup)?;
    if !answer.is_empty() {
        return Err((ncclInvalidUsage, format!("ncclCommInitRank: {answer}")));
    }
    socket.set_read_timeout(None).map_err(&setup)?;
    let mut sockets: Vec<Option<Socket>> = (0..world).map(|_| None).collect();
    sockets[0] = Some(Socket::new(socket));
    Ok(sockets)
}

fn send_message(to: &mut TcpStream, text: &str) -> std::io::Result<()> {
    to.write_all(&(text.len() as u32).to_le_bytes())?;
    to.write_all(text.as_bytes())
}

fn receive_message(from: &mut TcpStream) -> std::io::Result<String> {
    let mut len = [0u8; 4];
    from.read_exact(&mut len)?;
    let mut text = vec![0u8; u32::from_le_bytes(len) as usize];
    from.read_exact(&mut text)?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// Which way a transfer goes.
#[derive(Clone, Copy)]
enum Direction {
    Send,
    Receive,
}

/// Queues one side of a transfer of `count` elements between `buffer` and rank `peer`.
///
/// # Safety
/// `comm` is a communicator from this library, not yet destroyed; `stream` a stream handle.
unsafe fn transfer(
    direction: Direction,
    buffer: usize,
    count: usize,
    datatype: u32,
    peer: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    let call = match direction {
        Direction::Send => "ncclSend",
        Direction::Receive => "ncclRecv",
    };
    // SAFETY: as the caller promises.
    let Some(comm) = (unsafe { comm.cast::<Comm>().as_ref() }) else {
        return fail(ncclInvalidArgument, format!("{call}: a null communicator"));
    };
    result(|| {
        let invalid = |why: String| (ncclInvalidArgument, format!("{call}: {why}"));
        let Kind::Ranks(peers) = &comm.kind else {
            return Err((
                ncclInvalidUsage,
                format!(
                    "{call} within a clique of ncclCommInitAll: msa-cuda-emulator transfers \
                     point to point on communicators of ncclCommInitRank only"
                ),
            ));
        };
        let size = element_size(datatype).ok_or_else(|| invalid(format!("type {datatype}")))?;
        let bytes = count
            .checked_mul(size)
            .ok_or_else(|| invalid(format!("{count} elements")))?;
        let peer = usize::try_from(peer)
            .ok()
            .filter(|&p| p < comm.world && p != comm.rank)
            .ok_or_else(|| {
                invalid(format!(
                    "peer {peer} of rank {} of {}",
                    comm.rank, comm.world
                ))
            })?;
        let Some(_) = &peers.sockets[peer] else {
            return Err((
                ncclInvalidUsage,
                format!(
                    "{call} between ranks {} and {peer}: msa-cuda-emulator transfers between rank \
                     0 and another rank only",
                    comm.rank
                ),
            ));
        };
        if buffer == 0 {
            return Err(invalid(format!("a null buffer on rank {}", comm.rank)));
        }
        // SAFETY: a stream handle from cuStreamCreate, or null.
        unsafe { check_stream(call, comm, stream) }?;
        check_on(buffer, bytes, comm.device).map_err(|e: CUresult| {
            (
                ncclUnhandledCudaError,
                format!("{call}: rank {}'s buffer: {e:?}", comm.rank),
            )
        })?;
        let (peers, device, rank) = (peers.clone(), comm.device, comm.rank);
        let work = Box::new(move || {
            let socket = peers.sockets[peer].as_ref().expect("checked when queued");
            let turn = match direction {
                Direction::Send => &socket.sending,
                Direction::Receive => &socket.receiving,
            };
            let _turn = turn.lock().unwrap_or_else(|p| p.into_inner());
            // Memory freed since the call is refused, not touched.
            check_on(buffer, bytes, device)?;
            let mut stream = &socket.stream;
            let moved = match direction {
                Direction::Send => send(&mut stream, buffer, bytes, datatype),
                Direction::Receive => receive(&mut stream, buffer, bytes, datatype),
            };
            match moved {
                Err(_) if peers.aborted.load(Ordering::SeqCst) => Ok(()),
                Err(why) => {
                    eprintln!("msa-cuda-emulator (NCCL): {call} from rank {rank} to {peer}: {why}");
                    Err(CUresult::CUDA_ERROR_LAUNCH_FAILED)
                }
                Ok(()) => Ok(()),
            }
        });
        // SAFETY: a stream handle checked above, not the null one.
        let queued = unsafe { streams::queue(stream.cast(), work) }
            .map_err(|e| (ncclUnhandledCudaError, format!("{call}: {e:?}")))?;
        // The other rank may wait for this send without anyone here waiting for it, as a GPU runs
        // its streams on its own: a thread of its own gets the stream to it.
        if let (Direction::Send, Some((stream, seq))) = (direction, queued) {
            std::thread::spawn(move || stream.drain(seq));
        }
        Ok(())
    })
}

/// Writes `bytes` at `buffer`, after their length and type.
fn send(socket: &mut &TcpStream, buffer: usize, bytes: usize, datatype: u32) -> Result<(), String> {
    let mut header = [0u8; 12];
    header[..8].copy_from_slice(&(bytes as u64).to_le_bytes());
    header[8..].copy_from_slice(&datatype.to_le_bytes());
    // SAFETY: checked inside one live allocation of `bytes` just before.
    let data = unsafe { std::slice::from_raw_parts(buffer as *const u8, bytes) };
    socket
        .write_all(&header)
        .and_then(|()| socket.write_all(data))
        .map_err(|e| format!("the peer is gone ({e})"))
}

/// Reads a send of the same length and type into `buffer`.
fn receive(
    socket: &mut &TcpStream,
    buffer: usize,
    bytes: usize,
    datatype: u32,
) -> Result<(), String> {
    let gone = |e: std::io::Error| format!("the peer is gone ({e})");
    let mut header = [0u8; 12];
    socket.read_exact(&mut header).map_err(gone)?;
    let sent = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
    let sent_type = u32::from_le_bytes(header[8..].try_into().expect("4 bytes"));
    if (sent, sent_type) != (bytes as u64, datatype) {
        return Err(format!(
            "a send of {sent} bytes of type {sent_type} met a receive of {bytes} bytes of type \
             {datatype} (a GPU would hang or corrupt memory)"
        ));
    }
    // SAFETY: checked inside one live allocation of `bytes` just before.
    let data = unsafe { std::slice::from_raw_parts_mut(buffer as *mut u8, bytes) };
    socket.read_exact(data).map_err(gone)
}

/// Queues a send of `count` elements at `send` to rank `peer`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclSend(
    send: *const c_void,
    count: usize,
    datatype: u32,
    peer: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    // SAFETY: as the caller promises NCCL.
    unsafe {
        transfer(
            Direction::Send,
            send as usize,
            count,
            datatype,
            peer,
            comm,
            stream,
        )
    }
}

/// Queues a receive of `count` elements from rank `peer` into `receive`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclRecv(
    receive: *mut c_void,
    count: usize,
    datatype: u32,
    peer: c_int,
    comm: ncclComm_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    // SAFETY: as the caller promises NCCL.
    unsafe {
        transfer(
            Direction::Receive,
            receive as usize,
            count,
            datatype,
            peer,
            comm,
            stream,
        )
    }
}

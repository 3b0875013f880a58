//! The wire format: every message is one frame, `[header length: u32][blob length: u64]` little-endian,
//! then a JSON header and a blob of raw little-endian f32 (router queries, scores), so floats cross
//! the wire bit for bit.

use std::io::{self, Read, Write};

use msa_core::{ChunkReduce, HeadReduce, MemoryFingerprint, QueryReduce, ScoreMode};
use msa_engine::RoutingSpec;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Names the protocol in the handshake, so a client that reached some other service says so.
pub const PROTOCOL: &str = "msa-shard";
/// Bumped on any change to the messages.
pub const VERSION: u32 = 2;

/// A header is a few KB (a request's rows, a handful of ids, a greeting); more is not this protocol.
const MAX_HEADER_BYTES: u32 = 16 << 20;
/// The largest blob: a long prompt's router queries (16 KB per routing token at MSA-4B) or every score
/// of a shard of millions of documents are tens of MB.
const MAX_BLOB_BYTES: u64 = 256 << 20;

/// From a client.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Hello {
        protocol: String,
        version: u32,
    },
    /// Score router layer `slot` with the router queries in the blob, or sent over the device link.
    Score(Score),
    /// Join a device link ([`msa_engine::Backend::join_link`]) as end 1 with this rendezvous: from
    /// then on, this connection's requests may send their router queries over it.
    Link {
        rendezvous: Vec<u8>,
    },
}

/// A scoring request: router layer `slot`, queries `[n, heads, d]` (`shape`, in the blob) of which rows
/// `rows` take part, the top `top_k` documents wanted.
#[derive(Debug, Serialize, Deserialize)]
pub struct Score {
    pub slot: usize,
    pub shape: [usize; 3],
    pub rows: Vec<u32>,
    pub top_k: usize,
    pub spec: WireSpec,
    pub keep_scores: bool,
    /// The router queries follow over the connection's device link instead of in the blob.
    pub over_link: bool,
}

/// From the server.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Welcome(Box<Welcome>),
    /// The selected global document ids, highest score first; the blob holds their scores, then every
    /// document's score when asked for.
    Scored {
        top: Vec<usize>,
    },
    /// The server joined the device link: its description.
    Linked {
        link: String,
    },
    /// The request could not be served (the connection stays usable after a refused `Score`).
    Refused {
        reason: String,
    },
}

/// What a server tells a client when it connects: which shard it serves, of which bank.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol: String,
    pub version: u32,
    pub rank: usize,
    pub world: usize,
    /// Global document ids `[start, end)`.
    pub documents: [usize; 2],
    pub key_bytes: u64,
    pub bank_digest: u32,
    pub fingerprint: MemoryFingerprint,
    /// The backend and device it scores on.
    pub backend: String,
    /// The kind of device link its backend joins ([`msa_engine::Backend::link_kind`]), if any.
    pub link: Option<String>,
}

/// [`RoutingSpec`] on the wire.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct WireSpec {
    score_mode: ScoreMode,
    head_reduce: HeadReduce,
    query_reduce: QueryReduce,
    chunk_reduce: ChunkReduce,
}

impl From<RoutingSpec> for WireSpec {
    fn from(spec: RoutingSpec) -> Self {
        WireSpec {
            score_mode: spec.score_mode,
            head_reduce: spec.head_reduce,
            query_reduce: spec.query_reduce,
            chunk_reduce: spec.chunk_reduce,
        }
    }
}

impl From<WireSpec> for RoutingSpec {
    fn from(spec: WireSpec) -> Self {
        RoutingSpec {
            score_mode: spec.score_mode,
            head_reduce: spec.head_reduce,
            query_reduce: spec.query_reduce,
            chunk_reduce: spec.chunk_reduce,
        }
    }
}

/// Writes one frame in a single write (the sockets run without Nagle's delay).
pub fn write_frame(to: &mut impl Write, header: &impl Serialize, blob: &[f32]) -> io::Result<()> {
    let header = serde_json::to_vec(header)?;
    let blob: &[u8] = bytemuck::cast_slice(blob);
    let mut frame = Vec::with_capacity(12 + header.len() + blob.len());
    frame.extend_from_slice(&(header.len() as u32).to_le_bytes());
    frame.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(blob);
    to.write_all(&frame)?;
    to.flush()
}

/// Reads one frame. `Ok(None)` is a peer that closed the connection between frames.
pub fn read_frame<T: DeserializeOwned>(from: &mut impl Read) -> io::Result<Option<(T, Vec<f32>)>> {
    let mut lengths = [0u8; 12];
    let first = from.read(&mut lengths)?;
    if first == 0 {
        return Ok(None);
    }
    let rest = read_exactly(from, (lengths.len() - first) as u64)?;
    lengths[first..].copy_from_slice(&rest);
    let header_len = u32::from_le_bytes(lengths[..4].try_into().expect("4 bytes"));
    let blob_len = u64::from_le_bytes(lengths[4..].try_into().expect("8 bytes"));
    if header_len > MAX_HEADER_BYTES || blob_len > MAX_BLOB_BYTES || blob_len % 4 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "not an {PROTOCOL} frame (header of {header_len} bytes, blob of {blob_len} bytes)"
            ),
        ));
    }
    let header = read_exactly(from, u64::from(header_len))?;
    // Memory grows as bytes arrive, not to what a length field claims.
    let blob = bytemuck::pod_collect_to_vec(&read_exactly(from, blob_len)?);
    let header = serde_json::from_slice(&header).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not an {PROTOCOL} message: {e}"),
        )
    })?;
    Ok(Some((header, blob)))
}

/// `len` bytes, or an error naming a frame cut short.
fn read_exactly(from: &mut impl Read, len: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    from.take(len).read_to_end(&mut bytes)?;
    if (bytes.len() as u64) < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "the connection closed mid-frame ({} of {len} bytes)",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_floats_bit_for_bit() {
        let floats = [
            f32::NAN,
            -0.0,
            f32::MIN_POSITIVE / 3.0,
            1.0e-45,
            f32::INFINITY,
        ];
        let mut wire = Vec::new();
        write_frame(&mut wire, &Reply::Scored { top: vec![7, 2] }, &floats).unwrap();
        let (reply, blob): (Reply, Vec<f32>) = read_frame(&mut wire.as_slice()).unwrap().unwrap();
        assert!(matches!(reply, Reply::Scored { top } if top == [7, 2]));
        let bits = |f: &[f32]| f.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&blob), bits(&floats));
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        // An HTTP request where a frame should be.
        let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let error = read_frame::<Request>(&mut http.as_slice()).unwrap_err();
        assert!(
            error.to_string().contains("not an msa-shard frame"),
            "{error}"
        );
        let mut wire = Vec::new();
        write_frame(&mut wire, &Reply::Scored { top: vec![1] }, &[1.0]).unwrap();
        for cut in 1..wire.len() {
            assert!(
                read_frame::<Reply>(&mut &wire[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        assert!(read_frame::<Reply>(&mut &wire[..0]).unwrap().is_none());
        let mut not_json = Vec::new();
        write_frame(&mut not_json, &"a string", &[]).unwrap();
        let error = read_frame::<Request>(&mut not_json.as_slice()).unwrap_err();
        assert!(
            error.to_string().contains("not an msa-shard message"),
            "{error}"
        );
    }
}

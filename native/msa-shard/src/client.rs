//! The client side: a connection to one shard server, which the engine routes through as a
//! [`RemoteShard`].

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, ErrorKind};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Mutex, mpsc};
use std::time::Duration;

use msa_engine::{
    Backend, DeviceLink, Error, RemoteShard, Result, RouterQueries, ShardAnswer, ShardPlacement,
    ShardRequest,
};

use crate::protocol::{
    PROTOCOL, Reply, Request, Score, VERSION, Welcome, WireSpec, read_frame, write_frame,
};

/// How long a client waits.
#[derive(Clone, Copy, Debug)]
pub struct ConnectOptions {
    /// For the TCP connection to open and the server to greet.
    pub connect: Duration,
    /// For each reply, the scoring of a whole shard included (seconds on a CPU backend over a large
    /// shard; a GPU answers in milliseconds).
    pub reply: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect: Duration::from_secs(10),
            reply: Duration::from_secs(600),
        }
    }
}

/// A connection to a shard server, for a memory on backend `B`. Requests are numbered and their
/// replies arrive in order, so several threads may route through one client at once. A lost connection
/// fails the requests in flight on it; the next request connects again, to a server that must serve
/// the same shard of the same bank.
///
/// [`ShardClient::link`] joins a device link between the two backends (NCCL between GPUs, on other
/// machines too), and the router queries go device to device; without one, or once the connection
/// that carried it was lost, they go through the host and over TCP.
pub struct ShardClient<B: Backend> {
    address: String,
    options: ConnectOptions,
    describe: String,
    placement: ShardPlacement,
    /// The kind of device link the server's backend joins.
    link_kind: Option<String>,
    state: Mutex<State<B>>,
}

struct State<B: Backend> {
    /// `None` once a connection failed, until the next request opens another.
    connection: Option<Connection<B>>,
    /// The next request's ticket.
    next_ticket: u64,
    /// The ticket of the next reply to read on the current connection.
    next_reply: u64,
    /// Tickets below this were sent on an earlier connection.
    first_on_connection: u64,
    /// A thread is joining a device link.
    linking: bool,
    /// Replies read while waiting for another ticket's, until their callers collect them.
    stash: HashMap<u64, (Reply, Vec<f32>)>,
    /// Tickets still to be answered on the current connection that nobody will collect: their
    /// replies are dropped as they arrive.
    abandoned: HashSet<u64>,
    /// Why the last connection was lost.
    lost: Option<String>,
}

struct Connection<B: Backend> {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The device link joined on this connection.
    link: Option<Box<dyn DeviceLink<B>>>,
}

/// Opens a connection to `address` and reads the server's greeting.
fn open<B: Backend>(
    address: &str,
    options: ConnectOptions,
) -> std::result::Result<(Connection<B>, Welcome), String> {
    let targets = address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve the address ({e})"))?;
    let mut last = None;
    let mut stream = None;
    for target in targets {
        match TcpStream::connect_timeout(&target, options.connect) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let stream = stream.ok_or_else(|| match last {
        Some(e) => format!("cannot connect ({e}); is `msa shard` running there?"),
        None => "the name resolves to no address".into(),
    })?;
    let setup = |stream: &TcpStream| {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(options.connect))?;
        stream.set_write_timeout(Some(options.reply))?;
        stream.try_clone()
    };
    let writer = setup(&stream).map_err(|e| e.to_string())?;
    let mut connection = Connection {
        reader: BufReader::new(stream),
        writer,
        link: None,
    };
    let hello = Request::Hello {
        protocol: PROTOCOL.into(),
        version: VERSION,
    };
    write_frame(&mut connection.writer, &hello, &[]).map_err(|e| e.to_string())?;
    let welcome = match read_frame::<Reply>(&mut connection.reader) {
        Ok(Some((Reply::Welcome(welcome), _))) => *welcome,
        Ok(Some((Reply::Refused { reason }, _))) => return Err(reason),
        Ok(Some(_)) => return Err("greeted with a reply instead of a welcome".into()),
        Ok(None) => return Err("closed the connection on greeting".into()),
        Err(e) => {
            return Err(format!(
                "no {PROTOCOL} greeting: {}",
                io_problem(&e, options.connect)
            ));
        }
    };
    connection
        .reader
        .get_ref()
        .set_read_timeout(Some(options.reply))
        .map_err(|e| e.to_string())?;
    Ok((connection, welcome))
}

/// An I/O error in words, a timeout naming how long it waited.
fn io_problem(e: &std::io::Error, waited: Duration) -> String {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            format!("nothing within {} s", waited.as_secs_f64())
        }
        _ => e.to_string(),
    }
}

fn placement_of(welcome: Welcome) -> ShardPlacement {
    ShardPlacement {
        rank: welcome.rank,
        world: welcome.world,
        documents: welcome.documents[0]..welcome.documents[1],
        key_bytes: welcome.key_bytes,
        bank_digest: welcome.bank_digest,
        fingerprint: welcome.fingerprint,
    }
}

impl<B: Backend> ShardClient<B> {
    /// Connects to the shard server at `address` (`host:port`) and reads which shard it serves.
    pub fn connect(address: &str, options: ConnectOptions) -> Result<Self> {
        let (connection, welcome) = open(address, options).map_err(|detail| Error::Shard {
            shard: format!("shard server {address}"),
            detail,
        })?;
        let describe = format!(
            "shard {} of {} at {address} ({})",
            welcome.rank, welcome.world, welcome.backend
        );
        Ok(ShardClient {
            address: address.to_string(),
            options,
            describe,
            link_kind: welcome.link.clone(),
            placement: placement_of(welcome),
            state: Mutex::new(State {
                connection: Some(connection),
                next_ticket: 0,
                next_reply: 0,
                first_on_connection: 0,
                linking: false,
                stash: HashMap::new(),
                abandoned: HashSet::new(),
                lost: None,
            }),
        })
    }

    /// The kind of device link the server's backend joins ([`Backend::link_kind`]), if any.
    pub fn server_link_kind(&self) -> Option<&str> {
        self.link_kind.as_deref()
    }

    fn fail(&self, detail: impl Into<String>) -> Error {
        Error::Shard {
            shard: self.describe.clone(),
            detail: detail.into(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State<B>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current connection, opening a new one (to a server of the same shard) after a loss.
    fn connection<'a>(&self, state: &'a mut State<B>) -> Result<&'a mut Connection<B>> {
        if state.connection.is_none() {
            let lost = state.lost.clone().unwrap_or_default();
            let (connection, welcome) = open(&self.address, self.options).map_err(|e| {
                self.fail(format!(
                    "the connection was lost ({lost}) and cannot reopen: {e}"
                ))
            })?;
            let placement = placement_of(welcome);
            if placement != self.placement {
                return Err(self.fail(format!(
                    "the connection was lost ({lost}); the server there now serves shard {} of {}, \
                     documents {:?}, bank digest {:08x}: open the memory again",
                    placement.rank, placement.world, placement.documents, placement.bank_digest
                )));
            }
            tracing::info!(
                "{}: connected again after losing the connection ({lost})",
                self.describe
            );
            state.connection = Some(connection);
            state.first_on_connection = state.next_ticket;
            state.next_reply = state.next_ticket;
        }
        Ok(state.connection.as_mut().expect("opened above"))
    }

    /// Writes a request on the connection [`Self::connection`] opened, and returns its ticket; a
    /// failed write loses the connection.
    fn send(&self, state: &mut State<B>, request: &Request, blob: &[f32]) -> Result<u64> {
        let connection = state.connection.as_mut().expect("opened by the caller");
        if let Err(e) = write_frame(&mut connection.writer, request, blob) {
            let problem = format!("sending a request: {}", io_problem(&e, self.options.reply));
            return Err(self.lose(state, problem));
        }
        state.next_ticket += 1;
        Ok(state.next_ticket - 1)
    }

    /// Forgets a connection that failed: its requests in flight fail, the next one reconnects.
    fn lose(&self, state: &mut State<B>, problem: String) -> Error {
        state.connection = None;
        // Their replies will never come.
        state.abandoned.clear();
        state.lost = Some(problem.clone());
        self.fail(problem)
    }

    fn answer(&self, (reply, blob): (Reply, Vec<f32>)) -> Result<ShardAnswer> {
        match reply {
            Reply::Scored { top } if blob.len() >= top.len() => {
                let (scores, all) = blob.split_at(top.len());
                Ok(ShardAnswer {
                    top: top.into_iter().zip(scores.iter().copied()).collect(),
                    scores: (!all.is_empty()).then(|| all.to_vec()),
                })
            }
            Reply::Scored { top } => Err(self.fail(format!(
                "answered with {} scores for {} selected documents",
                blob.len(),
                top.len()
            ))),
            Reply::Refused { reason } => Err(self.fail(format!("refused: {reason}"))),
            Reply::Welcome(_) | Reply::Linked { .. } => {
                Err(self.fail("answered a scoring request with another reply"))
            }
        }
    }

    /// Joins a device link between `backend` (the memory's backend here) and the server's, so that
    /// requests send their router queries device to device (NCCL, across machines too) instead of
    /// through both hosts. Both backends must make the same kind of link
    /// ([`Backend::link_kind`]). Returns the link's description; an error leaves the client sending
    /// through the host. The link goes with the connection: after a lost connection, the client
    /// sends through the host again.
    pub fn link(&self, backend: &B) -> Result<String>
    where
        B: Clone + Send + 'static,
    {
        let mine = backend
            .link_kind()
            .ok_or_else(|| self.fail(format!("{} makes no device links", backend.describe())))?;
        match &self.link_kind {
            Some(theirs) if *theirs == mine => {}
            Some(theirs) => {
                return Err(self.fail(format!(
                    "its backend links by {theirs}, this one by {mine}: install the same on both"
                )));
            }
            None => return Err(self.fail("its backend makes no device links")),
        }
        let (ticket, rendezvous) = {
            let mut state = self.state();
            if state.linking {
                return Err(self.fail("another thread is joining a device link"));
            }
            let connection = self.connection(&mut state)?;
            if connection.link.is_some() {
                return Err(self.fail("the connection has a device link already"));
            }
            let rendezvous = backend
                .link_rendezvous()
                .map_err(|e| self.fail(format!("making the device link's rendezvous: {e}")))?;
            let request = Request::Link {
                rendezvous: rendezvous.clone(),
            };
            let ticket = self.send(&mut state, &request, &[])?;
            state.linking = true;
            (ticket, rendezvous)
        };
        let linked = self.join(backend, ticket, rendezvous);
        self.state().linking = false;
        linked
    }

    /// Joins the link of `rendezvous`, asked for by request `ticket`, and installs this end on the
    /// connection.
    fn join(&self, backend: &B, ticket: u64, rendezvous: Vec<u8>) -> Result<String>
    where
        B: Clone + Send + 'static,
    {
        // Both ends join at once; this one on its own thread, so that a server refusing the link
        // does not leave this call waiting for it (the thread, still waiting, is left behind).
        let (joined, join) = mpsc::channel();
        let here = backend.clone();
        std::thread::spawn(move || joined.send(here.join_link(&rendezvous, 0)));
        let link = match self.reply(ticket)? {
            (Reply::Linked { link }, _) => link,
            (Reply::Refused { reason }, _) => {
                return Err(self.fail(format!("refused the device link: {reason}")));
            }
            _ => return Err(self.fail("answered a device link with another reply")),
        };
        let ours = match join.recv_timeout(self.options.connect) {
            Ok(joined) => joined.map_err(|e| self.fail(format!("joining the device link: {e}")))?,
            Err(_) => {
                return Err(self.fail(format!(
                    "joined the device link ({link}), but this end did not within {} s",
                    self.options.connect.as_secs_f64()
                )));
            }
        };
        let mut state = self.state();
        // Installed on the connection that joined it only.
        let same = ticket >= state.first_on_connection;
        match state.connection.as_mut() {
            Some(connection) if same => {
                let described = ours.describe();
                connection.link = Some(ours);
                Ok(described)
            }
            _ => Err(self.fail("the connection was lost while the device link was joined")),
        }
    }

    /// Waits for the reply to `ticket`, stashing other threads' replies that come first.
    fn reply(&self, ticket: u64) -> Result<(Reply, Vec<f32>)> {
        let mut state = self.state();
        if let Some(reply) = state.stash.remove(&ticket) {
            return Ok(reply);
        }
        if ticket >= state.next_ticket {
            return Err(self.fail(format!("no request {ticket} was sent")));
        }
        if state.abandoned.contains(&ticket)
            || (ticket >= state.first_on_connection && ticket < state.next_reply)
        {
            return Err(self.fail(format!(
                "request {ticket} was collected or abandoned already"
            )));
        }
        if ticket < state.first_on_connection || state.connection.is_none() {
            let lost = state.lost.clone().unwrap_or_default();
            return Err(self.fail(format!(
                "the connection was lost before the answer came ({lost})"
            )));
        }
        loop {
            let connection = state.connection.as_mut().expect("checked above");
            let reply = match read_frame::<Reply>(&mut connection.reader) {
                Ok(Some(reply)) => reply,
                Ok(None) => {
                    return Err(self.lose(&mut state, "the server closed the connection".into()));
                }
                Err(e) => {
                    let problem = format!(
                        "waiting for a reply: {}",
                        io_problem(&e, self.options.reply)
                    );
                    return Err(self.lose(&mut state, problem));
                }
            };
            let answered = state.next_reply;
            state.next_reply += 1;
            if answered == ticket {
                return Ok(reply);
            }
            // Another thread's: it collects it from here, unless it was abandoned.
            if !state.abandoned.remove(&answered) {
                state.stash.insert(answered, reply);
            }
        }
    }
}

impl<B: Backend> RemoteShard<B> for ShardClient<B> {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn placement(&self) -> &ShardPlacement {
        &self.placement
    }

    fn takes_device_queries(&self) -> bool {
        (self.state().connection.as_ref()).is_some_and(|connection| connection.link.is_some())
    }

    fn submit(&self, request: &ShardRequest<'_, B>) -> Result<u64> {
        let mut state = self.state();
        let connection = self.connection(&mut state)?;
        let (blob, on_device) = match request.queries {
            RouterQueries::Host(queries) => (queries, None),
            RouterQueries::Device(queries) => (&[][..], Some(queries)),
        };
        if on_device.is_some() && connection.link.is_none() {
            return Err(self.fail(
                "router queries on the device, but the device link went with a lost connection: \
                 ask again (through the host)",
            ));
        }
        let header = Request::Score(Score {
            slot: request.slot,
            shape: request.shape,
            rows: request.rows.to_vec(),
            top_k: request.top_k,
            spec: WireSpec::from(request.spec),
            keep_scores: request.keep_scores,
            over_link: on_device.is_some(),
        });
        let ticket = self.send(&mut state, &header, blob)?;
        // Sent in the order of the requests, under the lock, as the server receives them.
        let link = (state.connection.as_ref()).and_then(|connection| connection.link.as_ref());
        let sent = match (on_device, link) {
            (Some(queries), Some(link)) => link.send(queries),
            _ => Ok(()),
        };
        if let Err(e) = sent {
            // The server waits for router queries that will not come: drop the connection.
            let problem = format!("sending router queries over the device link: {e}");
            return Err(self.lose(&mut state, problem));
        }
        Ok(ticket)
    }

    fn collect(&self, ticket: u64) -> Result<ShardAnswer> {
        self.answer(self.reply(ticket)?)
    }

    fn abandon(&self, ticket: u64) {
        let mut state = self.state();
        let unread =
            state.connection.is_some() && (state.next_reply..state.next_ticket).contains(&ticket);
        if state.stash.remove(&ticket).is_none() && unread {
            state.abandoned.insert(ticket);
        }
    }
}

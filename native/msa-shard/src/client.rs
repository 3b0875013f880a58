//! The client side: a connection to one shard server, which the engine routes through as a
//! [`RemoteShard`].

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, ErrorKind};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use msa_engine::{Error, RemoteShard, Result, ShardAnswer, ShardPlacement, ShardRequest};

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

/// A connection to a shard server. Requests are numbered and their replies arrive in order, so several
/// threads may route through one client at once. A lost connection fails the requests in flight on it;
/// the next request connects again, to a server that must serve the same shard of the same bank.
pub struct ShardClient {
    address: String,
    options: ConnectOptions,
    describe: String,
    placement: ShardPlacement,
    state: Mutex<State>,
}

struct State {
    /// `None` once a connection failed, until the next request opens another.
    connection: Option<Connection>,
    /// The next request's ticket.
    next_ticket: u64,
    /// The ticket of the next reply to read on the current connection.
    next_reply: u64,
    /// Tickets below this were sent on an earlier connection.
    first_on_connection: u64,
    /// Replies read while waiting for another ticket's, until their callers collect them.
    stash: HashMap<u64, (Reply, Vec<f32>)>,
    /// Tickets still to be answered on the current connection that nobody will collect: their
    /// replies are dropped as they arrive.
    abandoned: HashSet<u64>,
    /// Why the last connection was lost.
    lost: Option<String>,
}

struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// Opens a connection to `address` and reads the server's greeting.
fn open(
    address: &str,
    options: ConnectOptions,
) -> std::result::Result<(Connection, Welcome), String> {
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

impl ShardClient {
    /// Connects to the shard server at `address` (`host:port`) and reads which shard it serves.
    pub fn connect(address: &str, options: ConnectOptions) -> Result<ShardClient> {
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
            placement: placement_of(welcome),
            state: Mutex::new(State {
                connection: Some(connection),
                next_ticket: 0,
                next_reply: 0,
                first_on_connection: 0,
                stash: HashMap::new(),
                abandoned: HashSet::new(),
                lost: None,
            }),
        })
    }

    fn fail(&self, detail: impl Into<String>) -> Error {
        Error::Shard {
            shard: self.describe.clone(),
            detail: detail.into(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current connection, opening a new one (to a server of the same shard) after a loss.
    fn connection<'a>(&self, state: &'a mut State) -> Result<&'a mut Connection> {
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

    /// Forgets a connection that failed: its requests in flight fail, the next one reconnects.
    fn lose(&self, state: &mut State, problem: String) -> Error {
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
            Reply::Welcome(_) => Err(self.fail("answered a request with a greeting")),
        }
    }
}

impl RemoteShard for ShardClient {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn placement(&self) -> &ShardPlacement {
        &self.placement
    }

    fn submit(&self, request: &ShardRequest<'_>) -> Result<u64> {
        let mut state = self.state();
        let connection = self.connection(&mut state)?;
        let header = Request::Score(Score {
            slot: request.slot,
            shape: request.shape,
            rows: request.rows.to_vec(),
            top_k: request.top_k,
            spec: WireSpec::from(request.spec),
            keep_scores: request.keep_scores,
        });
        if let Err(e) = write_frame(&mut connection.writer, &header, request.queries) {
            let problem = format!("sending a request: {}", io_problem(&e, self.options.reply));
            return Err(self.lose(&mut state, problem));
        }
        state.next_ticket += 1;
        Ok(state.next_ticket - 1)
    }

    fn collect(&self, ticket: u64) -> Result<ShardAnswer> {
        let mut state = self.state();
        if let Some(reply) = state.stash.remove(&ticket) {
            return self.answer(reply);
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
                return self.answer(reply);
            }
            // Another thread's: it collects it from here, unless it was abandoned.
            if !state.abandoned.remove(&answered) {
                state.stash.insert(answered, reply);
            }
        }
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

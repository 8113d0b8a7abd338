//! The hit path's Redis reads (each entry's value, then Redis's clock once per write) on a
//! connection of its own, pipelined.
//!
//! Why not through fred, like every other command: a Redis hit is one read, and fred routes
//! each command through its router task with a response channel and timers of its own, and it
//! writes as soon as its queue is empty, so under load every write system call carries one or
//! two requests and Redis answers each in its own. Here a request encodes its two commands into
//! a shared buffer; the writer task, once woken, first lets every other ready task run (one
//! yield), then writes everything queued in one system call, and the reader answers requests
//! in order from whatever one read brings. Each write ends with `ECHO <batch number>`, and a
//! batch's replies are handed out only once that marker is back: a read is never paired with
//! another's reply. (A Redis user whose ACL refuses ECHO gets no markers; the replies' types
//! are still checked.) Scripts, locks and pub/sub stay with fred.
//!
//! A single server is read this way, and so is each master of a Redis Cluster (one pipeline per
//! master, see `store::shards`: one dead master must not stop the others' reads, as it stops
//! fred's cluster client), over plain TCP or TLS (rustls, with the store's trust
//! settings and client certificate), with AUTH and SELECT as the URL asks (or with the user and
//! password a credential provider gives for each connection: IAM tokens); Sentinel reads go
//! through fred. A key this node does not serve is answered with Redis's `MOVED`/`ASK` code. With a maximum age (IAM: AWS closes a connection after 12 hours), a
//! connection stops taking new batches when it reaches it, answers those written, and is made
//! again: no read fails for it.
//!
//! Failures: a connection is made (and checked with one round trip) when there is work. When an
//! established connection breaks (an idle timeout, a restart, an I/O or protocol error), the
//! requests written on it fail, and those only queued go out on a new connection, made at once.
//! When a connection cannot be made, or dies within a second, every request fails and requests
//! keep failing at once for a backoff (50 ms doubling to 2 s). A server that stops answering
//! (SIGSTOP, a black hole) is noticed when nothing arrives for `unresponsive` while requests
//! wait: the connection is dropped. Callers keep their own deadline; a reply that comes after it
//! is read and dropped.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fred::types::config::CredentialProvider;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

use crate::redis_clock::RedisTime;

/// A Redis server reached over TCP or TLS, and how to log in.
#[derive(Clone)]
pub struct Target {
    /// A name or an IP address (an IPv6 one without brackets); over TLS, the server's
    /// certificate must be valid for it.
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub database: Option<u8>,
    /// TLS (`rediss://`), or plain TCP when `None`.
    pub tls: Option<Arc<ClientConfig>>,
    /// Asked for the user and password on every connection, in place of `username` and
    /// `password` (an IAM token is good for one login within 15 minutes).
    pub credentials: Option<Arc<dyn CredentialProvider>>,
    /// A connection is retired (without failing a read) and made again at this age.
    pub max_age: Option<Duration>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("Target")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// One entry as Redis has it: its value (at most [`MAX_VALUE`] + 1 bytes of it; `None` when
/// absent), and Redis's clock read right after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryReply {
    pub value: Option<Bytes>,
    pub now: RedisTime,
}

/// Why a read failed. Carries no reply text: only Redis's error code, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("redis connection: {0}")]
    Io(std::io::ErrorKind),
    /// rustls's error, e.g. `InvalidCertificate(UnknownIssuer)` (no secret in it).
    #[error("redis TLS: {0}")]
    Tls(String),
    #[error("redis is not answering")]
    Unresponsive,
    #[error("redis answered with an error ({0})")]
    Server(String),
    #[error("redis sent a reply that is not valid RESP2 here")]
    Protocol,
    #[error("not connected to redis (reconnecting)")]
    Disconnected,
    /// The credential provider had nothing to log in with (it reports why itself).
    #[error("no credentials to log in to redis with")]
    NoCredentials,
    #[error("the connection reached its maximum age")]
    Retired,
}

impl From<std::io::Error> for ReadError {
    fn from(error: std::io::Error) -> ReadError {
        // tokio-rustls hands TLS failures (handshake, alerts) over inside an I/O error.
        match error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            Some(tls) => ReadError::Tls(format!("{tls:?}")),
            None => ReadError::Io(error.kind()),
        }
    }
}

type Responder = oneshot::Sender<Result<EntryReply, ReadError>>;

/// What one written request awaits.
#[derive(Debug)]
enum Slot {
    /// A read: one reply, its value.
    Read(Responder),
    /// The end of a batch: `TIME` after its reads (one reading of Redis's clock, later than every
    /// value of the batch, serves them all), then `ECHO n` for batch `n` when the connection
    /// uses markers. Replies are handed out only once their batch's end has come back as
    /// expected, so a stream that lost or gained bytes (which TCP never does, but a broken
    /// middlebox might) can never pair a read with another's reply: it is a protocol error,
    /// and the connection is made again.
    End(Option<u64>),
}

/// A pipelined read connection, and the task that drives it (stopped on drop).
#[derive(Debug)]
pub struct ReadPipeline {
    shared: Arc<Shared>,
    driver: AbortHandle,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the driver: a request is queued.
    queued: Notify,
    /// Why the last connection attempt failed; `None` once one is made.
    failure: watch::Sender<Option<ReadError>>,
}

#[derive(Debug, Default)]
struct State {
    /// Encoded commands not yet written, and whom their replies go to.
    out: Vec<u8>,
    queued: Vec<Responder>,
    /// Written, in order, awaiting replies: each batch's reads, then its end marker.
    in_flight: VecDeque<Slot>,
    /// The number of the last batch written.
    batches: u64,
    /// While replies are awaited: the last time one came (or the first write, if none has
    /// since). The watchdog gives the connection up when this is `unresponsive` old.
    waiting_since: Option<Instant>,
    /// Until when requests fail at once (after a failed connection).
    down_until: Option<Instant>,
    /// The last connection failed, and none has been made since.
    failed: bool,
    /// Whether this connection ends its batches with `ECHO` markers.
    markers: bool,
}

impl ReadPipeline {
    /// Starts the driver; it connects on the first request. `connect_timeout` bounds a
    /// connection attempt with its login; `unresponsive` is how long requests may wait with
    /// nothing at all coming back before the connection is given up.
    pub fn start(target: Target, connect_timeout: Duration, unresponsive: Duration) -> ReadPipeline {
        let shared = Arc::new(Shared::new());
        let driver = tokio::spawn(drive(Arc::clone(&shared), target, connect_timeout, unresponsive)).abort_handle();
        ReadPipeline { shared, driver }
    }

    /// Reads `name`'s value, then Redis's clock. No deadline of its own: the caller sets one.
    pub async fn read(&self, name: &[u8]) -> Result<EntryReply, ReadError> {
        let (responder, reply) = oneshot::channel();
        {
            let mut state = self.shared.lock();
            if state.down_until.is_some_and(|until| Instant::now() < until) {
                return Err(ReadError::Disconnected);
            }
            let wake = state.queued.is_empty();
            encode_read(&mut state.out, name);
            state.queued.push(responder);
            drop(state);
            if wake {
                self.shared.queued.notify_one();
            }
        }
        reply.await.unwrap_or(Err(ReadError::Disconnected))
    }

    /// Whether the last connection failed and none has been made since (for readiness).
    pub fn is_down(&self) -> bool {
        self.shared.lock().failed
    }

    /// Why the last connection attempt failed (`None` once a connection is made), changing as
    /// attempts fail and succeed: the store tells a refusal (TLS, login) from an outage.
    pub fn failures(&self) -> watch::Receiver<Option<ReadError>> {
        self.shared.failure.subscribe()
    }
}

impl Drop for ReadPipeline {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Shared {
    fn new() -> Shared {
        Shared { state: Mutex::new(State::default()), queued: Notify::new(), failure: watch::Sender::new(None) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under this lock leaves nothing half-done that matters: requests are only
        // ever failed or answered.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Fails every request written on a connection that is gone; queued ones stay queued.
    fn fail_in_flight(&self, error: &ReadError) {
        let in_flight = {
            let mut state = self.lock();
            state.waiting_since = None;
            std::mem::take(&mut state.in_flight)
        };
        for slot in in_flight {
            if let Slot::Read(responder) = slot {
                let _ = responder.send(Err(error.clone()));
            }
        }
    }

    /// Fails every request queued, and marks the connection down until `until`.
    fn fail_queued(&self, error: &ReadError, until: Instant) {
        let queued = {
            let mut state = self.lock();
            state.out.clear();
            state.down_until = Some(until);
            state.failed = true;
            std::mem::take(&mut state.queued)
        };
        for responder in queued {
            let _ = responder.send(Err(error.clone()));
        }
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A connection that breaks sooner counts as one that could not be made: no instant retry.
const SHORTEST_WORKING_LIFE: Duration = Duration::from_secs(1);

/// Connects when there is work, serves the connection until it breaks, and starts over.
async fn drive(shared: Arc<Shared>, target: Target, connect_timeout: Duration, unresponsive: Duration) {
    let mut backoff = BACKOFF_MIN;
    loop {
        shared.queued.notified().await;
        let connected = tokio::time::timeout(connect_timeout, connect(&target)).await;
        let error = match connected.unwrap_or(Err(ReadError::Unresponsive)) {
            Ok((stream, markers)) => {
                shared.failure.send_if_modified(|failure| failure.take().is_some());
                let since = Instant::now();
                {
                    let mut state = shared.lock();
                    state.failed = false;
                    state.markers = markers;
                }
                // Requests queued while connecting are written at once.
                shared.queued.notify_one();
                let error = serve(&shared, stream, unresponsive, target.max_age.map(|age| since + age)).await;
                shared.fail_in_flight(&error);
                // A retired connection worked to the end: no backoff, whatever its age.
                if since.elapsed() >= SHORTEST_WORKING_LIFE || error == ReadError::Retired {
                    tracing::debug!(%error, "redis read connection lost; connecting again");
                    backoff = BACKOFF_MIN;
                    shared.queued.notify_one();
                    continue;
                }
                error
            }
            Err(error) => {
                shared.failure.send_replace(Some(error.clone()));
                error
            }
        };
        tracing::debug!(%error, "no redis read connection; retrying after a backoff");
        let until = Instant::now() + backoff;
        shared.fail_queued(&error, until);
        tokio::time::sleep_until(until).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        // Whatever was queued meanwhile failed at once; the next request connects.
        shared.lock().down_until = None;
    }
}

/// A connection to Redis: plain TCP, or TLS over it.
enum Connection {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Connects (with TLS when the target asks), logs in and checks that the server answers;
/// returns whether it echoes markers.
async fn connect(target: &Target) -> Result<(Connection, bool), ReadError> {
    let stream = TcpStream::connect((target.host.as_str(), target.port)).await?;
    stream.set_nodelay(true)?;
    Ok(match &target.tls {
        None => {
            let mut stream = stream;
            let markers = login(&mut stream, target).await?;
            (Connection::Plain(stream), markers)
        }
        Some(tls) => {
            let name = ServerName::try_from(target.host.clone())
                .map_err(|_| ReadError::Tls("InvalidServerName".to_owned()))?;
            let mut stream = tokio_rustls::TlsConnector::from(Arc::clone(tls)).connect(name, stream).await?;
            let markers = login(&mut stream, target).await?;
            (Connection::Tls(Box::new(stream)), markers)
        }
    })
}

/// Logs in, selects the database and sends the probe; returns whether the server echoes
/// markers.
async fn login<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, target: &Target) -> Result<bool, ReadError> {
    let mut login = Vec::new();
    let mut logins = 0;
    let (username, password) = match &target.credentials {
        Some(provider) => provider.fetch(None).await.map_err(|_| ReadError::NoCredentials)?,
        None => (target.username.clone(), target.password.clone()),
    };
    if let Some(password) = &password {
        match &username {
            Some(user) => encode_command(&mut login, &[b"AUTH", user.as_bytes(), password.as_bytes()]),
            None => encode_command(&mut login, &[b"AUTH", password.as_bytes()]),
        }
        logins += 1;
    }
    if let Some(database) = target.database.filter(|&db| db != 0) {
        encode_command(&mut login, &[b"SELECT", itoa::Buffer::new().format(database).as_bytes()]);
        logins += 1;
    }
    // The probe: a round trip proves the server answers (a frozen one accepts connections all
    // the same), and its reply tells whether ECHO may be used for batch markers.
    encode_command(&mut login, &[b"ECHO", b"0"]);
    stream.write_all(&login).await?;
    stream.flush().await?;

    let mut buf = BytesMut::with_capacity(256);
    let mut answered = 0;
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof));
        }
        while let Some((frame, used)) = parse_frame(&buf)? {
            let probe = answered == logins;
            let refused_echo = buf.starts_with(b"-NOPERM") || buf.starts_with(b"-ERR unknown command");
            let reply = buf.split_to(used);
            answered += 1;
            let markers = match frame {
                Frame::Simple if !probe => continue,
                Frame::Bulk(ref echoed) if probe && reply[echoed.clone()] == *b"0" => true,
                Frame::Error(_) if probe && refused_echo => {
                    tracing::info!("the redis user may not run ECHO: hit reads go without batch markers");
                    false
                }
                Frame::Error(code) => return Err(ReadError::Server(code)),
                _ => return Err(ReadError::Protocol),
            };
            return if buf.is_empty() { Ok(markers) } else { Err(ReadError::Protocol) };
        }
    }
}

/// Writes queued requests and answers written ones until the connection fails.
/// Writes queued requests and answers written ones until the connection fails, or until
/// `retire_at` once what was written is answered.
async fn serve(
    shared: &Shared,
    connection: Connection,
    unresponsive: Duration,
    retire_at: Option<Instant>,
) -> ReadError {
    match connection {
        Connection::Plain(stream) => {
            let (reader, writer) = stream.into_split();
            serve_halves(shared, reader, writer, unresponsive, retire_at).await
        }
        Connection::Tls(stream) => {
            let (reader, writer) = tokio::io::split(*stream);
            serve_halves(shared, reader, writer, unresponsive, retire_at).await
        }
    }
}

async fn serve_halves<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    shared: &Shared,
    reader: R,
    writer: W,
    unresponsive: Duration,
    retire_at: Option<Instant>,
) -> ReadError {
    tokio::select! {
        error = write_queued(shared, writer, retire_at) => error,
        error = read_replies(shared, reader, unresponsive) => error,
    }
}

async fn write_queued<W: AsyncWrite + Unpin>(shared: &Shared, mut writer: W, retire_at: Option<Instant>) -> ReadError {
    let mut batch = Vec::with_capacity(4096);
    let retire = async {
        match retire_at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(retire);
    loop {
        tokio::select! {
            () = shared.queued.notified() => {}
            () = &mut retire => {
                // New requests stay queued for the next connection; the written ones are
                // answered here first (the reader's watchdog bounds the wait).
                while !shared.lock().in_flight.is_empty() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                return ReadError::Retired;
            }
        }
        // Let every task that is ready run first: the ones about to queue a read join this
        // write instead of needing one of their own.
        tokio::task::yield_now().await;
        {
            let mut state = shared.lock();
            if state.queued.is_empty() {
                continue;
            }
            std::mem::swap(&mut batch, &mut state.out);
            let queued = std::mem::take(&mut state.queued);
            if state.in_flight.is_empty() {
                state.waiting_since = Some(Instant::now());
            }
            state.in_flight.extend(queued.into_iter().map(Slot::Read));
            encode_command(&mut batch, &[b"TIME"]);
            let marker = state.markers.then(|| {
                state.batches += 1;
                state.batches
            });
            if let Some(number) = marker {
                encode_command(&mut batch, &[b"ECHO", itoa::Buffer::new().format(number).as_bytes()]);
            }
            state.in_flight.push_back(Slot::End(marker));
        }
        // A TLS stream may hold the last record back until flushed; TCP's flush does nothing.
        if let Err(error) = async {
            writer.write_all(&batch).await?;
            writer.flush().await
        }
        .await
        {
            return error.into();
        }
        batch.clear();
    }
}

async fn read_replies<R: AsyncRead + Unpin>(shared: &Shared, mut reader: R, unresponsive: Duration) -> ReadError {
    let mut buf = BytesMut::with_capacity(READ_BUFFER);
    let mut watchdog = tokio::time::interval(unresponsive / 4);
    loop {
        tokio::select! {
            biased;
            read = reader.read_buf(&mut buf) => {
                match read {
                    Ok(0) => return ReadError::Io(std::io::ErrorKind::UnexpectedEof),
                    Ok(_) => {}
                    Err(error) => return error.into(),
                }
                if let Err(error) = answer(shared, &mut buf) {
                    return error;
                }
            }
            _ = watchdog.tick() => {
                let since = shared.lock().waiting_since;
                if since.is_some_and(|since| since.elapsed() >= unresponsive) {
                    return ReadError::Unresponsive;
                }
            }
        }
        if buf.capacity() - buf.len() < READ_BUFFER / 16 {
            buf.reserve(READ_BUFFER);
        }
    }
}

const READ_BUFFER: usize = 16 * 1024;

/// Answers the reads of every batch whose replies, end marker included, are all in `buf`, and
/// consumes them.
fn answer(shared: &Shared, buf: &mut BytesMut) -> Result<(), ReadError> {
    let mut answered = Vec::new();
    {
        let mut state = shared.lock();
        while let Some((replies, used)) = parse_batch(&state.in_flight, buf)? {
            let frames = buf.split_to(used).freeze();
            for reply in replies {
                let Some(Slot::Read(responder)) = state.in_flight.pop_front() else {
                    unreachable!("parse_batch pairs each reply with a read")
                };
                let reply = reply.map(|(value, now)| EntryReply { value: value.map(|r| frames.slice(r)), now });
                answered.push((responder, reply));
            }
            let end = state.in_flight.pop_front();
            debug_assert!(matches!(end, Some(Slot::End(_))), "a batch ends with its end");
        }
        if state.in_flight.is_empty() && !buf.is_empty() {
            return Err(ReadError::Protocol);
        }
        // Bytes came: the server is alive, whether or not they made a whole batch.
        state.waiting_since = (!state.in_flight.is_empty()).then(Instant::now);
    }
    for (responder, reply) in answered {
        // The caller may have given up (deadline): its reply is dropped.
        let _ = responder.send(reply);
    }
    Ok(())
}

/// One read's reply: the range of the value in the batch (`None` if empty) and Redis's clock,
/// or an error.
type ReadReply = Result<(Option<std::ops::Range<usize>>, RedisTime), ReadError>;

/// Parses the first batch awaited in `in_flight` from the start of `buf`: `None` until all of
/// it is there, else the reads' replies (each with the batch's reading of Redis's clock) and
/// the batch's length.
fn parse_batch(in_flight: &VecDeque<Slot>, buf: &[u8]) -> Result<Option<(Vec<ReadReply>, usize)>, ReadError> {
    // What each read found: its value's range in the batch, or Redis's error code.
    let mut values: Vec<Result<Option<std::ops::Range<usize>>, String>> = Vec::new();
    let mut at = 0;
    for slot in in_flight {
        match slot {
            Slot::Read(_) => {
                let Some((value, len)) = parse_frame(&buf[at..])? else { return Ok(None) };
                values.push(match value {
                    Frame::Error(code) => Err(code),
                    Frame::Bulk(r) if r.is_empty() => Ok(None),
                    Frame::Bulk(r) => Ok(Some(at + r.start..at + r.end)),
                    _ => return Err(ReadError::Protocol),
                });
                at += len;
            }
            Slot::End(marker) => {
                let Some((now, len)) = parse_time(&buf[at..])? else { return Ok(None) };
                at += len;
                if let Some(number) = marker {
                    let Some((frame, len)) = parse_frame(&buf[at..])? else { return Ok(None) };
                    match frame {
                        Frame::Bulk(r)
                            if buf[at + r.start..at + r.end] == *itoa::Buffer::new().format(*number).as_bytes() => {}
                        // In step, but refused (e.g. NOAUTH): the connection is no use as it is.
                        Frame::Error(code) => return Err(ReadError::Server(code)),
                        _ => return Err(ReadError::Protocol),
                    }
                    at += len;
                }
                let replies = values
                    .into_iter()
                    .map(|value| match (value, &now) {
                        (Err(code), _) => Err(ReadError::Server(code)),
                        (_, Err(code)) => Err(ReadError::Server(code.clone())),
                        (Ok(range), Ok(now)) => Ok((range, *now)),
                    })
                    .collect();
                return Ok(Some((replies, at)));
            }
        }
    }
    Ok(None)
}

/// The longest value a read returns whole: longer ones come back cut at one byte more, so the
/// caller knows, and a planted huge value is never read whole. A sealed token response is a few
/// KiB; the store takes this as the largest entry (`store::MAX_ENTRY_BYTES`).
pub const MAX_VALUE: usize = 64 * 1024;

/// One read: `GETRANGE` bounds what is read (and answers an empty string for an absent key).
/// The batch's `TIME` follows the values: the time left is computed from a clock reading no
/// earlier than each value's, so it can only be understated.
fn encode_read(out: &mut Vec<u8>, name: &[u8]) {
    encode_command(out, &[b"GETRANGE", name, b"0", itoa::Buffer::new().format(MAX_VALUE).as_bytes()]);
}

/// `TIME`'s answer, or the code of the error Redis answered instead.
type TimeReply = Result<RedisTime, String>;

/// Parses `TIME`'s reply (an array of two bulk integers: seconds, µs) at the start of `buf`;
/// a server error is passed on as its code.
fn parse_time(buf: &[u8]) -> Result<Option<(TimeReply, usize)>, ReadError> {
    let Some((head, mut at)) = parse_frame(buf)? else { return Ok(None) };
    match head {
        Frame::Array(2) => {}
        Frame::Error(code) => return Ok(Some((Err(code), at))),
        _ => return Err(ReadError::Protocol),
    }
    let mut parts = [0u64; 2];
    for part in &mut parts {
        let Some((frame, len)) = parse_frame(&buf[at..])? else { return Ok(None) };
        let Frame::Bulk(r) = frame else { return Err(ReadError::Protocol) };
        *part = u64::try_from(parse_int(&buf[at + r.start..at + r.end])?).map_err(|_| ReadError::Protocol)?;
        at += len;
    }
    let now = RedisTime::from_parts(parts[0], parts[1]).ok_or(ReadError::Protocol)?;
    Ok(Some((Ok(now), at)))
}

fn encode_command(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let mut digits = itoa::Buffer::new();
    out.push(b'*');
    out.extend_from_slice(digits.format(parts.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    for part in parts {
        out.push(b'$');
        out.extend_from_slice(digits.format(part.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
}

/// The RESP2 replies this connection can get.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    /// `+OK` and the like.
    Simple,
    /// `-CODE message`: the code only (the first word).
    Error(String),
    Integer(i64),
    /// `$-1`.
    Nil,
    /// `*n`: the header of an array of `n` frames.
    Array(i64),
    /// The data's range within the frame.
    Bulk(std::ops::Range<usize>),
}

/// The most a bulk reply may hold: what `GETRANGE` returns at most. A longer one cannot be an
/// answer to what this connection sends, so the stream is out of step; and a buffer never
/// holds more than this of one reply.
const MAX_BULK: usize = MAX_VALUE + 1;
/// The longest header or error line read without its end.
const MAX_LINE: usize = 4096;

/// Parses one frame at the start of `buf`: `None` if it is not all there yet, else the frame
/// and its length.
fn parse_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, ReadError> {
    let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() > MAX_LINE { Err(ReadError::Protocol) } else { Ok(None) };
    };
    if line_end == 0 {
        return Err(ReadError::Protocol);
    }
    let (kind, line) = (buf[0], &buf[1..line_end]);
    let after_line = line_end + 2;
    let frame = match kind {
        b'+' => Frame::Simple,
        b'-' => {
            let code = line.split(|&b| b == b' ').next().unwrap_or_default();
            Frame::Error(String::from_utf8_lossy(code).into_owned())
        }
        b':' => Frame::Integer(parse_int(line)?),
        b'*' => Frame::Array(parse_int(line)?),
        b'$' => {
            let len = parse_int(line)?;
            if len == -1 {
                Frame::Nil
            } else {
                let len = usize::try_from(len).ok().filter(|&len| len <= MAX_BULK).ok_or(ReadError::Protocol)?;
                let end = after_line + len;
                if buf.len() < end + 2 {
                    return Ok(None);
                }
                if &buf[end..end + 2] != b"\r\n" {
                    return Err(ReadError::Protocol);
                }
                return Ok(Some((Frame::Bulk(after_line..end), end + 2)));
            }
        }
        _ => return Err(ReadError::Protocol),
    };
    Ok(Some((frame, after_line)))
}

fn parse_int(digits: &[u8]) -> Result<i64, ReadError> {
    std::str::from_utf8(digits).ok().and_then(|s| s.parse().ok()).ok_or(ReadError::Protocol)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_is_a_bounded_getrange_in_resp() {
        let mut out = Vec::new();
        encode_read(&mut out, b"tp:{abc}");
        assert_eq!(out, b"*4\r\n$8\r\nGETRANGE\r\n$8\r\ntp:{abc}\r\n$1\r\n0\r\n$5\r\n65536\r\n");
        out.clear();
        encode_command(&mut out, &[b"ECHO", b"12"]);
        assert_eq!(out, b"*2\r\n$4\r\nECHO\r\n$2\r\n12\r\n");
    }

    /// A read's reply: its value (empty = absent).
    fn value(value: &[u8]) -> Vec<u8> {
        let mut out = format!("${}\r\n", value.len()).into_bytes();
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
        out
    }

    /// `TIME`'s reply at `secs` s and 7 µs.
    fn time(secs: u64) -> Vec<u8> {
        format!("*2\r\n${}\r\n{secs}\r\n$1\r\n7\r\n", secs.to_string().len()).into_bytes()
    }

    /// `ECHO n`'s reply.
    fn marker(n: u64) -> Vec<u8> {
        value(n.to_string().as_bytes())
    }

    fn at(secs: u64) -> RedisTime {
        RedisTime::from_parts(secs, 7).unwrap()
    }

    #[test]
    fn times_parse_and_a_refused_time_is_that_batchs_error() {
        let reply = time(1_700_000_000);
        assert_eq!(parse_time(&reply).unwrap(), Some((Ok(at(1_700_000_000)), reply.len())));
        assert_eq!(parse_time(&reply[..reply.len() - 3]).unwrap(), None, "incomplete");
        assert_eq!(parse_time(b"-NOPERM no\r\n").unwrap(), Some((Err("NOPERM".into()), 12)));
        assert_eq!(parse_time(b"*2\r\n:1\r\n:2\r\n"), Err(ReadError::Protocol));
        assert_eq!(parse_time(b"*3\r\n"), Err(ReadError::Protocol));
    }

    #[test]
    fn frames_parse_with_their_length() {
        assert_eq!(parse_frame(b"+OK\r\nrest").unwrap(), Some((Frame::Simple, 5)));
        assert_eq!(parse_frame(b":-2\r\n").unwrap(), Some((Frame::Integer(-2), 5)));
        assert_eq!(parse_frame(b":59000\r\n").unwrap(), Some((Frame::Integer(59_000), 8)));
        assert_eq!(parse_frame(b"$-1\r\n").unwrap(), Some((Frame::Nil, 5)));
        assert_eq!(parse_frame(b"*2\r\n").unwrap(), Some((Frame::Array(2), 4)));
        assert_eq!(parse_frame(b"$3\r\nabc\r\n:1\r\n").unwrap(), Some((Frame::Bulk(4..7), 9)));
        assert_eq!(parse_frame(b"$0\r\n\r\n").unwrap(), Some((Frame::Bulk(4..4), 6)));
        // The error code only: Redis's message text is never kept.
        let error = b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n";
        assert_eq!(parse_frame(error).unwrap(), Some((Frame::Error("WRONGTYPE".into()), error.len())));
    }

    #[test]
    fn incomplete_frames_wait_for_more() {
        for partial in [&b""[..], b":12", b":12\r", b"$3\r\nab", b"$3\r\nabc", b"$3\r\nabc\r", b"-ERR some"] {
            assert_eq!(parse_frame(partial).unwrap(), None, "{:?}", String::from_utf8_lossy(partial));
        }
    }

    #[test]
    fn malformed_frames_are_protocol_errors() {
        let oversized = format!("${}\r\n", MAX_BULK + 1);
        let endless = vec![b'+'; MAX_LINE + 1];
        for bad in [
            &b"*x\r\n"[..],
            b"%1\r\n",
            b"\r\n",
            b":x\r\n",
            b"$-2\r\n",
            b"$3\r\nabcd\r\n",
            oversized.as_bytes(),
            &endless,
        ] {
            assert_eq!(parse_frame(bad), Err(ReadError::Protocol), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    type Receiver = oneshot::Receiver<Result<EntryReply, ReadError>>;

    /// A pipeline state with batches of `reads` reads written, as the writer leaves it.
    fn written(batches: &[usize], markers: bool) -> (Shared, Vec<Receiver>) {
        let shared = Shared::new();
        let mut receivers = Vec::new();
        {
            let mut state = shared.lock();
            state.markers = markers;
            for (number, &reads) in (1..).zip(batches) {
                for _ in 0..reads {
                    let (responder, receiver) = oneshot::channel();
                    state.in_flight.push_back(Slot::Read(responder));
                    receivers.push(receiver);
                }
                state.in_flight.push_back(Slot::End(markers.then_some(number)));
            }
        }
        (shared, receivers)
    }

    #[test]
    fn replies_are_handed_out_a_whole_batch_at_a_time_with_its_clock() {
        let (shared, mut receivers) = written(&[2, 1], true);
        let second = [value(b"second"), time(12)].concat();
        let mut buf =
            BytesMut::from(&[value(b"first"), value(b""), time(10), marker(1), second[..9].to_vec()].concat()[..]);
        answer(&shared, &mut buf).unwrap();
        let first = receivers[0].try_recv().unwrap().unwrap();
        assert_eq!(first, EntryReply { value: Some(Bytes::from_static(b"first")), now: at(10) });
        assert_eq!(receivers[1].try_recv().unwrap().unwrap(), EntryReply { value: None, now: at(10) });
        assert_eq!(&buf[..], &second[..9], "an incomplete batch stays in the buffer");

        buf.extend_from_slice(&second[9..]);
        answer(&shared, &mut buf).unwrap();
        assert!(receivers[2].try_recv().is_err(), "complete, but its batch's marker has not come");
        buf.extend_from_slice(&marker(2));
        answer(&shared, &mut buf).unwrap();
        assert_eq!(receivers[2].try_recv().unwrap().unwrap(), EntryReply { value: Some("second".into()), now: at(12) });
        assert!(buf.is_empty());
        assert!(shared.lock().waiting_since.is_none(), "nothing is awaited any more");
    }

    #[test]
    fn without_markers_a_batch_ends_with_its_clock() {
        let (shared, mut receivers) = written(&[1, 1], false);
        let mut buf = BytesMut::from(&[value(b"v1"), time(900), value(b"v2")].concat()[..]);
        answer(&shared, &mut buf).unwrap();
        assert_eq!(receivers[0].try_recv().unwrap().unwrap(), EntryReply { value: Some("v1".into()), now: at(900) });
        assert!(receivers[1].try_recv().is_err());
        buf.extend_from_slice(&time(901));
        answer(&shared, &mut buf).unwrap();
        assert_eq!(receivers[1].try_recv().unwrap().unwrap(), EntryReply { value: Some("v2".into()), now: at(901) });
    }

    #[test]
    fn a_server_error_fails_that_read_only() {
        let (shared, mut receivers) = written(&[2], true);
        let refused = b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n".to_vec();
        let mut buf = BytesMut::from(&[refused, value(b""), time(6), marker(1)].concat()[..]);
        answer(&shared, &mut buf).unwrap();
        assert_eq!(receivers[0].try_recv().unwrap(), Err(ReadError::Server("WRONGTYPE".into())));
        assert_eq!(receivers[1].try_recv().unwrap(), Ok(EntryReply { value: None, now: at(6) }));
        // A refused TIME (an ACL without it) fails the batch's reads, not the stream.
        let (shared, mut receivers) = written(&[1], true);
        let mut buf = BytesMut::from(&[value(b"v"), b"-NOPERM no\r\n".to_vec(), marker(1)].concat()[..]);
        answer(&shared, &mut buf).unwrap();
        assert_eq!(receivers[0].try_recv().unwrap(), Err(ReadError::Server("NOPERM".into())));
    }

    #[test]
    fn a_stream_out_of_step_is_a_protocol_error_before_any_reply_is_handed_out() {
        // A reply too many, after the batch.
        let (shared, _receivers) = written(&[1], true);
        let mut buf = BytesMut::from(&[value(b""), time(1), marker(1), b":-2\r\n".to_vec()].concat()[..]);
        assert_eq!(answer(&shared, &mut buf), Err(ReadError::Protocol));
        // A value that is not a string (GETRANGE answers one even for an absent key).
        let (shared, _receivers) = written(&[1], true);
        let mut buf = BytesMut::from(&[b"$-1\r\n".to_vec(), time(1), marker(1)].concat()[..]);
        assert_eq!(answer(&shared, &mut buf), Err(ReadError::Protocol));
        // A value where the clock should be: replies were lost or gained.
        let (shared, _receivers) = written(&[1], false);
        let mut buf = BytesMut::from(&[value(b"a"), value(b"b")].concat()[..]);
        assert_eq!(answer(&shared, &mut buf), Err(ReadError::Protocol));
        // Another batch's marker: replies were lost, and these belong to other reads.
        let (shared, mut receivers) = written(&[2], true);
        let mut buf = BytesMut::from(&[value(b"a"), value(b"b"), time(2), marker(7)].concat()[..]);
        assert_eq!(answer(&shared, &mut buf), Err(ReadError::Protocol));
        assert!(receivers.iter_mut().all(|r| r.try_recv().is_err()), "no read got a reply");
    }

    proptest::proptest! {
        /// Whatever a server sends, parsing returns (never panics) and never claims more than
        /// it was given.
        #[test]
        fn any_bytes_parse_without_panicking(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            if let Ok(Some((_, used))) = parse_frame(&bytes) {
                proptest::prop_assert!(used <= bytes.len());
            }
            for markers in [true, false] {
                let (shared, _receivers) = written(&[2, 1], markers);
                let _ = answer(&shared, &mut BytesMut::from(&bytes[..]));
            }
        }

        /// However the replies are cut into reads, every read gets its own entry.
        #[test]
        fn replies_split_anywhere_reach_their_own_reads(
            entries in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40), 1..12),
            secs in 0u64..2_000_000_000,
            markers in proptest::prelude::any::<bool>(),
            cuts in proptest::collection::vec(1usize..64, 1..40),
        ) {
            let (shared, mut receivers) = written(&[entries.len()], markers);
            let mut stream = Vec::new();
            for entry in &entries {
                stream.extend_from_slice(&value(entry));
            }
            stream.extend_from_slice(&time(secs));
            if markers {
                stream.extend_from_slice(&marker(1));
            }
            let mut buf = BytesMut::new();
            let mut rest = &stream[..];
            for cut in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, tail) = rest.split_at((*cut).min(rest.len()));
                buf.extend_from_slice(chunk);
                answer(&shared, &mut buf).unwrap();
                rest = tail;
            }
            proptest::prop_assert!(buf.is_empty());
            for (entry, receiver) in entries.iter().zip(&mut receivers) {
                let reply = receiver.try_recv().unwrap().unwrap();
                proptest::prop_assert_eq!(reply.now, at(secs));
                proptest::prop_assert_eq!(reply.value.as_deref(), (!entry.is_empty()).then_some(&entry[..]));
            }
        }
    }

    #[test]
    fn a_target_never_shows_its_password() {
        let target = Target {
            host: "redis.internal".into(),
            port: 6379,
            username: Some("proxy".into()),
            password: Some("hunter2-canary".into()),
            database: Some(1),
            tls: None,
            credentials: None,
            max_age: None,
        };
        let shown = format!("{target:?}");
        assert!(shown.contains("redis.internal") && !shown.contains("hunter2"), "{shown}");
    }
}

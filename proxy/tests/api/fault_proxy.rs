//! A small fault-injecting TCP proxy, put in front of Redis or of the upstream (docs/architecture.md, testing).
//!
//! These machines have neither `tc netem` nor toxiproxy. So a test that needs a bad network between
//! token-proxy and Redis (or the upstream) starts a [`FaultProxy`] in front of the real server and
//! gives token-proxy [`FaultProxy::addr`] instead of the server's own address. Killing or pausing a
//! process covers "the server is gone" and "the server is frozen". This proxy covers the network
//! faults in between: latency, partitions, refused connections, lost pub/sub messages and resets.
//!
//! Faults can be switched on and off at any time. They apply to connections that are already open
//! as well as to new ones, because each pump reads the current settings again for every chunk. A
//! chunk is whatever one read returns, at most 16 KiB.
//!
//! Each accepted connection gets a supervisor task, which connects to the target, and two pump tasks
//! (client→target and target→client). The three share a per-connection stop signal: [`reset_all`],
//! `Drop` and a pump that fails use it to end both pumps. After that the supervisor closes both
//! sockets, with an RST if the connection was reset and a FIN otherwise. A registry of live
//! connections lets [`reset_all`] and `Drop` reach every connection. Each supervisor removes its
//! connection from the registry once both sockets are closed.
//!
//! [`reset_all`]: FaultProxy::reset_all

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The most one read takes, and so the largest chunk the faults act on.
const CHUNK: usize = 16 * 1024;

/// A TCP proxy on `127.0.0.1` that forwards every connection to one target and injects faults on
/// demand. Dropping it stops the listener and closes every connection it holds.
#[derive(Debug)]
pub struct FaultProxy {
    /// Where clients connect: give this to the system under test instead of the target's address.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    listener: JoinHandle<()>,
}

/// The faults in force. Pumps read them again for every chunk.
#[derive(Debug, Default)]
struct Faults {
    latency: Duration,
    blackhole: bool,
    refuse: bool,
    drop_downstream: Option<Vec<u8>>,
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    faults: watch::Sender<Faults>,
    registry: Mutex<Registry>,
    dropped: AtomicU64,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // The registry holds no invariant that a panicking holder could break halfway.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The live connections, each with the sender of its stop signal.
#[derive(Debug, Default)]
struct Registry {
    /// Set by `Drop`. After that the listener registers nothing new.
    closed: bool,
    next_id: u64,
    live: HashMap<u64, watch::Sender<Stop>>,
}

/// A connection's stop signal. Values are ordered, so a stronger request wins: a reset overrides a
/// close, never the other way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stop {
    Running,
    /// End both pumps, then close both sockets normally (FIN).
    Close,
    /// End both pumps, then abort both sockets (RST).
    Reset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client → target.
    Upstream,
    /// Target → client.
    Downstream,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and forwards every accepted connection to `target`.
    ///
    /// A connection to `target` is made for each client connection. If that fails, the client
    /// connection is reset, as it would be by a dead server.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the fault proxy on loopback");
        let addr = listener.local_addr().expect("the fault proxy's address");
        let shared = Arc::new(Shared {
            target,
            faults: watch::channel(Faults::default()).0,
            registry: Mutex::default(),
            dropped: AtomicU64::new(0),
        });
        let listener = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        FaultProxy { addr, shared, listener }
    }

    /// Delay added before forwarding each chunk, both directions (Duration::ZERO = none).
    ///
    /// Why: this is a slow network, or a Redis or upstream that is alive but slow to answer. It
    /// checks that token-proxy's deadlines hold (a slow Redis costs at most its deadline) without
    /// freezing the server process. A frozen process would stall every other client of it as well.
    /// Chunks in one direction are delayed one after another, so a connection that sends many
    /// chunks waits `latency` for each of them.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.faults.send_modify(|faults| faults.latency = latency);
    }

    /// While on: bytes in both directions are read and discarded; connections stay open (a partition).
    ///
    /// Why: in a network partition the TCP connection still looks healthy. No data arrives, and no
    /// FIN or RST either, so only timeouts notice. An EOF from either side is held back as well and
    /// passed on only when the partition ends. Bytes swallowed during the partition are gone for
    /// good: they are not delivered when it ends. Unlike `SIGSTOP` on Redis, the server keeps running
    /// and keeps serving clients that do not go through this proxy.
    pub fn set_blackhole(&self, on: bool) {
        self.shared.faults.send_modify(|faults| faults.blackhole = on);
    }

    /// While on: new connections are accepted and closed at once (connection refused-like).
    ///
    /// Why: a server that is down, or a port nobody listens on, while connections that are already
    /// open keep working. It exercises reconnect policies and fail-fast paths. The kernel completes
    /// the handshake before the proxy can refuse, so the client sees a connect that succeeds and
    /// then a reset (RST) on its first read or write, not `ECONNREFUSED` from `connect`. The target
    /// never sees these connections.
    pub fn set_refuse(&self, on: bool) {
        self.shared.faults.send_modify(|faults| faults.refuse = on);
    }

    /// While Some(pattern): any chunk travelling from target to client that contains `pattern`
    /// is dropped whole (e.g. b"message" drops Redis pub/sub pushes on a subscriber connection
    /// while the connection itself stays up). None turns it off.
    ///
    /// Why: Redis pub/sub is at-most-once. A notification can be lost while the subscriber stays
    /// connected, and the design relies on a periodic `GET` backstop and on lock expiry for exactly
    /// that case (docs/architecture.md, the lock protocol). Only whole chunks are dropped, and a chunk can carry more than one
    /// reply, so use this on connections whose traffic is only the pushes to lose, e.g. a dedicated
    /// subscriber connection. An empty pattern matches every chunk.
    pub fn set_drop_downstream_matching(&self, pattern: Option<Vec<u8>>) {
        self.shared.faults.send_modify(|faults| faults.drop_downstream = pattern);
    }

    /// Resets (RST) every currently open connection, both sides.
    ///
    /// Why: a Redis restart or failover, a load balancer or NAT that forgets a connection, or a
    /// crashed peer. The client learns of it only on its next read or write, and must reconnect
    /// rather than hang (fred's defaults hang forever). The proxy keeps listening, so
    /// reconnecting works unless [`set_refuse`](Self::set_refuse) is on. [`connections`](Self::connections)
    /// falls to 0 shortly after, not at once: poll it.
    pub fn reset_all(&self) {
        for stop in self.shared.registry().live.values() {
            halt(stop, Stop::Reset);
        }
    }

    /// Open proxied connections right now.
    ///
    /// This counts a connection from the moment it is accepted until both of its sockets are closed.
    pub fn connections(&self) -> usize {
        self.shared.registry().live.len()
    }

    /// Chunks dropped by set_drop_downstream_matching so far.
    pub fn dropped_chunks(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    /// Stops the listener and closes every connection (FIN, not RST). This happens asynchronously:
    /// the port stops accepting and the sockets close as soon as the runtime runs the tasks
    /// concerned (at the next await on a current-thread runtime). A connection the listener accepts
    /// in the meantime is closed at once and never reaches the target.
    fn drop(&mut self) {
        self.listener.abort();
        let mut registry = self.shared.registry();
        registry.closed = true;
        for stop in registry.live.values() {
            halt(stop, Stop::Close);
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                // E.g. out of file descriptors for a moment: keep serving rather than vanish.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if shared.faults.borrow().refuse {
            reset(client);
            continue;
        }
        let stop = watch::channel(Stop::Running).0;
        let id = {
            let mut registry = shared.registry();
            if registry.closed {
                return;
            }
            registry.next_id += 1;
            let id = registry.next_id;
            registry.live.insert(id, stop.clone());
            id
        };
        tokio::spawn(connection(id, client, stop, Arc::clone(&shared)));
    }
}

/// The supervisor of one connection: connects to the target, runs the two pumps, closes both
/// sockets as the stop signal says, and then leaves the registry.
async fn connection(id: u64, client: TcpStream, stop: watch::Sender<Stop>, shared: Arc<Shared>) {
    let target = tokio::select! {
        connected = TcpStream::connect(shared.target) => connected.ok(),
        () = stopped(stop.subscribe()) => None,
    };
    match target {
        Some(target) => relay(client, target, &stop, &shared).await,
        // The target is down (or the proxy stopped first): the client sees what a dead server gives.
        None => reset(client),
    }
    shared.registry().live.remove(&id);
}

async fn relay(client: TcpStream, target: TcpStream, stop: &watch::Sender<Stop>, shared: &Arc<Shared>) {
    // Without Nagle, what one write sends tends to arrive as one chunk, and latency is only what
    // was asked for.
    client.set_nodelay(true).ok();
    target.set_nodelay(true).ok();
    let (client_read, client_write) = client.into_split();
    let (target_read, target_write) = target.into_split();
    let upstream = tokio::spawn(pump(client_read, target_write, Direction::Upstream, stop.clone(), Arc::clone(shared)));
    let downstream =
        tokio::spawn(pump(target_read, client_write, Direction::Downstream, stop.clone(), Arc::clone(shared)));
    // The pumps hand their halves back, so that each socket is closed whole. Dropping a write half
    // on its own would send a FIN ahead of the RST. A pump can only fail to return if the runtime
    // is shutting down, and then the sockets are dropped with it.
    let (Ok((client_read, target_write)), Ok((target_read, client_write))) = (upstream.await, downstream.await) else {
        return;
    };
    let client = client_read.reunite(client_write).expect("both halves of the client socket");
    let target = target_read.reunite(target_write).expect("both halves of the target socket");
    if *stop.borrow() == Stop::Reset {
        reset(client);
        reset(target);
    }
}

/// Forwards `from` to `to` until EOF, failure or the stop signal, then returns both halves.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    direction: Direction,
    stop: watch::Sender<Stop>,
    shared: Arc<Shared>,
) -> (OwnedReadHalf, OwnedWriteHalf) {
    tokio::select! {
        () = stopped(stop.subscribe()) => {}
        forwarded = forward(&mut from, &mut to, direction, shared.faults.subscribe(), &shared) => {
            // A reset or broken socket on one side is passed on to the other as a reset. A clean EOF
            // has already been passed on as a FIN, and the other direction goes on by itself.
            if forwarded.is_err() {
                halt(&stop, Stop::Reset);
            }
        }
    }
    (from, to)
}

async fn forward(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    direction: Direction,
    mut faults: watch::Receiver<Faults>,
    shared: &Shared,
) -> io::Result<()> {
    let mut buf = vec![0; CHUNK];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // A partition hides the FIN too: hold it back until the blackhole is lifted. (This only
            // fails once the proxy is gone, and then the stop signal ends the pump anyway.)
            faults.wait_for(|faults| !faults.blackhole).await.ok();
            return to.shutdown().await;
        }
        let chunk = &buf[..n];
        let latency = {
            let faults = faults.borrow();
            if faults.blackhole {
                continue;
            }
            let drop_it = direction == Direction::Downstream
                && faults.drop_downstream.as_deref().is_some_and(|pattern| contains(chunk, pattern));
            if drop_it {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            faults.latency
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        to.write_all(chunk).await?;
    }
}

fn contains(chunk: &[u8], pattern: &[u8]) -> bool {
    pattern.is_empty() || chunk.windows(pattern.len()).any(|window| window == pattern)
}

/// Waits until the connection is asked to stop.
async fn stopped(mut stop: watch::Receiver<Stop>) {
    // An error means every sender is gone, and then the connection is over anyway.
    stop.wait_for(|stop| *stop != Stop::Running).await.ok();
}

/// Asks a connection to stop. A stronger request replaces a weaker one, and nothing undoes a request.
fn halt(stop: &watch::Sender<Stop>, how: Stop) {
    stop.send_if_modified(|current| {
        let stronger = how > *current;
        if stronger {
            *current = how;
        }
        stronger
    });
}

/// Closes `stream` with an RST instead of a FIN. With a zero linger the kernel aborts the connection
/// on close. (`set_zero_linger` replaces the deprecated `set_linger(Some(Duration::ZERO))`.)
fn reset(stream: TcpStream) {
    stream.set_zero_linger().ok();
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    use tokio::sync::mpsc;
    use tokio::time::{sleep, timeout};

    use super::*;

    /// The bound on anything a test waits for. A test that hits it has failed.
    const LIMIT: Duration = Duration::from_secs(5);

    async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
        timeout(LIMIT, future).await.unwrap_or_else(|_| panic!("{what}: nothing within {LIMIT:?}"))
    }

    async fn wait_until(what: &str, condition: impl Fn() -> bool) {
        within(what, async {
            while !condition() {
                sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    /// The target: echoes every byte back. It counts the connections it accepts and the bytes it
    /// receives, and reports how each connection ended: `Ok(())` for an EOF (FIN), or the error kind
    /// (e.g. `ConnectionReset` for an RST).
    #[derive(Debug)]
    struct Echo {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        received: Arc<AtomicUsize>,
        ended: mpsc::UnboundedReceiver<Result<(), io::ErrorKind>>,
    }

    impl Echo {
        async fn start() -> Echo {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accepted = Arc::new(AtomicUsize::new(0));
            let received = Arc::new(AtomicUsize::new(0));
            let (report, ended) = mpsc::unbounded_channel();
            let (connections, bytes) = (Arc::clone(&accepted), Arc::clone(&received));
            tokio::spawn(async move {
                loop {
                    let (mut stream, _) = listener.accept().await.unwrap();
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (report, bytes) = (report.clone(), Arc::clone(&bytes));
                    tokio::spawn(async move {
                        let mut buf = vec![0; CHUNK];
                        let outcome = loop {
                            match stream.read(&mut buf).await {
                                Ok(0) => break Ok(()),
                                Ok(n) => {
                                    bytes.fetch_add(n, Ordering::SeqCst);
                                    if let Err(error) = stream.write_all(&buf[..n]).await {
                                        break Err(error.kind());
                                    }
                                }
                                Err(error) => break Err(error.kind()),
                            }
                        };
                        report.send(outcome).ok();
                    });
                }
            });
            Echo { addr, accepted, received, ended }
        }

        async fn next_end(&mut self) -> Result<(), io::ErrorKind> {
            within("a connection to end at the echo server", self.ended.recv()).await.expect("echo server running")
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }

        fn received(&self) -> usize {
            self.received.load(Ordering::SeqCst)
        }
    }

    async fn connect(addr: SocketAddr) -> TcpStream {
        let stream = within("connect", TcpStream::connect(addr)).await.unwrap();
        stream.set_nodelay(true).unwrap();
        stream
    }

    /// Connects and asserts that the connection is closed or reset without delivering any byte. The
    /// reset can come so fast that `connect` itself reports it.
    async fn assert_closed_at_once(addr: SocketAddr) {
        let Ok(mut stream) = within("connect", TcpStream::connect(addr)).await else { return };
        // The write fails if the RST came first; the read then shows the end all the same.
        stream.write_all(b"hello?").await.ok();
        let read = read_once(&mut stream).await;
        assert!(matches!(read, Ok(0) | Err(_)), "the connection delivered data: {read:?}");
    }

    /// Sends `message` and asserts that exactly it comes back.
    async fn round_trip(stream: &mut TcpStream, message: &[u8]) {
        stream.write_all(message).await.unwrap();
        let mut echoed = vec![0; message.len()];
        within("the echo", stream.read_exact(&mut echoed)).await.unwrap();
        assert_eq!(echoed, message, "echoed bytes differ from the bytes sent");
    }

    /// Reads once and returns what the read gave: `Ok(0)` is an EOF.
    async fn read_once(stream: &mut TcpStream) -> io::Result<usize> {
        let mut buf = [0; 64];
        within("a read", stream.read(&mut buf)).await
    }

    #[tokio::test]
    async fn data_round_trips_unchanged_over_several_connections() {
        let mut echo = Echo::start().await;
        let proxy = FaultProxy::start(echo.addr).await;

        let mut first = connect(proxy.addr).await;
        let mut second = connect(proxy.addr).await;
        round_trip(&mut first, b"PING\r\n").await;
        round_trip(&mut second, b"*1\r\n$4\r\nPING\r\n").await;
        round_trip(&mut first, &[0, 255, 13, 10, 0]).await;
        wait_until("two open connections", || proxy.connections() == 2).await;

        // More than many chunks' worth, written while the echo is read, then a half-close: every byte
        // comes back in order, and the EOF travels to the target and back.
        let payload: Vec<u8> = (0..(1 << 20) + 7).map(|i: u32| (i % 251) as u8).collect();
        let (mut read, mut write) = first.into_split();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            write.write_all(&sent).await.unwrap();
            write.shutdown().await.unwrap();
        });
        let mut echoed = Vec::new();
        within("the echoed payload and EOF", read.read_to_end(&mut echoed)).await.unwrap();
        writer.await.unwrap();
        assert_eq!(echoed.len(), payload.len());
        assert!(echoed == payload, "the payload came back altered");
        assert_eq!(echo.next_end().await, Ok(()), "the target saw the client's FIN");
        wait_until("the finished connection to leave the registry", || proxy.connections() == 1).await;

        round_trip(&mut second, b"still here").await;
        assert_eq!(echo.accepted(), 2);
        assert_eq!(proxy.dropped_chunks(), 0);
    }

    #[tokio::test]
    async fn latency_delays_every_chunk_in_both_directions_on_open_connections() {
        let echo = Echo::start().await;
        let proxy = FaultProxy::start(echo.addr).await;
        let mut stream = connect(proxy.addr).await;
        round_trip(&mut stream, b"warm up").await;

        let latency = Duration::from_millis(150);
        proxy.set_latency(latency);
        let started = Instant::now();
        round_trip(&mut stream, b"slow").await;
        let elapsed = started.elapsed();
        assert!(elapsed >= 2 * latency, "a round trip crosses the proxy twice, yet took only {elapsed:?}");

        proxy.set_latency(Duration::ZERO);
        round_trip(&mut stream, b"back to normal").await;
    }

    #[tokio::test]
    async fn blackhole_swallows_data_and_eof_but_keeps_connections_open_until_lifted() {
        let mut echo = Echo::start().await;
        let proxy = FaultProxy::start(echo.addr).await;
        let mut talker = connect(proxy.addr).await;
        let mut closer = connect(proxy.addr).await;
        round_trip(&mut talker, b"before").await;
        round_trip(&mut closer, b"before").await;

        proxy.set_blackhole(true);
        talker.write_all(b"lost").await.unwrap();
        closer.shutdown().await.unwrap();
        let mut buf = [0; 16];
        let read = timeout(Duration::from_millis(300), talker.read(&mut buf)).await;
        assert!(read.is_err(), "a partition delivers nothing, not even an EOF; the read gave {read:?}");
        assert!(echo.ended.try_recv().is_err(), "the target saw a connection end through a partition");
        assert_eq!(echo.received(), 2 * b"before".len(), "bytes reached the target through a partition");
        assert_eq!(proxy.connections(), 2, "a partition closes no connection");

        proxy.set_blackhole(false);
        round_trip(&mut talker, b"after").await;
        assert_eq!(echo.next_end().await, Ok(()), "the held-back FIN arrives once the partition ends");
        assert_eq!(read_once(&mut closer).await.unwrap(), 0, "and the target's FIN comes back");
        wait_until("the closed connection to leave the registry", || proxy.connections() == 1).await;
    }

    #[tokio::test]
    async fn refuse_closes_new_connections_while_open_ones_keep_working() {
        let echo = Echo::start().await;
        let proxy = FaultProxy::start(echo.addr).await;
        let mut open = connect(proxy.addr).await;
        round_trip(&mut open, b"before").await;

        proxy.set_refuse(true);
        for _ in 0..3 {
            assert_closed_at_once(proxy.addr).await;
        }
        round_trip(&mut open, b"during").await;
        assert_eq!(echo.accepted(), 1, "refused connections never reach the target");
        assert_eq!(proxy.connections(), 1);

        proxy.set_refuse(false);
        let mut fresh = connect(proxy.addr).await;
        round_trip(&mut fresh, b"accepted again").await;
        assert_eq!(echo.accepted(), 2);
    }

    #[tokio::test]
    async fn drop_downstream_matching_drops_only_matching_chunks_and_counts_them() {
        let echo = Echo::start().await;
        let proxy = FaultProxy::start(echo.addr).await;
        let mut stream = connect(proxy.addr).await;
        round_trip(&mut stream, b"connected").await;

        proxy.set_drop_downstream_matching(Some(b"message".to_vec()));
        let subscribe = b"*3\r\n$9\r\nsubscribe\r\n$4\r\nchan\r\n:1\r\n";
        round_trip(&mut stream, subscribe).await;
        // A pub/sub push, then a chunk with the pattern in its middle. Their echoes are dropped on
        // the way back to the client. Waiting for the count keeps each message in its own chunk.
        let push = b"*3\r\n$7\r\nmessage\r\n$4\r\nchan\r\n$5\r\nhello\r\n";
        stream.write_all(push).await.unwrap();
        wait_until("the push to be dropped", || proxy.dropped_chunks() == 1).await;
        let middle = b"some message in the middle";
        stream.write_all(middle).await.unwrap();
        wait_until("the second chunk to be dropped", || proxy.dropped_chunks() == 2).await;
        // Had any dropped byte got through, these bytes would not be the first to arrive.
        round_trip(&mut stream, b"PONG").await;
        let sent = [&b"connected"[..], subscribe, push, middle, b"PONG"].concat();
        assert_eq!(echo.received(), sent.len(), "the way from client to target is never filtered");
        assert_eq!(proxy.connections(), 1, "dropping pushes leaves the connection up");

        proxy.set_drop_downstream_matching(None);
        round_trip(&mut stream, push).await;
        assert_eq!(proxy.dropped_chunks(), 2);
    }

    #[tokio::test]
    async fn reset_all_resets_both_sides_of_every_connection_and_keeps_listening() {
        let mut echo = Echo::start().await;
        let proxy = FaultProxy::start(echo.addr).await;
        let mut first = connect(proxy.addr).await;
        let mut second = connect(proxy.addr).await;
        round_trip(&mut first, b"one").await;
        round_trip(&mut second, b"two").await;
        wait_until("two open connections", || proxy.connections() == 2).await;

        proxy.reset_all();
        for client in [&mut first, &mut second] {
            let read = read_once(client).await;
            assert_eq!(read.map_err(|error| error.kind()).err(), Some(io::ErrorKind::ConnectionReset), "client side");
        }
        for _ in 0..2 {
            assert_eq!(echo.next_end().await, Err(io::ErrorKind::ConnectionReset), "target side");
        }
        wait_until("no open connections", || proxy.connections() == 0).await;

        let mut again = connect(proxy.addr).await;
        round_trip(&mut again, b"reconnected").await;
        assert_eq!(proxy.connections(), 1);
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_connections_and_its_listener() {
        let mut echo = Echo::start().await;
        let proxy = FaultProxy::start(echo.addr).await;
        let addr = proxy.addr;
        let mut stream = connect(addr).await;
        round_trip(&mut stream, b"hello").await;
        // Even a connection in a partition is closed.
        proxy.set_blackhole(true);

        drop(proxy);
        assert_eq!(read_once(&mut stream).await.unwrap(), 0, "the client sees a normal close");
        assert_eq!(echo.next_end().await, Ok(()), "the target sees a normal close");
        // The listener task is cancelled asynchronously, so the port may accept for a moment longer.
        within("the listener to close", async {
            while TcpStream::connect(addr).await.is_ok() {
                sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    #[tokio::test]
    async fn a_dead_target_resets_the_client_connection() {
        let unused = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = unused.local_addr().unwrap();
        drop(unused);
        let proxy = FaultProxy::start(dead).await;

        assert_closed_at_once(proxy.addr).await;
        wait_until("the failed connection to leave the registry", || proxy.connections() == 0).await;
    }
}

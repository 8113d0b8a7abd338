//! The accept loop of both listeners and their inbound protections.
//!
//! Per connection, in order:
//!
//! 1. The source network: a peer that is neither in `TOKEN_PROXY_ALLOWED_NETWORKS` nor a trusted
//!    proxy is dropped at once, before any TLS handshake or byte of HTTP. (Clients behind a
//!    trusted proxy are checked request by request in the handler.) The admin listener has no
//!    allowlist: keep it off the public network.
//! 2. Connection caps: past the listener's cap of open connections, or its cap per source
//!    address, a new connection is closed at once, so one source cannot take every descriptor
//!    or every connection task (see [`Occupancy`]).
//! 3. TLS, when configured (client listener only): the handshake must finish within the header-read timeout. The
//!    certificate and key are re-read when their files change; with a client CA, a client
//!    certificate signed by it is required (mTLS).
//! 4. HTTP/1.1 with a header-read timeout: a client must send each request head within it, and an
//!    idle keep-alive connection is closed after it too. One watchdog per connection enforces it
//!    (see [`Activity`]) rather than hyper's own header timer, which arms a timer for every
//!    request: at 100k requests a second that alone cost 6 % of the throughput of a cache hit.
//!
//! Each request goes to the listener's [`Handler`] with the peer's address (an axum router's
//! handlers read it as `axum::extract::ConnectInfo<SocketAddr>`). A failing
//! `accept` (above all, no file descriptor left) is counted and remembered for `/readyz` (see
//! [`AcceptFailures`]). When the shutdown future resolves, the loop stops accepting and waits for
//! open connections to finish their in-flight requests.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::response::Response;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::metrics::{ListenerKind, Metrics, Refusal};
use crate::source::SourcePolicy;

/// Certificate files of the client listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle client certificates must chain to (mTLS); `None` = no client certificates.
    pub client_ca: Option<PathBuf>,
}

/// One of the TLS files, for errors (a file is re-read when it changes, long after start-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    Cert,
    Key,
    ClientCa,
}

/// The certificate files are looked at no more often than this.
const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Pause after an accept error that is not about one connection (e.g. out of file descriptors).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// A listener counts as failing to accept this long after its last accept error. The loop
/// retries every [`ACCEPT_ERROR_BACKOFF`] while connections wait, so an ongoing failure renews
/// it many times over; once the errors stop, `/readyz` recovers by itself (a flag cleared only by
/// the next successful accept would keep a replica that a load balancer stopped sending
/// connections to unready forever).
const ACCEPT_FAILURE_MEMORY: Duration = Duration::from_secs(2);

/// A TLS file that cannot be used, at start-up or when reloaded. `Display` is one line naming
/// the file's setting (the configuration knows its name) and path; it never shows key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", file.setting().name)]
pub struct TlsSetupError {
    pub file: TlsFile,
    pub message: String,
}

fn tls_error(file: TlsFile, message: impl Into<String>) -> TlsSetupError {
    TlsSetupError { file, message: message.into() }
}

/// How a listener treats connections, built from the config before binding is done.
pub struct Inbound {
    kind: ListenerKind,
    tls: Option<TlsAcceptor>,
    client_certificates: bool,
    header_read_timeout: Duration,
    sources: Arc<SourcePolicy>,
    occupancy: Arc<Occupancy>,
    failures: Arc<AcceptFailures>,
}

impl fmt::Debug for Inbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbound")
            .field("kind", &self.kind)
            .field("tls", &self.tls.is_some())
            .field("client_certificates", &self.client_certificates)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("occupancy", &self.occupancy)
            .finish()
    }
}

impl Inbound {
    /// The client listener's: reads the TLS files, if any (a file that cannot be used fails
    /// here, at start-up).
    pub fn client(
        tls: Option<&TlsFiles>,
        header_read_timeout: Duration,
        max_connections: usize,
        max_per_source: usize,
        sources: Arc<SourcePolicy>,
        failures: Arc<AcceptFailures>,
    ) -> Result<Inbound, TlsSetupError> {
        Ok(Inbound {
            kind: ListenerKind::Client,
            client_certificates: tls.is_some_and(|tls| tls.client_ca.is_some()),
            tls: tls.map(server_config).transpose()?.map(TlsAcceptor::from),
            header_read_timeout,
            sources,
            occupancy: Arc::new(Occupancy::new(max_connections, max_per_source)),
            failures,
        })
    }

    /// The admin listener's: plain HTTP, any source, the same header-read timeout, a cap of
    /// its own (and no cap per source: its callers are the operator's few monitors).
    pub fn admin(header_read_timeout: Duration, max_connections: usize, failures: Arc<AcceptFailures>) -> Inbound {
        Inbound {
            kind: ListenerKind::Admin,
            tls: None,
            client_certificates: false,
            header_read_timeout,
            sources: Arc::new(SourcePolicy::default()),
            occupancy: Arc::new(Occupancy::new(max_connections, max_connections)),
            failures,
        }
    }
}

/// Serves `handler` on `listener` until `shutdown` resolves, then waits for open connections to
/// finish their in-flight requests.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: H,
    inbound: Inbound,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let Inbound { kind, tls, client_certificates, header_read_timeout, sources, occupancy, failures } = inbound;
    tracing::info!(
        listener = kind.label(),
        tls = tls.is_some(),
        client_certificates,
        ?header_read_timeout,
        max_connections = occupancy.max_open,
        max_connections_per_source = occupancy.max_per_source,
        "listener protections"
    );
    let mut http = http1::Builder::new();
    http.keep_alive(true);
    let connection = Arc::new(Connection { kind, http, tls, header_read_timeout, handler });
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) if is_connection_error(&error) => {
                    tracing::debug!(%error, "a connection failed before it was accepted");
                    continue;
                }
                Err(error) => {
                    metrics.accept_error(kind);
                    // Once per spell of failures, not at every retry.
                    if failures.record(kind) {
                        tracing::warn!(listener = kind.label(), %error, "cannot accept connections; retrying shortly");
                    } else {
                        tracing::debug!(listener = kind.label(), %error, "still cannot accept connections");
                    }
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                    }
                }
            },
        };
        if !sources.admits_connection(peer.ip()) {
            metrics.connection_refused(kind, Refusal::Source);
            tracing::debug!(%peer, "connection from a source outside the allowed networks dropped");
            drop(stream);
            continue;
        }
        let occupant = match Occupancy::enter(&occupancy, sources.connection_source(peer.ip())) {
            Ok(occupant) => occupant,
            Err(refusal) => {
                metrics.connection_refused(kind, refusal);
                tracing::debug!(%peer, listener = kind.label(), reason = refusal.label(), "connection over a cap dropped");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let connection = Arc::clone(&connection);
        let metrics = Arc::clone(&metrics);
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            connection.serve(stream, peer, watcher, &metrics).await;
            drop(occupant);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Open connections of one listener, in total and per source, against its caps. One lock
/// taken twice per connection (not per request): keep-alive connections carry many requests.
/// The handler counts unfinished requests of sources behind trusted proxies with one too.
#[derive(Debug)]
pub(crate) struct Occupancy {
    max_open: usize,
    max_per_source: usize,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    /// Only sources with open connections have an entry, so the map is bounded by `max_open`.
    per_source: HashMap<IpAddr, usize>,
}

/// One open connection's (or request's) place, given back when dropped.
pub(crate) struct Occupant {
    occupancy: Arc<Occupancy>,
    source: Option<IpAddr>,
}

impl Occupancy {
    pub(crate) fn new(max_open: usize, max_per_source: usize) -> Occupancy {
        Occupancy { max_open, max_per_source, counts: Mutex::default() }
    }

    /// A place for a connection counted against `source` (`None`: against the total only).
    pub(crate) fn enter(occupancy: &Arc<Occupancy>, source: Option<IpAddr>) -> Result<Occupant, Refusal> {
        let mut counts = occupancy.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if counts.open >= occupancy.max_open {
            return Err(Refusal::ListenerFull);
        }
        if let Some(source) = source {
            let from_source = counts.per_source.entry(source).or_default();
            if *from_source >= occupancy.max_per_source {
                return Err(Refusal::PerSource);
            }
            *from_source += 1;
        }
        counts.open += 1;
        Ok(Occupant { occupancy: Arc::clone(occupancy), source })
    }
}

impl Drop for Occupant {
    fn drop(&mut self) {
        let mut counts = self.occupancy.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.open -= 1;
        if let Some(source) = self.source
            && let Some(from_source) = counts.per_source.get_mut(&source)
        {
            *from_source -= 1;
            if *from_source == 0 {
                counts.per_source.remove(&source);
            }
        }
    }
}

/// When each listener last failed to accept a connection, for `/readyz`: a replica that cannot
/// accept (out of file descriptors) must say so, or a load balancer keeps sending it clients.
#[derive(Debug, Default)]
pub struct AcceptFailures {
    last: [Mutex<Option<Instant>>; 2],
}

impl AcceptFailures {
    /// Remembers a failure now; whether it starts a new spell (none within the memory before).
    fn record(&self, kind: ListenerKind) -> bool {
        let mut last = self.last[kind as usize].lock().unwrap_or_else(PoisonError::into_inner);
        let new = !last.is_some_and(|at| at.elapsed() < ACCEPT_FAILURE_MEMORY);
        *last = Some(Instant::now());
        new
    }

    /// The first listener that failed to accept within the last [`ACCEPT_FAILURE_MEMORY`].
    pub fn failing(&self) -> Option<ListenerKind> {
        ListenerKind::ALL.into_iter().find(|kind| {
            let last = *self.last[*kind as usize].lock().unwrap_or_else(PoisonError::into_inner);
            last.is_some_and(|at| at.elapsed() < ACCEPT_FAILURE_MEMORY)
        })
    }
}

/// What answers a listener's requests, with the peer's address.
pub trait Handler: Send + Sync + 'static {
    fn call(
        &self,
        request: http::Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response> + Send + 'static;
}

/// An axum router: the peer reaches its handlers as `ConnectInfo<SocketAddr>`.
impl Handler for Router {
    fn call(
        &self,
        mut request: http::Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response> + Send + 'static {
        request.extensions_mut().insert(ConnectInfo(peer));
        let response = self.clone().oneshot(request);
        async move {
            match response.await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
    }
}

/// What every connection of the listener shares.
struct Connection<H> {
    kind: ListenerKind,
    http: http1::Builder,
    tls: Option<TlsAcceptor>,
    /// Also the TLS handshake's deadline.
    header_read_timeout: Duration,
    handler: H,
}

impl<H: Handler> Connection<H> {
    async fn serve(&self, stream: TcpStream, peer: SocketAddr, watcher: Watcher, metrics: &Metrics) {
        let Some(acceptor) = &self.tls else {
            return self.serve_http(stream, peer, watcher).await;
        };
        match tokio::time::timeout(self.header_read_timeout, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => self.serve_http(stream, peer, watcher).await,
            Ok(Err(error)) => {
                metrics.connection_refused(self.kind, Refusal::TlsHandshake);
                tracing::debug!(%peer, %error, "TLS handshake failed");
            }
            Err(_) => {
                metrics.connection_refused(self.kind, Refusal::TlsTimeout);
                tracing::debug!(%peer, "TLS handshake timed out");
            }
        }
    }

    async fn serve_http<S>(&self, stream: S, peer: SocketAddr, watcher: Watcher)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let handled = Arc::clone(&activity);
        let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
            let response = self.handler.call(request, peer);
            let handled = Arc::clone(&handled);
            handled.begin();
            async move {
                let response = response.await;
                handled.end();
                Ok::<_, Infallible>(response)
            }
        });
        let connection = watcher.watch(self.http.serve_connection(TokioIo::new(stream), service));
        tokio::select! {
            result = connection => {
                if let Err(error) = result {
                    // Resets and malformed requests: the client's business.
                    tracing::debug!(%peer, %error, "client connection ended with an error");
                }
            }
            // Dropping the connection closes it.
            () = activity.waiting_longer_than(self.header_read_timeout) => {
                tracing::debug!(%peer, "no complete request head in time; connection closed");
            }
        }
    }
}

/// What one connection is doing, for its header-read watchdog: handling a request, or waiting
/// for (the rest of) the next request head since some instant. Two atomic stores per request;
/// the watchdog looks twice per timeout, so a connection waiting too long is closed between one
/// and one and a half timeouts after its wait began.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    /// Requests being handled (hyper/1 handles one at a time; a count is simply robust).
    handling: AtomicU32,
    /// When the connection last started waiting for a request head, in ms since `opened`.
    waiting_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity { opened: Instant::now(), handling: Default::default(), waiting_since_ms: Default::default() }
    }

    fn begin(&self) {
        self.handling.fetch_add(1, Ordering::Relaxed);
    }

    fn end(&self) {
        self.waiting_since_ms.store(self.elapsed_ms(), Ordering::Relaxed);
        // Release: whoever sees the request finished also sees when.
        self.handling.fetch_sub(1, Ordering::Release);
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Resolves once the connection has waited for a request head longer than `timeout`.
    async fn waiting_longer_than(&self, timeout: Duration) {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        loop {
            tokio::time::sleep(timeout / 2).await;
            let idle = self.handling.load(Ordering::Acquire) == 0;
            let since = self.waiting_since_ms.load(Ordering::Relaxed);
            if idle && self.elapsed_ms().saturating_sub(since) >= timeout_ms {
                return;
            }
        }
    }
}

/// File descriptors a replica uses besides connections: the runtime's, standard streams,
/// certificate, header and secret files being re-read, Redis connections (three per server).
pub const OTHER_DESCRIPTORS: usize = 64;

/// Warns at start-up when the open-file limit is below what the connection caps may use at
/// once (`needed`): past the limit accepts fail (`/readyz` says so), and the operator can act
/// before that happens. `cap` names the setting to lower.
pub fn warn_if_descriptors_short(needed: usize, cap: &str) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    if let Some(limit) = open_file_limit(&limits)
        && limit < needed as u64
    {
        tracing::warn!(
            limit,
            needed,
            "the open-file limit (ulimit -n) is below what the connection caps allow; raise it (e.g. LimitNOFILE) \
             or lower {cap}, or accepts fail under load"
        );
    }
}

/// The soft `Max open files` of a `/proc/self/limits` text (Linux); `None` when absent or
/// unlimited.
fn open_file_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find_map(|line| line.strip_prefix("Max open files"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// Errors about one connection that went away before it was accepted: no reason to pause.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

// ---------------------------------------------------------------------------------------------
// TLS

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let provider = provider();
    let resolver = ReloadingCertificate::load(files.cert.clone(), files.key.clone(), Arc::clone(&provider))?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(TlsFile::Cert, e.to_string()))?;
    let builder = match &files.client_ca {
        Some(path) => {
            let roots = client_roots(path)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| tls_error(TlsFile::ClientCa, format!("{}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn client_roots(path: &Path) -> Result<RootCertStore, TlsSetupError> {
    let certificates = read_certificates(path).map_err(|message| tls_error(TlsFile::ClientCa, message))?;
    let mut roots = RootCertStore::empty();
    for certificate in certificates {
        roots.add(certificate).map_err(|e| tls_error(TlsFile::ClientCa, format!("{}: {e}", path.display())))?;
    }
    Ok(roots)
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certificates)
}

/// Reads a certificate chain and its key into a [`CertifiedKey`]. Errors say which file and
/// its path, never the key's bytes.
fn load_certified_key(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsSetupError> {
    let chain = read_certificates(cert).map_err(|message| tls_error(TlsFile::Cert, message))?;
    let pem = std::fs::read(key).map_err(|e| tls_error(TlsFile::Key, format!("cannot read {}: {e}", key.display())))?;
    // The parser's own errors may quote lines of the file: not one of them is shown.
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        tls_error(TlsFile::Key, format!("{}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in it", key.display()))
    })?;
    let signing_key = provider.key_provider.load_private_key(der).map_err(|_| {
        tls_error(TlsFile::Key, format!("{}: not a usable RSA, ECDSA or Ed25519 private key", key.display()))
    })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(_)) => Err(tls_error(
            TlsFile::Key,
            format!("{}: does not match the certificate in {}", key.display(), cert.display()),
        )),
        Err(e) => Err(tls_error(TlsFile::Cert, format!("{}: {e}", cert.display()))),
    }
}

/// What a file looked like when it was last read: changes when it is rewritten or replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        let metadata = std::fs::metadata(path).ok()?;
        Some(FileStamp { modified: metadata.modified().ok(), len: metadata.len() })
    }
}

/// Serves the certificate of the files, swapping in a new one when they change.
struct ReloadingCertificate {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    state: Mutex<ReloadState>,
}

struct ReloadState {
    current: Arc<CertifiedKey>,
    stamps: (Option<FileStamp>, Option<FileStamp>),
    checked: Instant,
}

impl fmt::Debug for ReloadingCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCertificate").field("cert", &self.cert).field("key", &self.key).finish()
    }
}

impl ReloadingCertificate {
    fn load(cert: PathBuf, key: PathBuf, provider: Arc<CryptoProvider>) -> Result<Self, TlsSetupError> {
        let stamps = (FileStamp::of(&cert), FileStamp::of(&key));
        let current = Arc::new(load_certified_key(&cert, &key, &provider)?);
        let state = Mutex::new(ReloadState { current, stamps, checked: Instant::now() });
        Ok(ReloadingCertificate { cert, key, provider, state })
    }

    /// The certificate to present, after looking at the files if a check is due.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.checked.elapsed() >= RELOAD_CHECK_INTERVAL {
            state.checked = Instant::now();
            let stamps = (FileStamp::of(&self.cert), FileStamp::of(&self.key));
            if stamps != state.stamps {
                // Remembered even when the files do not load: one warning per change, and the
                // next change (e.g. the key written after the certificate) is tried again.
                state.stamps = stamps;
                match load_certified_key(&self.cert, &self.key, &self.provider) {
                    Ok(certified) => {
                        state.current = Arc::new(certified);
                        tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                    }
                    Err(error) => {
                        tracing::warn!(%error, "TLS certificate files changed but cannot be used; keeping the previous certificate");
                    }
                }
            }
        }
        Arc::clone(&state.current)
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_open_file_limit_is_read_from_proc_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             63471                63471                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(open_file_limit(limits), Some(1024));
        assert_eq!(open_file_limit("Max open files            unlimited            unlimited            files"), None);
        assert_eq!(open_file_limit(""), None);
    }

    #[test]
    fn connection_caps_hold_in_total_and_per_source() {
        let occupancy = Arc::new(Occupancy::new(3, 2));
        let (a, b) = (Some("192.0.2.1".parse().unwrap()), Some("192.0.2.2".parse().unwrap()));
        let first = Occupancy::enter(&occupancy, a).unwrap();
        let _second = Occupancy::enter(&occupancy, a).unwrap();
        assert_eq!(Occupancy::enter(&occupancy, a).err(), Some(Refusal::PerSource));
        let _third = Occupancy::enter(&occupancy, b).unwrap();
        assert_eq!(Occupancy::enter(&occupancy, None).err(), Some(Refusal::ListenerFull));
        drop(first);
        assert!(Occupancy::enter(&occupancy, a).is_ok(), "a closed connection gives its place back");
        assert!(occupancy.counts.lock().unwrap().per_source.len() <= 2);
    }
}

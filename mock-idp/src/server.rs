//! Running the server: [`serve`] on a listener the caller bound (the binary), or [`spawn`] a
//! background server on a port of its own (tests).

use std::future::Future;
use std::io;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::connection::{Connection, CuttableListener};
use crate::idp::MockIdp;

/// Serves `idp` on `listener` until `shutdown` resolves. Then it stops accepting, ends hung
/// requests (for good: this `idp` will not hang requests again), lets requests in flight
/// finish, and returns.
pub async fn serve(
    listener: TcpListener,
    idp: MockIdp,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "mock-idp listening");
    let app = idp.router().into_make_service_with_connect_info::<Connection>();
    axum::serve(CuttableListener::new(listener), app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("mock-idp shutting down");
            idp.release_hung_requests();
        })
        .await
}

/// Binds `config.listen` (port 0 in tests) and serves in a background task until the returned
/// [`RunningMockIdp`] is dropped or [`RunningMockIdp::shutdown`] is called.
///
/// Errors: the client list is invalid (`InvalidInput`), or the address cannot be bound.
pub async fn spawn(config: Config) -> io::Result<RunningMockIdp> {
    let listen = config.listen;
    let idp = MockIdp::new(config).map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    // The receiver resolves when `stop` is sent to or dropped: either way the server stops.
    let task = tokio::spawn(serve(listener, idp.clone(), async move {
        let _ = stopped.await;
    }));
    Ok(RunningMockIdp { addr, idp, stop, task })
}

/// A mock-idp serving in the background. Dropping it stops the server: the port closes at
/// once, hung requests are dropped, requests in flight finish.
#[derive(Debug)]
pub struct RunningMockIdp {
    /// The bound address (the real port when `listen` had port 0).
    pub addr: SocketAddr,
    /// Controls and counters of the running server.
    pub idp: MockIdp,
    /// Dropped with `self`, which resolves the server's shutdown signal.
    stop: oneshot::Sender<()>,
    task: JoinHandle<io::Result<()>>,
}

impl RunningMockIdp {
    /// `http://ADDR`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://ADDR/oauth2/token`
    pub fn token_url(&self) -> String {
        format!("{}/oauth2/token", self.base_url())
    }

    /// `http://ADDR/.well-known/jwks.json`
    pub fn jwks_url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.base_url())
    }

    /// Stops the server and waits until it has finished (every connection closed).
    pub async fn shutdown(self) -> io::Result<()> {
        drop(self.stop);
        self.task.await.map_err(io::Error::other)?
    }
}

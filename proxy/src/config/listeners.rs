//! The two listeners: where they bind and how long they keep serving after SIGTERM.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;

use super::{ConfigError, Setting, Source};

pub static LISTEN: Setting =
    Setting { name: "TOKEN_PROXY_LISTEN", default: Some("0.0.0.0:8080"), help: "client-facing address" };
pub static ADMIN_LISTEN: Setting = Setting {
    name: "TOKEN_PROXY_ADMIN_LISTEN",
    default: Some("127.0.0.1:9090"),
    help: "address of /metrics, /healthz and /readyz",
};
pub static DRAIN_DELAY: Setting = Setting {
    name: "TOKEN_PROXY_DRAIN_DELAY",
    default: Some("5s"),
    help: "after SIGTERM, how long both listeners keep serving while /readyz answers 503 (load balancers take the replica out); 0 = stop at once",
};

/// Where the replica listens.
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    /// Client-facing address. Default 0.0.0.0:8080.
    pub client: SocketAddr,
    /// Admin address: metrics, health, readiness. Default 127.0.0.1:9090.
    pub admin: SocketAddr,
    /// After SIGTERM, how long both listeners keep serving while `/readyz` answers 503, so
    /// load balancers stop routing here before connections are refused; zero skips it. Then
    /// the listeners stop accepting and requests in flight get up to the request timeout to
    /// finish. Default 5 s.
    pub drain_delay: Duration,
}

impl ListenerSettings {
    pub(super) fn parse(source: &Source) -> Result<ListenerSettings, ConfigError> {
        Ok(ListenerSettings {
            client: source.parse(&LISTEN, "a socket address like 0.0.0.0:8080")?,
            admin: source.parse(&ADMIN_LISTEN, "a socket address like 127.0.0.1:9090")?,
            drain_delay: source.duration(&DRAIN_DELAY)?,
        })
    }

    /// Binds the client listener, then the admin listener. A failure names the variable.
    pub async fn bind(&self) -> Result<(TcpListener, TcpListener), ConfigError> {
        let bind = |setting: &'static Setting, address: SocketAddr| async move {
            TcpListener::bind(address).await.map_err(|e| setting.error(format!("cannot listen on {address}: {e}")))
        };
        Ok((bind(&LISTEN, self.client).await?, bind(&ADMIN_LISTEN, self.admin).await?))
    }
}

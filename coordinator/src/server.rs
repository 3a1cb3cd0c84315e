//! The network edge: a TLS accept loop that logs every refused handshake with
//! the peer's address and a reason an operator can act on, the tonic server
//! (agent gateway, admin, health, reflection v1 and v1alpha) on top of it,
//! and the HTTP server.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::proto::{admin_server::AdminServer, agent_gateway_server::AgentGatewayServer};
use common::tls::describe_handshake_error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::driver::DriverHandle;
use crate::grpc::{Admin, Authorize, Gateway};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Handshakes in flight at once; a connection beyond is refused at once
/// (queueing it would let idle connections hold up every later one).
const MAX_HANDSHAKES: usize = 256;
/// Handshakes in flight from one address: one host that opens connections
/// and never completes them cannot starve the others.
const MAX_HANDSHAKES_PER_PEER: usize = 16;

/// Counts handshakes in flight per peer address.
#[derive(Clone, Default)]
struct PerPeer(Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>);

/// One handshake counted against its peer until dropped.
struct PeerSlot {
    table: PerPeer,
    ip: IpAddr,
}

impl PerPeer {
    fn take(&self, ip: IpAddr) -> Option<PeerSlot> {
        let mut table = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = table.entry(ip).or_default();
        if *count >= MAX_HANDSHAKES_PER_PEER {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            table: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut table = self
            .table
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = table.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                table.remove(&self.ip);
            }
        }
    }
}

/// Accepts TCP connections and completes their TLS handshakes concurrently;
/// yields only the connections whose client certificate the CA verified.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let per_peer = PerPeer::default();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Usually out of file descriptors: back off, do not spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some(peer_slot) = per_peer.take(peer_key(peer.ip())) else {
                log_refused(peer, "too many handshakes in progress from this address");
                continue;
            };
            let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                log_refused(peer, "too many handshakes in progress");
                continue;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = (permit, peer_slot);
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        debug!(%peer, "TLS connection accepted");
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => log_refused(peer, &describe_handshake_error(&e)),
                    Err(_) => log_refused(peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// What counts as one peer for the per-peer bound: an IPv4 address (also
/// when mapped into IPv6), or an IPv6 /64 (one host can use a whole /64).
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

fn log_refused(peer: SocketAddr, reason: &str) {
    warn!(%peer, %reason, "refused connection");
}

/// Serves every gRPC service until `shutdown`; health as `lifecycle` says.
#[allow(clippy::too_many_arguments)]
pub async fn serve_grpc(
    incoming: ReceiverStream<io::Result<TlsStream<TcpStream>>>,
    driver: DriverHandle,
    store: Arc<dyn Store>,
    revoked_admins: tokio::sync::watch::Receiver<crate::driver::RevokedAdmins>,
    triage_rules: Arc<crate::triage::Rules>,
    github: Option<crate::github::client::Client>,
    lifecycle: crate::health::Lifecycle,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(lifecycle.grpc_service())
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(AgentGatewayServer::with_interceptor(
            Gateway::new(driver.clone(), github),
            Authorize::agents(),
        ))
        .add_service(AdminServer::with_interceptor(
            Admin::new(driver, store, triage_rules),
            Authorize::admins(revoked_admins),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}

fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(common::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
}

/// The HTTP side: `/healthz` now; webhooks and metrics join it.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_an_ipv4_address_or_an_ipv6_slash_64() {
        let key = |s: &str| peer_key(s.parse().expect("address"));
        assert_eq!(key("10.0.0.7"), key("::ffff:10.0.0.7"));
        assert_ne!(key("10.0.0.7"), key("10.0.0.8"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
    }
}

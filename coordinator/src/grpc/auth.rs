//! Authorization from the verified client certificate. An [`Authorize`]
//! interceptor runs before every call of a service: the caller's
//! certificate must carry the service's role (and an admin's name must not
//! be revoked); the identity it verified goes into the request's
//! extensions, where handlers take it with [`caller`]. A handler reached
//! without the interceptor finds no identity there and refuses the call
//! (fails closed), so no handler can skip the check.

use common::pki::Role;
use common::tls::PeerIdentity;
use tokio::sync::watch;
use tonic::service::Interceptor;
use tonic::{Request, Status};
use tracing::{error, warn};

use crate::driver::RevokedAdmins;

/// The caller's identity, verified by [`Authorize`]: a request extension.
#[derive(Clone, Debug)]
struct Verified(PeerIdentity);

/// The interceptor of one service.
#[derive(Clone)]
pub struct Authorize {
    role: Role,
    /// The service's name in log lines and refusals.
    service: &'static str,
    /// For the Admin API: the revoked admin names the driver publishes.
    revoked: Option<watch::Receiver<RevokedAdmins>>,
}

impl Authorize {
    /// `AgentGateway`: agent certificates.
    pub fn agents() -> Self {
        Self {
            role: Role::Agent,
            service: "agent stream",
            revoked: None,
        }
    }

    /// `Admin`: admin certificates whose name is not revoked.
    pub fn admins(revoked: watch::Receiver<RevokedAdmins>) -> Self {
        Self {
            role: Role::Admin,
            service: "Admin API",
            revoked: Some(revoked),
        }
    }
}

impl Interceptor for Authorize {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let identity = verify(&req, self.role, self.service)?;
        if let Some(reason) = self
            .revoked
            .as_ref()
            .and_then(|revoked| revoked.borrow().get(&identity.name).cloned())
        {
            warn!(peer = %peer_address(&req), admin = %identity.name, %reason, "{}: refused a revoked admin", self.service);
            return Err(Status::permission_denied(format!(
                "the certificate of admin {} is revoked: {reason}",
                identity.name
            )));
        }
        req.extensions_mut().insert(Verified(identity));
        Ok(req)
    }
}

/// The caller [`Authorize`] verified for this request. Without one the
/// service was mounted without its interceptor: the call is refused.
#[allow(clippy::result_large_err)]
pub fn caller<T>(req: &Request<T>) -> Result<&PeerIdentity, Status> {
    match req.extensions().get::<Verified>() {
        Some(Verified(identity)) => Ok(identity),
        None => {
            error!("a call reached its handler without an authorized caller: refused");
            Err(Status::permission_denied("caller not authorized"))
        }
    }
}

/// The peer's address, for log lines and agent records.
pub fn peer_address<T>(req: &Request<T>) -> String {
    req.remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The verified identity of the caller, and that it has `role`.
#[allow(clippy::result_large_err)]
fn verify<T>(req: &Request<T>, role: Role, service: &str) -> Result<PeerIdentity, Status> {
    let peer = peer_address(req);
    let certs = req.peer_certs().ok_or_else(|| {
        warn!(%peer, "{service}: no client certificate");
        Status::unauthenticated("a client certificate from the cluster CA is required")
    })?;
    let leaf = certs.first().ok_or_else(|| {
        warn!(%peer, "{service}: empty client certificate chain");
        Status::unauthenticated("a client certificate from the cluster CA is required")
    })?;
    let identity = PeerIdentity::from_der(leaf).map_err(|e| {
        warn!(%peer, error = %e, "{service}: unusable client certificate");
        Status::unauthenticated(e.to_string())
    })?;
    if identity.role != role {
        warn!(
            %peer,
            name = %identity.name,
            role = %identity.role,
            "{service}: refused, needs the {role} role"
        );
        return Err(Status::permission_denied(format!(
            "{service} needs a certificate with the {role} role; this one is {} {:?}",
            identity.role, identity.name
        )));
    }
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handler_without_the_interceptor_refuses_the_call() {
        let status = caller(&Request::new(())).expect_err("no identity");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn a_request_without_a_certificate_never_reaches_a_handler() {
        let (_tx, revoked) = watch::channel(RevokedAdmins::default());
        for mut authorize in [Authorize::agents(), Authorize::admins(revoked)] {
            let status = authorize.call(Request::new(())).expect_err("refused");
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
        }
    }
}

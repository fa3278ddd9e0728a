//! The agent's vsock listener: it answers the host and nobody else.
//!
//! The agent runs as guest root and can start processes in every container of the pod, so
//! a container process must never reach it. Three layers keep it out:
//! - the guest kernel has no vsock loopback transport (`CONFIG_VSOCKETS_LOOPBACK` off), so
//!   nothing in the guest can connect to a guest port at all;
//! - the agent listens on a privileged port (≤ 1023), which needs CAP_NET_BIND_SERVICE to
//!   bind, so no container can take the port over;
//! - every accepted connection whose peer is not the host (CID 2) is closed at once, with a
//!   rate-limited warning.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::stream::{self, Stream};
use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockListener, VsockStream};

/// Connections refused because the peer was not the host.
pub static REFUSED_PEERS: AtomicU64 = AtomicU64::new(0);

/// Whether a peer CID may talk to the agent.
pub fn peer_allowed(cid: u32) -> bool {
    cid == carapace_protocol::HOST_CID
}

/// Parses `vsock://CID:PORT` (`-1` for any CID) into the port to listen on.
pub fn vsock_port(addr: &str) -> Option<u32> {
    let rest = addr.strip_prefix("vsock://")?;
    let (_, port) = rest.rsplit_once(':')?;
    port.parse().ok()
}

/// Listens on `port` of every guest CID and yields only connections from the host.
pub fn host_only(port: u32) -> io::Result<impl Stream<Item = io::Result<VsockStream>> + Send> {
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))?;
    let last_warn: Option<Instant> = None;
    Ok(stream::unfold(
        (listener, last_warn),
        |(listener, mut last_warn)| async move {
            loop {
                match listener.accept().await {
                    Ok((s, peer)) if peer_allowed(peer.cid()) => {
                        return Some((Ok(s), (listener, last_warn)));
                    }
                    Ok((s, peer)) => {
                        drop(s);
                        let n = REFUSED_PEERS.fetch_add(1, Ordering::Relaxed) + 1;
                        if last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                            last_warn = Some(Instant::now());
                            tracing::warn!(
                                cid = peer.cid(),
                                port = peer.port(),
                                refused_so_far = n,
                                "refused a vsock connection that is not from the host"
                            );
                        }
                    }
                    Err(e) => return Some((Err(e), (listener, last_warn))),
                }
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_is_a_peer() {
        assert!(peer_allowed(2));
        for cid in [0, 1, 3, 4, u32::MAX] {
            assert!(!peer_allowed(cid), "cid {cid}");
        }
    }

    #[test]
    fn vsock_addresses_give_their_port() {
        assert_eq!(vsock_port("vsock://-1:1023"), Some(1023));
        assert_eq!(vsock_port("vsock://3:900"), Some(900));
        assert_eq!(vsock_port("unix:///run/a.sock"), None);
        assert_eq!(vsock_port("vsock://-1:x"), None);
    }
}

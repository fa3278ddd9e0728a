//! The guest network of the sandbox (ConfigureNetwork): the host gives the VM one
//! virtio-net NIC per interface of the pod's CNI network namespace, with that interface's
//! MAC, and asks the agent to configure them as CNI configured the namespace.
//!
//! - [`model`]: the request as plain data ([`NetworkRequest`], what the service converts
//!   the wire message to) and its parsed, validated form ([`NetworkConfig`]: typed MACs,
//!   addresses, names, routes); every check on the request's values is there, with the
//!   field it concerns in the error;
//! - [`apply`]: the applier over rtnetlink: it lists the links, matches the interfaces by
//!   MAC ([`model::plan`], also plain data), then renames, sets MTU, adds addresses, sets
//!   up, adds routes and neighbours; and [`apply::loopback_up`] for CreateSandbox.
//!
//! Nothing here is called in host mode (it would change the host's network): the core
//! refuses ConfigureNetwork there before parsing the request.

pub mod apply;
pub mod model;

pub use apply::{configure, loopback_up};
pub use model::{NetworkConfig, NetworkRequest};

/// Why a network request failed. The service maps each kind to a status code:
/// [`NetError::Invalid`] INVALID_ARGUMENT, [`NetError::Precondition`] FAILED_PRECONDITION, the
/// others INTERNAL.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A value of the request is refused; `field` is its path in the request
    /// (`interfaces[1].mtu`).
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// The guest's links do not fit the request: no link has an interface's MAC (the VM
    /// lacks the NIC the host meant; the reason names the MAC and lists the MACs
    /// present), or two links have it.
    #[error("{field}: {reason}")]
    Precondition { field: String, reason: String },
    /// A netlink request failed; `step` names it and the interface.
    #[error("{step}: {reason}")]
    Netlink { step: String, reason: String },
    #[error("opening a netlink socket")]
    Socket(#[source] std::io::Error),
}

impl NetError {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

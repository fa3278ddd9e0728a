//! Pod networking, host side: mirroring a CNI-configured network namespace into a VM
//! ("tcfilter" model, as Kata Containers does it).
//!
//! CNI (through containerd's CRI) hands the runtime a network namespace, for example
//! `/var/run/netns/cni-…` or `/proc/<pid>/ns/net`, in which its plugins made one or more
//! interfaces (typically `eth0`, one end of a veth pair) with addresses and routes. The VM
//! cannot use those interfaces directly; instead:
//!
//! 1. [`inspect`] reads the namespace over netlink into a [`NetworkPlan`]: each interface
//!    other than `lo` (name, MAC, MTU, kind, addresses without IPv6 link-local ones), the
//!    routes of the main table through them (without the `proto kernel` routes that the
//!    kernel derives from addresses; routes without a gateway first), and permanent
//!    neighbour entries. The plan is plain serde data, recorded in the sandbox state; the
//!    guest agent recreates exactly this inside the VM, and the VMM gives the VM one
//!    virtio-net device per interface **with the interface's MAC address**. What cannot be
//!    redirected is refused by name: only `lo`, more than [`MAX_INTERFACES`] interfaces,
//!    a tun/tap device (another program owns its traffic), a link layer other than
//!    Ethernet (WireGuard, IP tunnels), ipvlan/ipvtap in L3 or L3S mode (no ARP or
//!    neighbour discovery, which the guest's Ethernet device needs; L2 mode is fine),
//!    multipath routes, routes through nexthop objects, via another family, with
//!    encapsulation, or source-specific ones.
//! 2. [`attach`] creates in the namespace, for interface number `i`, a tap
//!    `tap<i>_carapace` (flags `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL`,
//!    virtio-net header of 12 bytes as `carapace-vmm` uses, offloads off, not persistent,
//!    IPv6 off so the namespace's own stack sends nothing into the VM, the interface's
//!    MTU, up), then an `ingress` qdisc on both the interface and the tap, each with a
//!    `u32` match-all filter whose action is `mirred egress redirect` to the other:
//!    `tc filter add dev eth0 parent ffff: protocol all u32 match u8 0 0 action mirred
//!    egress redirect dev tap0_carapace` and the reverse. Every frame arriving on `eth0`
//!    leaves through the tap to the VMM, every frame the VMM writes leaves through
//!    `eth0`; the namespace's own stack no longer sees the traffic (the addresses stay on
//!    `eth0`, where CNI's `DEL` expects them). It returns the tap descriptors (usable
//!    from any namespace: pass them to the VMM) and an [`AttachRecord`] for the state
//!    file. A failure undoes what that call made.
//! 3. [`detach`] removes, from the record alone, the qdiscs (and so the filters) and the
//!    taps; idempotent, and a namespace that is gone (containerd deletes it after CNI
//!    `DEL`) or replaced by another one at the same path counts as done.
//!
//! Every netlink exchange and every tap is made on a short-lived thread that entered the
//! namespace with `setns(CLONE_NEWNET)` ([`netns`]): the calling thread never changes
//! namespace. The three functions block: call them off an async executor
//! (`spawn_blocking`). They need `CAP_NET_ADMIN` and `CAP_SYS_ADMIN` (for `setns`).

mod attach;
mod netns;
mod plan;
mod tap;

use std::io;
use std::path::{Path, PathBuf};

pub use attach::{AttachRecord, Attached, AttachedLink, AttachedTap, attach, detach, tap_name};
pub use netns::NetnsId;
pub use plan::{
    MAX_INTERFACES, NetlinkDump, NetworkPlan, PlanError, PlannedInterface, PlannedNeighbor,
    PlannedRoute, plan_from_dump,
};
pub use tap::VNET_HDR_LEN;

use futures::TryStreamExt;
use rtnetlink::RouteMessageBuilder;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Errors of pod networking; each names the namespace, and the interface and step where
/// there is one.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The namespace path does not exist.
    #[error("network namespace {path} does not exist")]
    NoNetns {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The path is not a network namespace.
    #[error("{path} is not a network namespace")]
    NotNetns {
        /// The path.
        path: PathBuf,
    },
    /// Opening or entering the namespace failed.
    #[error("{what} the network namespace {path}")]
    Netns {
        /// "opening", "entering", ...
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The namespace holds something that cannot be mirrored into a VM.
    #[error("the network of {netns} cannot be mirrored into the VM")]
    Plan {
        /// The namespace.
        netns: PathBuf,
        /// What.
        #[source]
        source: PlanError,
    },
    /// A step inside the namespace failed, e.g. "adding the ingress qdisc to eth0".
    #[error("{step} in {netns}")]
    Step {
        /// What was being done (names the interface or tap).
        step: String,
        /// The namespace.
        netns: PathBuf,
        /// Cause (the kernel's errno when it sent one).
        #[source]
        source: io::Error,
    },
    /// The plan handed to [`attach`] cannot be attached.
    #[error("the network plan for {netns} is not usable: {reason}")]
    BadPlan {
        /// The namespace.
        netns: PathBuf,
        /// Why.
        reason: String,
    },
    /// [`detach`] met one or more problems (all steps were tried).
    #[error("tearing down the network in {netns}: {}", join_chains(problems))]
    Teardown {
        /// The namespace.
        netns: PathBuf,
        /// Each problem.
        problems: Vec<NetworkError>,
    },
}

fn join_chains(problems: &[NetworkError]) -> String {
    problems.iter().map(chain).collect::<Vec<_>>().join("; ")
}

/// An error with its sources, `: `-separated.
fn chain(error: &NetworkError) -> String {
    let mut s = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        s.push_str(": ");
        s.push_str(&e.to_string());
        source = e.source();
    }
    s
}

/// Reads the network of the namespace at `netns` into a plan (see the module doc for what
/// is kept and what is refused). Blocking.
pub fn inspect(netns: &Path) -> Result<NetworkPlan, NetworkError> {
    let ns = netns::Netns::open(netns)?;
    let dump = ns.run(dump)?;
    plan_from_dump(&dump).map_err(|source| NetworkError::Plan {
        netns: netns.to_owned(),
        source,
    })
}

/// Dumps links, addresses, routes (IPv4 and IPv6, every table) and neighbours.
fn dump(nl: &netns::Netlink) -> Result<NetlinkDump, NetworkError> {
    nl.block_on(async {
        let links = nl
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl.error("listing the interfaces", e))?;
        let addresses = nl
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl.error("listing the addresses", e))?;
        let mut routes: Vec<_> = nl
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl.error("listing the IPv4 routes", e))?;
        let v6: Vec<_> = match nl
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
            .execute()
            .try_collect()
            .await
        {
            Ok(v6) => v6,
            // A kernel booted with ipv6.disable=1 has no IPv6 routes to dump.
            Err(e) if netns::errno(&e) == Some(libc::EAFNOSUPPORT) => Vec::new(),
            Err(e) => return Err(nl.error("listing the IPv6 routes", e)),
        };
        routes.extend(v6);
        let neighbours = nl
            .handle
            .neighbours()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl.error("listing the neighbours", e))?;
        Ok(NetlinkDump {
            links,
            addresses,
            routes,
            neighbours,
        })
    })
}

//! Applies a [`NetworkConfig`] to the guest over rtnetlink, and brings `lo` up.
//!
//! Order: list the links and match them ([`model::plan`]: nothing is changed when the
//! request does not fit the guest); move aside a configured link whose name another one
//! takes (two NICs swapping names); then per interface: down, rename, MTU, addresses
//! (IPv6 ones with IFA_F_NODAD, so they are usable at once, with no tentative period),
//! up; then the routes in order (plain adds: a route that exists already, such as the
//! prefix route an address brings, fails with "File exists"); then the neighbours
//! (permanent, replacing an entry the kernel may have learnt). A failed step ends the
//! request with an error naming the step and the interface
//! (`adding 10.88.0.5/16 to eth0: File exists`); what was done before it stays.

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{RouteMessage, RouteScope};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

use super::NetError;
use super::model::{self, Link, Mac, NetworkConfig};

/// A netlink connection whose task ends with it.
struct Netlink {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Netlink {
    /// Opens a route netlink socket (in the calling thread's network namespace) and
    /// spawns its connection task on the current tokio runtime.
    fn open() -> Result<Self, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
        let task = tokio::spawn(conn);
        Ok(Self { handle, task })
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The reason of a failed netlink request: the errno's text for a kernel refusal
/// ("File exists"), else rtnetlink's.
fn reason(e: &rtnetlink::Error) -> String {
    match e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() != 0 => {
            nix::errno::Errno::from_raw(m.raw_code().abs())
                .desc()
                .to_owned()
        }
        other => other.to_string(),
    }
}

fn failed(step: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let step = step.into();
    move |e| NetError::Netlink {
        reason: reason(&e),
        step,
    }
}

/// Every link of the namespace, with its name and (6-byte) MAC.
pub(crate) async fn links(h: &Handle) -> Result<Vec<Link>, NetError> {
    let mut dump = h.link().get().execute();
    let mut out = Vec::new();
    while let Some(m) = dump.try_next().await.map_err(failed("listing the links"))? {
        out.push(link_of(&m));
    }
    Ok(out)
}

fn link_of(m: &LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        mac: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name.clone_from(n),
            LinkAttribute::Address(b) => {
                link.mac = <[u8; 6]>::try_from(b.as_slice()).ok().map(Mac);
            }
            _ => {}
        }
    }
    link
}

async fn set(h: &Handle, msg: LinkMessage, step: String) -> Result<(), NetError> {
    h.link().set(msg).execute().await.map_err(failed(step))
}

/// Configures the guest network as `config` says (see the module doc for the order).
pub async fn configure(config: &NetworkConfig) -> Result<(), NetError> {
    let nl = Netlink::open()?;
    let h = &nl.handle;
    let plan = model::plan(config, &links(h).await?)?;
    for (itf, p) in config.interfaces.iter().zip(&plan.links) {
        if let Some(tmp) = &p.temporary {
            let down = LinkUnspec::new_with_index(p.index).down().build();
            set(h, down, format!("setting {} ({}) down", p.current, itf.mac)).await?;
            let rename = LinkUnspec::new_with_index(p.index)
                .name(tmp.clone())
                .build();
            let step = format!(
                "renaming {} ({}) to {tmp} (for the moment: another interface takes its name)",
                p.current, itf.mac
            );
            set(h, rename, step).await?;
        }
    }
    for (itf, p) in config.interfaces.iter().zip(&plan.links) {
        let now = p.temporary.as_ref().unwrap_or(&p.current);
        let (index, name) = (p.index, &itf.name);
        let down = LinkUnspec::new_with_index(index).down().build();
        set(h, down, format!("setting {now} ({}) down", itf.mac)).await?;
        if now != name {
            let rename = LinkUnspec::new_with_index(index).name(name.clone()).build();
            set(h, rename, format!("renaming {now} ({}) to {name}", itf.mac)).await?;
        }
        let mtu = LinkUnspec::new_with_index(index).mtu(itf.mtu).build();
        set(h, mtu, format!("setting the MTU of {name} to {}", itf.mtu)).await?;
        for a in &itf.addresses {
            let mut req = h.address().add(index, a.addr, a.prefix_len);
            if a.addr.is_ipv6() {
                let m = req.message_mut();
                m.header.flags |= AddressHeaderFlags::Nodad;
                m.attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            req.execute()
                .await
                .map_err(failed(format!("adding {a} to {name}")))?;
        }
        let up = LinkUnspec::new_with_index(index).up().build();
        set(h, up, format!("setting {name} up")).await?;
        tracing::info!(interface = %name, mac = %itf.mac, mtu = itf.mtu, addresses = itf.addresses.len(), "interface configured");
    }
    for r in &config.routes {
        let step = || format!("adding route {r}");
        // The builder's own checks (family, prefix length) passed in the model already.
        let built = || -> Result<RouteMessage, String> {
            let s = |e: &dyn std::fmt::Display| e.to_string();
            let mut b = RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(r.destination.addr, r.destination.prefix_len)
                .map_err(|e| s(&e))?;
            if let Some(gw) = r.gateway {
                b = b.gateway(gw).map_err(|e| s(&e))?;
            }
            if let Some(src) = r.source {
                b = b.pref_source(src).map_err(|e| s(&e))?;
            }
            if let Some(dev) = &r.device {
                b = b.output_interface(plan.devices[dev]);
            }
            Ok(b.scope(RouteScope::from(r.scope.raw())).build())
        };
        let msg = built().map_err(|reason| NetError::Netlink {
            step: step(),
            reason,
        })?;
        h.route().add(msg).execute().await.map_err(failed(step()))?;
    }
    for n in &config.neighbors {
        h.neighbours()
            .add(plan.devices[&n.device], n.ip)
            .link_layer_address(&n.mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(failed(format!("adding neighbour {n}")))?;
    }
    tracing::info!(
        interfaces = config.interfaces.len(),
        routes = config.routes.len(),
        neighbors = config.neighbors.len(),
        "network configured"
    );
    Ok(())
}

/// Brings the loopback link `lo` up (every sandbox needs it, networked or not).
pub async fn loopback_up() -> Result<(), NetError> {
    let nl = Netlink::open()?;
    let h = &nl.handle;
    let lo = links(h)
        .await?
        .into_iter()
        .find(|l| l.name == "lo")
        .ok_or_else(|| NetError::Precondition {
            field: "lo".into(),
            reason: "the guest has no loopback link".into(),
        })?;
    if is_up(h, lo.index).await? {
        return Ok(());
    }
    let up = LinkUnspec::new_with_index(lo.index).up().build();
    set(h, up, "setting lo up".into()).await
}

async fn is_up(h: &Handle, index: u32) -> Result<bool, NetError> {
    let mut get = h.link().get().match_index(index).execute();
    let m = get
        .try_next()
        .await
        .map_err(failed(format!("reading link {index}")))?;
    Ok(m.is_some_and(|m| m.header.flags.contains(LinkFlags::Up)))
}

#[cfg(test)]
pub(crate) mod tests;

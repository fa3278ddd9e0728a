//! Attaching a namespace's interfaces to taps with tc redirects, and tearing that down.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use rtnetlink::LinkUnspec;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::tc::{TcAttribute, TcHandle};
use serde::{Deserialize, Serialize};

use super::netns::{Netlink, Netns, NetnsId, OpenError, errno};
use super::plan::{MAX_INTERFACES, NetworkPlan};
use super::{NetworkError, tap};

/// `ffff:`, the ingress qdisc's handle and the parent of its filters.
const INGRESS_HANDLE: u32 = 0xffff_0000;

/// The tap made for the `index`-th interface of a plan: `tap<index>_carapace` (at most
/// 14 bytes for 16 interfaces; an interface name has at most 15).
pub fn tap_name(index: usize) -> String {
    format!("tap{index}_carapace")
}

/// What [`attach`] made, for the sandbox state; [`detach`] undoes it from this alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRecord {
    /// The sandbox the taps are for.
    pub sandbox_id: String,
    /// The namespace path.
    pub netns: PathBuf,
    /// Which namespace that path named at attach time.
    pub netns_id: NetnsId,
    /// One entry per interface of the plan, in plan order.
    pub links: Vec<AttachedLink>,
}

/// One interface and its tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedLink {
    /// The CNI interface (`eth0`).
    pub interface: String,
    /// The tap made for it.
    pub tap: String,
    /// An ingress qdisc (with the redirect filter) was added to the interface.
    pub interface_qdisc: bool,
    /// An ingress qdisc (with the redirect filter) was added to the tap.
    pub tap_qdisc: bool,
}

/// The result of [`attach`]: the tap descriptors and the record.
#[derive(Debug)]
pub struct Attached {
    /// The record for the state file.
    pub record: AttachRecord,
    /// One tap per interface, in plan order.
    pub taps: Vec<AttachedTap>,
}

/// A tap descriptor for the VMM.
#[derive(Debug)]
pub struct AttachedTap {
    /// The CNI interface whose traffic it carries (its MAC is the guest device's).
    pub interface: String,
    /// The tap's name in the namespace.
    pub name: String,
    /// The open tap (close-on-exec, blocking; carries a [`super::VNET_HDR_LEN`]-byte
    /// virtio-net header before each frame). Not namespace-bound: usable from anywhere.
    /// The tap disappears when the last descriptor of it closes.
    pub fd: OwnedFd,
}

/// For each interface of `plan` in the namespace at `netns`: makes a tap and redirects
/// traffic both ways between the two with ingress qdiscs and `u32` + `mirred` filters.
/// On failure, removes what it made before returning. Blocking.
pub fn attach(
    netns: &Path,
    plan: &NetworkPlan,
    sandbox_id: &str,
) -> Result<Attached, NetworkError> {
    let bad = |reason: String| NetworkError::BadPlan {
        netns: netns.to_owned(),
        reason,
    };
    if plan.interfaces.is_empty() {
        return Err(bad("no interface".into()));
    }
    if plan.interfaces.len() > MAX_INTERFACES {
        return Err(bad(format!(
            "{} interfaces, at most {MAX_INTERFACES}",
            plan.interfaces.len()
        )));
    }
    let ns = Netns::open(netns)?;
    let netns_id = ns.id;
    let (links, taps) = ns.run(|nl| {
        let mut made = Made::default();
        match attach_all(nl, plan, &mut made) {
            Ok(()) => Ok((made.links, made.taps)),
            Err(e) => {
                undo(nl, &made);
                Err(e)
            }
        }
    })?;
    tracing::debug!(sandbox_id, netns = %netns.display(), ?links, "network attached");
    Ok(Attached {
        record: AttachRecord {
            sandbox_id: sandbox_id.to_owned(),
            netns: netns.to_owned(),
            netns_id,
            links,
        },
        taps,
    })
}

/// What one attach made so far (for undoing it).
#[derive(Default)]
struct Made {
    links: Vec<AttachedLink>,
    /// The tap's ifindex, per entry of `links`.
    tap_index: Vec<u32>,
    /// The interface's ifindex, per entry of `links`.
    interface_index: Vec<u32>,
    taps: Vec<AttachedTap>,
}

fn attach_all(nl: &Netlink, plan: &NetworkPlan, made: &mut Made) -> Result<(), NetworkError> {
    for (i, interface) in plan.interfaces.iter().enumerate() {
        let name = &interface.name;
        let index = link_index(nl, name)?
            .ok_or_else(|| not_found(nl, format!("finding interface {name}")))?;
        let tap_name = tap_name(i);

        let fd = tap::create(&tap_name).map_err(|(step, source)| NetworkError::Step {
            step: format!("{step} tap {tap_name}"),
            netns: nl.netns.clone(),
            source,
        })?;
        let tap_index = link_index(nl, &tap_name)?
            .ok_or_else(|| not_found(nl, format!("finding the new tap {tap_name}")))?;
        made.links.push(AttachedLink {
            interface: name.clone(),
            tap: tap_name.clone(),
            interface_qdisc: false,
            tap_qdisc: false,
        });
        made.tap_index.push(tap_index);
        made.interface_index.push(index);
        made.taps.push(AttachedTap {
            interface: name.clone(),
            name: tap_name.clone(),
            fd,
        });
        let link = made.links.len() - 1;

        disable_ipv6(&tap_name);
        nl.block_on(
            nl.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(tap_index)
                        .mtu(interface.mtu)
                        .up()
                        .build(),
                )
                .execute(),
        )
        .map_err(|e| {
            nl.error(
                format!(
                    "setting MTU {} and bringing up tap {tap_name}",
                    interface.mtu
                ),
                e,
            )
        })?;

        // The tap first: until the interface's redirect exists, nothing reaches the tap.
        add_ingress(nl, tap_index, &tap_name)?;
        made.links[link].tap_qdisc = true;
        add_redirect(nl, tap_index, &tap_name, index, name)?;
        add_ingress(nl, index, name)?;
        made.links[link].interface_qdisc = true;
        add_redirect(nl, index, name, tap_index, &tap_name)?;
    }
    Ok(())
}

/// Best effort, and before the tap is up: no IPv6 on the tap, so that the namespace's
/// stack sends no router solicitations, DAD probes or MLD reports into the VM. Net sysctls
/// are those of the calling thread's namespace.
fn disable_ipv6(tap: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6");
    if let Err(e) = std::fs::write(&path, "1")
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!("cannot turn IPv6 off on {tap} ({path}): {e}");
    }
}

fn not_found(nl: &Netlink, step: String) -> NetworkError {
    NetworkError::Step {
        step,
        netns: nl.netns.clone(),
        source: io::Error::from_raw_os_error(libc::ENODEV),
    }
}

/// The index of the link `name`, `None` if there is none.
fn link_index(nl: &Netlink, name: &str) -> Result<Option<u32>, NetworkError> {
    Ok(get_link(nl, name)?.map(|l| l.header.index))
}

fn get_link(nl: &Netlink, name: &str) -> Result<Option<LinkMessage>, NetworkError> {
    let got: Result<Vec<LinkMessage>, _> = nl.block_on(
        nl.handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_collect(),
    );
    match got {
        Ok(links) => Ok(links.into_iter().next()),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl.error(format!("looking up interface {name}"), e)),
    }
}

/// `tc qdisc add dev NAME ingress`.
fn add_ingress(nl: &Netlink, index: u32, name: &str) -> Result<(), NetworkError> {
    nl.block_on(nl.handle.qdisc().add(index as i32).ingress().execute())
        .map_err(|e| {
            if errno(&e) == Some(libc::EEXIST) {
                NetworkError::Step {
                    step: format!(
                        "adding the ingress qdisc to {name} (it has an ingress or clsact qdisc \
                         already: another program handles its traffic)"
                    ),
                    netns: nl.netns.clone(),
                    source: super::netns::io_error(e),
                }
            } else {
                nl.error(format!("adding the ingress qdisc to {name}"), e)
            }
        })
}

/// `tc filter add dev FROM parent ffff: protocol all u32 match u8 0 0 action mirred egress
/// redirect dev TO` (rtnetlink's `redirect` builds exactly that filter: a terminal u32
/// selector with one all-zero key, and a mirred egress-redirect action whose verdict is
/// "stolen").
fn add_redirect(
    nl: &Netlink,
    from: u32,
    from_name: &str,
    to: u32,
    to_name: &str,
) -> Result<(), NetworkError> {
    let step = || format!("adding the redirect filter from {from_name} to {to_name}");
    let request = nl
        .handle
        .traffic_filter(from as i32)
        .add()
        .parent(INGRESS_HANDLE)
        // The protocol field is in network byte order, as iproute2's `protocol all`.
        .protocol((libc::ETH_P_ALL as u16).to_be())
        .redirect(to)
        .map_err(|e| nl.error(step(), e))?;
    nl.block_on(request.execute())
        .map_err(|e| nl.error(step(), e))
}

/// Does `index` have the ingress qdisc (kind `ingress`, not `clsact`)?
fn has_ingress(nl: &Netlink, index: u32, name: &str) -> Result<bool, NetworkError> {
    // Without strict checking the kernel dumps every device's qdiscs; filter here.
    let qdiscs: Vec<_> = nl
        .block_on(
            nl.handle
                .qdisc()
                .get()
                .index(index as i32)
                .execute()
                .try_collect(),
        )
        .map_err(|e| nl.error(format!("listing the qdiscs of {name}"), e))?;
    Ok(qdiscs.iter().any(|q| {
        q.header.index == index as i32
            && q.header.parent == TcHandle::INGRESS
            && q.attributes
                .iter()
                .any(|a| matches!(a, TcAttribute::Kind(k) if k == "ingress"))
    }))
}

/// `tc qdisc del dev NAME ingress`: rtnetlink's `del` message only names the device, so
/// the parent (`TC_H_INGRESS`), handle (`ffff:`) and kind (`ingress`, so that a `clsact`
/// qdisc is never removed) are set on it by hand. Deleting the qdisc deletes its filters.
fn del_ingress(nl: &Netlink, index: u32, name: &str) -> Result<(), NetworkError> {
    let mut request = nl.handle.qdisc().del(index as i32);
    let message = request.message_mut();
    message.header.parent = TcHandle::INGRESS;
    message.header.handle = TcHandle::from(INGRESS_HANDLE);
    message
        .attributes
        .push(TcAttribute::Kind("ingress".to_owned()));
    match nl.block_on(request.execute()) {
        Ok(()) => Ok(()),
        Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::ENODEV)) => Ok(()),
        Err(e) => Err(nl.error(format!("deleting the ingress qdisc of {name}"), e)),
    }
}

fn del_link(nl: &Netlink, index: u32, name: &str) -> Result<(), NetworkError> {
    match nl.block_on(nl.handle.link().del(index).execute()) {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(nl.error(format!("deleting tap {name}"), e)),
    }
}

/// Undoes a failed attach (inside the namespace): the interfaces' qdiscs, then the taps.
fn undo(nl: &Netlink, made: &Made) {
    for (i, link) in made.links.iter().enumerate().rev() {
        if link.interface_qdisc
            && let Err(e) = del_ingress(nl, made.interface_index[i], &link.interface)
        {
            tracing::warn!("undoing a failed network attach: {}", super::chain(&e));
        }
        if let Err(e) = del_link(nl, made.tap_index[i], &link.tap) {
            tracing::warn!("undoing a failed network attach: {}", super::chain(&e));
        }
    }
}

/// Removes what `record` says [`attach`] made: the ingress qdiscs (with their filters) on
/// the CNI interfaces, then the taps. Idempotent; a namespace that no longer exists, or
/// whose path now names another namespace, is done already. Every step is tried; the
/// problems are returned together. Blocking.
pub fn detach(record: &AttachRecord) -> Result<(), NetworkError> {
    let ns = match Netns::open(&record.netns) {
        Ok(ns) => ns,
        Err(OpenError::Missing(_)) => return Ok(()),
        Err(OpenError::Failed(e)) => return Err(e),
    };
    if ns.id != record.netns_id {
        tracing::info!(
            netns = %record.netns.display(),
            "the path names another network namespace now: the one attached is gone"
        );
        return Ok(());
    }
    let problems = match ns.run(|nl| Ok(detach_in(nl, record))) {
        Ok(problems) => problems,
        // An unmounted namespace file left behind is no namespace any more.
        Err(NetworkError::NotNetns { .. }) => return Ok(()),
        Err(e) => vec![e],
    };
    if problems.is_empty() {
        Ok(())
    } else {
        Err(NetworkError::Teardown {
            netns: record.netns.clone(),
            problems,
        })
    }
}

fn detach_in(nl: &Netlink, record: &AttachRecord) -> Vec<NetworkError> {
    let mut problems = Vec::new();
    for link in &record.links {
        if link.interface_qdisc {
            let done = link_index(nl, &link.interface).and_then(|index| {
                let Some(index) = index else {
                    return Ok(()); // the interface is gone, and its qdisc with it
                };
                if has_ingress(nl, index, &link.interface)? {
                    del_ingress(nl, index, &link.interface)
                } else {
                    Ok(())
                }
            });
            problems.extend(done.err());
        }
        // Deleting the tap deletes its qdisc and filter too.
        let done = get_link(nl, &link.tap).and_then(|tap| match tap {
            // Only a tun/tap device by that name is ours.
            Some(tap) if is_tun(&tap) => del_link(nl, tap.header.index, &link.tap),
            _ => Ok(()),
        });
        problems.extend(done.err());
    }
    problems
}

fn is_tun(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Tun))),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_an_interface_name_for_every_allowed_interface() {
        assert_eq!(tap_name(0), "tap0_carapace");
        assert!(tap_name(MAX_INTERFACES - 1).len() < libc::IFNAMSIZ);
    }

    #[test]
    fn the_record_round_trips_through_json() {
        let record = AttachRecord {
            sandbox_id: "s1".into(),
            netns: "/var/run/netns/cni-1".into(),
            netns_id: NetnsId {
                dev: 4,
                ino: 4026532000,
            },
            links: vec![AttachedLink {
                interface: "eth0".into(),
                tap: tap_name(0),
                interface_qdisc: true,
                tap_qdisc: true,
            }],
        };
        let json = serde_json::to_string(&record).unwrap();
        assert_eq!(serde_json::from_str::<AttachRecord>(&json).unwrap(), record);
    }

    #[test]
    fn detaching_from_a_namespace_that_is_gone_succeeds() {
        let record = AttachRecord {
            sandbox_id: "s1".into(),
            netns: "/nonexistent/netns/cni-gone".into(),
            netns_id: NetnsId { dev: 4, ino: 1 },
            links: vec![],
        };
        detach(&record).unwrap();
    }

    #[test]
    fn attaching_an_empty_plan_is_refused_before_touching_the_namespace() {
        let err = attach(
            Path::new("/nonexistent/netns/x"),
            &NetworkPlan::default(),
            "s1",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the network plan for /nonexistent/netns/x is not usable: no interface"
        );
    }
}

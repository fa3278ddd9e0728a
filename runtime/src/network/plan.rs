//! The network plan: what a pod's network namespace holds, as plain data, and the pure
//! conversion from netlink dump messages to it (no IO here, so it is unit-tested with
//! recorded messages).

use std::collections::HashMap;
use std::net::IpAddr;

use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoData, InfoIpVlan, InfoIpVtap, InfoKind, IpVlanMode, LinkAttribute, LinkInfo, LinkLayerType,
    LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use serde::{Deserialize, Serialize};

/// At most this many interfaces (besides `lo`) are mirrored into a VM.
pub const MAX_INTERFACES: usize = 16;

/// Everything the guest needs to recreate a pod's network: interfaces, routes, static
/// neighbours. Recorded in the sandbox state; contains no netlink types.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NetworkPlan {
    /// Interfaces other than `lo`, in interface-index order.
    pub interfaces: Vec<PlannedInterface>,
    /// Routes of the main table through those interfaces, without the routes the kernel
    /// derives from addresses (`proto kernel`); routes without a gateway come first.
    pub routes: Vec<PlannedRoute>,
    /// Permanent neighbour (ARP/NDP) entries on those interfaces.
    pub neighbors: Vec<PlannedNeighbor>,
}

/// One interface of the namespace, which the VM gets as a virtio-net device with the same
/// MAC address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedInterface {
    /// Name in the namespace (the guest uses the same name).
    pub name: String,
    /// Hardware address.
    pub mac: [u8; 6],
    /// MTU.
    pub mtu: u32,
    /// Link kind (`IFLA_INFO_KIND`: `veth`, `macvlan`, ...); `None` for a device without
    /// one (a physical NIC or SR-IOV function moved into the namespace).
    pub kind: Option<String>,
    /// Addresses with prefix length; IPv6 link-local (`fe80::/10`) addresses are left out
    /// (the guest kernel makes its own).
    pub addresses: Vec<(IpAddr, u8)>,
}

/// One route of the main table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedRoute {
    /// Destination network; `None` for a default route.
    pub destination: Option<(IpAddr, u8)>,
    /// Next hop, if any.
    pub gateway: Option<IpAddr>,
    /// Output interface (one of [`NetworkPlan::interfaces`]).
    pub device: String,
    /// Preferred source address (`src`, `RTA_PREFSRC`).
    pub source: Option<IpAddr>,
    /// Scope (`RT_SCOPE_*`: 0 universe, 253 link, 254 host).
    pub scope: u8,
    /// Metric (`RTA_PRIORITY`), when set.
    pub metric: Option<u32>,
    /// The gateway is on the link even if no address covers it (`onlink`).
    pub onlink: bool,
}

/// A permanent neighbour entry (`ip neigh add ... nud permanent`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedNeighbor {
    /// Interface.
    pub device: String,
    /// IP address.
    pub address: IpAddr,
    /// Its hardware address.
    pub mac: [u8; 6],
}

/// Why a namespace's network cannot be mirrored into a VM (the pure part of
/// [`super::NetworkError`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Only `lo`.
    #[error("no network interface besides lo")]
    NoInterface,
    /// More than [`MAX_INTERFACES`].
    #[error("{count} network interfaces, at most {MAX_INTERFACES} can be mirrored into a VM")]
    TooManyInterfaces {
        /// How many.
        count: usize,
    },
    /// An interface that cannot be redirected to a tap.
    #[error("interface {interface} cannot be mirrored into a VM: {reason}")]
    UnsupportedInterface {
        /// Its name.
        interface: String,
        /// Why.
        reason: String,
    },
    /// A route that the plan cannot express.
    #[error("route {route} cannot be mirrored into a VM: {reason}")]
    UnsupportedRoute {
        /// The route, as far as it could be described.
        route: String,
        /// Why.
        reason: String,
    },
    /// A message lacks something the kernel always sends.
    #[error("malformed netlink {what}: {reason}")]
    Malformed {
        /// Which kind of message.
        what: &'static str,
        /// What is missing.
        reason: String,
    },
}

/// The netlink dump of one namespace: what [`plan_from_dump`] converts.
#[derive(Debug, Clone, Default)]
pub struct NetlinkDump {
    /// `RTM_GETLINK` dump.
    pub links: Vec<LinkMessage>,
    /// `RTM_GETADDR` dump (both families).
    pub addresses: Vec<AddressMessage>,
    /// `RTM_GETROUTE` dumps (both families, all tables).
    pub routes: Vec<RouteMessage>,
    /// `RTM_GETNEIGH` dump (both families).
    pub neighbours: Vec<NeighbourMessage>,
}

const ETH_ALEN: usize = 6;

/// Converts a namespace's netlink dump into a plan, refusing what cannot be mirrored.
pub fn plan_from_dump(dump: &NetlinkDump) -> Result<NetworkPlan, PlanError> {
    let mut interfaces = Vec::new();
    // ifindex → position in `interfaces`
    let mut by_index: HashMap<u32, usize> = HashMap::new();
    let mut links: Vec<&LinkMessage> = dump.links.iter().collect();
    links.sort_by_key(|l| l.header.index);
    for link in links {
        let Some(interface) = planned_interface(link)? else {
            continue;
        };
        by_index.insert(link.header.index, interfaces.len());
        interfaces.push(interface);
    }
    if interfaces.is_empty() {
        return Err(PlanError::NoInterface);
    }
    if interfaces.len() > MAX_INTERFACES {
        return Err(PlanError::TooManyInterfaces {
            count: interfaces.len(),
        });
    }

    for address in &dump.addresses {
        let Some(&i) = by_index.get(&address.header.index) else {
            continue;
        };
        // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on a
        // point-to-point link); IPv6 sends only IFA_ADDRESS.
        let local = address.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let any = address.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        let Some(ip) = local.or(any) else {
            return Err(PlanError::Malformed {
                what: "address",
                reason: format!("no IFA_ADDRESS on interface index {}", address.header.index),
            });
        };
        if is_ipv6_link_local(&ip) {
            continue;
        }
        let entry = (ip, address.header.prefix_len);
        if !interfaces[i].addresses.contains(&entry) {
            interfaces[i].addresses.push(entry);
        }
    }

    let mut routes = Vec::new();
    for route in &dump.routes {
        if let Some(r) = planned_route(route, &by_index, &interfaces)? {
            routes.push(r);
        }
    }
    // Routes through a gateway need the on-link routes that reach it: those go first.
    routes.sort_by_key(|r| r.gateway.is_some());

    let mut neighbors = Vec::new();
    for n in &dump.neighbours {
        let Some(&i) = by_index.get(&n.header.ifindex) else {
            continue;
        };
        if n.header.state != NeighbourState::Permanent {
            continue;
        }
        let address = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
            _ => None,
        });
        let lladdr = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(mac) => Some(mac.as_slice()),
            _ => None,
        });
        let (Some(address), Some(mac)) = (address, lladdr.and_then(mac_of)) else {
            continue; // not an IP neighbour with an Ethernet address
        };
        neighbors.push(PlannedNeighbor {
            device: interfaces[i].name.clone(),
            address,
            mac,
        });
    }

    Ok(NetworkPlan {
        interfaces,
        routes,
        neighbors,
    })
}

fn mac_of(bytes: &[u8]) -> Option<[u8; 6]> {
    <[u8; ETH_ALEN]>::try_from(bytes).ok()
}

fn is_ipv6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

/// `None` for `lo`; an error for an interface we cannot mirror.
fn planned_interface(link: &LinkMessage) -> Result<Option<PlannedInterface>, PlanError> {
    let name = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    });
    let Some(name) = name else {
        return Err(PlanError::Malformed {
            what: "link",
            reason: format!("no IFLA_IFNAME for interface index {}", link.header.index),
        });
    };
    if name == "lo" || link.header.link_layer_type == LinkLayerType::Loopback {
        return Ok(None);
    }
    let unsupported = |reason: String| PlanError::UnsupportedInterface {
        interface: name.clone(),
        reason,
    };
    let infos: &[LinkInfo] = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => Some(infos.as_slice()),
            _ => None,
        })
        .unwrap_or(&[]);
    let kind = infos.iter().find_map(|i| match i {
        LinkInfo::Kind(k) => Some(k.clone()),
        _ => None,
    });
    if kind == Some(InfoKind::Tun) {
        return Err(unsupported(
            "it is a tun/tap device already (another program owns its traffic)".into(),
        ));
    }
    if link.header.link_layer_type != LinkLayerType::Ether {
        return Err(unsupported(format!(
            "its link layer is {:?}, not Ethernet (the VM's virtio-net device carries Ethernet frames)",
            link.header.link_layer_type
        )));
    }
    let ipvlan_mode = infos.iter().find_map(|i| match i {
        LinkInfo::Data(InfoData::IpVlan(data)) => data.iter().find_map(|d| match d {
            InfoIpVlan::Mode(m) => Some(*m),
            _ => None,
        }),
        LinkInfo::Data(InfoData::IpVtap(data)) => data.iter().find_map(|d| match d {
            InfoIpVtap::Mode(m) => Some(*m),
            _ => None,
        }),
        _ => None,
    });
    if let Some(mode @ (IpVlanMode::L3 | IpVlanMode::L3S)) = ipvlan_mode {
        return Err(unsupported(format!(
            "ipvlan in {mode:?} mode routes at layer 3 and answers no ARP or neighbour \
             discovery, which the guest's stack needs on an Ethernet device (only L2 mode works)"
        )));
    }
    let mac = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(mac) => Some(mac.as_slice()),
        _ => None,
    });
    let Some(mac) = mac.and_then(mac_of) else {
        return Err(unsupported("it has no 6-byte hardware address".into()));
    };
    let mtu = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    });
    let Some(mtu) = mtu else {
        return Err(PlanError::Malformed {
            what: "link",
            reason: format!("no IFLA_MTU for {name}"),
        });
    };
    Ok(Some(PlannedInterface {
        name,
        mac,
        mtu,
        kind: kind.map(|k| k.to_string()),
        addresses: Vec::new(),
    }))
}

fn route_ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

/// `None` for a route we leave out (other tables, not through a planned interface,
/// derived by the kernel); an error for one through a planned interface that the plan
/// cannot express.
fn planned_route(
    route: &RouteMessage,
    by_index: &HashMap<u32, usize>,
    interfaces: &[PlannedInterface],
) -> Result<Option<PlannedRoute>, PlanError> {
    let table = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return Ok(None);
    }
    let oif = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    let destination = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(d) => route_ip(d),
        _ => None,
    });
    let destination = match destination {
        Some(ip) => Some((ip, route.header.destination_prefix_length)),
        None if route.header.destination_prefix_length == 0 => None,
        None => {
            return Err(PlanError::Malformed {
                what: "route",
                reason: "a prefix length without RTA_DST".into(),
            });
        }
    };
    let describe = || match destination {
        Some((ip, len)) => format!("{ip}/{len}"),
        None => "default".to_string(),
    };
    let multipath = route
        .attributes
        .iter()
        .any(|a| matches!(a, RouteAttribute::MultiPath(_)));
    let Some(i) = oif.and_then(|oif| by_index.get(&oif).copied()) else {
        if multipath {
            // A multipath route has no RTA_OIF; refuse it rather than lose it.
            return Err(PlanError::UnsupportedRoute {
                route: describe(),
                reason: "multipath routes are not supported".into(),
            });
        }
        return Ok(None);
    };
    if route.header.kind != RouteType::Unicast {
        return Ok(None);
    }
    if route.header.protocol == RouteProtocol::Kernel {
        // Made by the kernel from an address (`10.88.0.0/16 dev eth0 proto kernel`,
        // `fe80::/64`): the guest kernel makes it again when the address is added.
        return Ok(None);
    }
    let unsupported = |reason: &str| PlanError::UnsupportedRoute {
        route: format!("{} dev {}", describe(), interfaces[i].name),
        reason: reason.into(),
    };
    for a in &route.attributes {
        match a {
            RouteAttribute::MultiPath(_) => {
                return Err(unsupported("multipath routes are not supported"));
            }
            RouteAttribute::Via(_) => {
                return Err(unsupported(
                    "a gateway of the other address family (RTA_VIA) is not supported",
                ));
            }
            RouteAttribute::NhId(_) => {
                return Err(unsupported(
                    "routes through nexthop objects (RTA_NH_ID) are not supported",
                ));
            }
            RouteAttribute::Encap(_) | RouteAttribute::EncapType(_) => {
                return Err(unsupported(
                    "lightweight-tunnel encapsulation is not supported",
                ));
            }
            _ => {}
        }
    }
    if route.header.source_prefix_length != 0 {
        return Err(unsupported(
            "source-specific routes (`from PREFIX`) are not supported",
        ));
    }
    let gateway = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(g) => route_ip(g),
        _ => None,
    });
    let source = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::PrefSource(s) => route_ip(s),
        _ => None,
    });
    let metric = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Priority(p) => Some(*p),
        _ => None,
    });
    Ok(Some(PlannedRoute {
        destination,
        gateway,
        device: interfaces[i].name.clone(),
        source,
        scope: route.header.scope.into(),
        metric,
        onlink: route.header.flags.contains(RouteFlags::Onlink),
    }))
}

#[cfg(test)]
mod tests;

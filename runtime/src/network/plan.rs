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
mod tests {
    //! The messages below are what a dump returns in a pod's namespace after containerd's
    //! CNI bridge plugin (`cni0`, `10.88.0.0/16`, `fd00::/64`) set it up, as iproute2
    //! shows it:
    //!
    //! ```text
    //! 1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536
    //! 2: eth0@if7: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500  link/ether 0a:58:0a:58:00:05 veth
    //!     inet 10.88.0.5/16 brd 10.88.255.255 scope global eth0
    //!     inet6 fd00::5/64 scope global
    //!     inet6 fe80::858:aff:fe58:5/64 scope link
    //! default via 10.88.0.1 dev eth0
    //! 10.88.0.0/16 dev eth0 proto kernel scope link src 10.88.0.5
    //! local 10.88.0.5 dev eth0 table local proto kernel scope host src 10.88.0.5
    //! fd00::/64 dev eth0 proto kernel metric 256
    //! fe80::/64 dev eth0 proto kernel metric 256
    //! default via fd00::1 dev eth0 metric 1024
    //! ```
    use super::*;
    use rtnetlink::packet_route::AddressFamily;
    use rtnetlink::packet_route::address::AddressScope;
    use rtnetlink::packet_route::link::LinkFlags;
    use rtnetlink::packet_route::route::RouteScope;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0x58, 0x00, 0x05];

    fn link(index: u32, name: &str, layer: LinkLayerType, info: Vec<LinkInfo>) -> LinkMessage {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.link_layer_type = layer;
        m.header.flags = LinkFlags::Up | LinkFlags::Broadcast | LinkFlags::Multicast;
        m.attributes = vec![
            LinkAttribute::IfName(name.into()),
            LinkAttribute::Mtu(if layer == LinkLayerType::Loopback {
                65536
            } else {
                1500
            }),
            LinkAttribute::Address(if layer == LinkLayerType::Loopback {
                vec![0; 6]
            } else {
                MAC.to_vec()
            }),
            LinkAttribute::Broadcast(vec![0xff; 6]),
        ];
        if !info.is_empty() {
            m.attributes.push(LinkAttribute::LinkInfo(info));
        }
        m
    }

    fn lo() -> LinkMessage {
        link(1, "lo", LinkLayerType::Loopback, vec![])
    }

    fn veth(index: u32, name: &str) -> LinkMessage {
        let mut m = link(
            index,
            name,
            LinkLayerType::Ether,
            vec![LinkInfo::Kind(InfoKind::Veth)],
        );
        m.attributes.push(LinkAttribute::Link(7));
        m
    }

    fn addr(index: u32, ip: IpAddr, prefix: u8) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.index = index;
        m.header.prefix_len = prefix;
        m.header.family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        m.header.scope = if is_ipv6_link_local(&ip) {
            AddressScope::Link
        } else {
            AddressScope::Universe
        };
        m.attributes.push(AddressAttribute::Address(ip));
        if let IpAddr::V4(v4) = ip {
            m.attributes.push(AddressAttribute::Local(ip));
            let bcast = u32::from(v4) | (u32::MAX >> prefix);
            m.attributes
                .push(AddressAttribute::Broadcast(Ipv4Addr::from(bcast)));
            m.attributes.push(AddressAttribute::Label("eth0".into()));
        }
        m
    }

    struct R {
        table: u8,
        protocol: RouteProtocol,
        scope: RouteScope,
        kind: RouteType,
        dst: Option<(IpAddr, u8)>,
        gateway: Option<IpAddr>,
        oif: Option<u32>,
        prefsrc: Option<IpAddr>,
        priority: Option<u32>,
    }

    impl Default for R {
        fn default() -> Self {
            R {
                table: RouteHeader::RT_TABLE_MAIN,
                protocol: RouteProtocol::Boot,
                scope: RouteScope::Universe,
                kind: RouteType::Unicast,
                dst: None,
                gateway: None,
                oif: Some(2),
                prefsrc: None,
                priority: None,
            }
        }
    }

    fn route(r: R) -> RouteMessage {
        let mut m = RouteMessage::default();
        let v6 =
            matches!(r.dst, Some((IpAddr::V6(_), _))) || matches!(r.gateway, Some(IpAddr::V6(_)));
        m.header.address_family = if v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        m.header.table = r.table;
        m.header.protocol = r.protocol;
        m.header.scope = r.scope;
        m.header.kind = r.kind;
        m.attributes.push(RouteAttribute::Table(u32::from(r.table)));
        if let Some((ip, len)) = r.dst {
            m.header.destination_prefix_length = len;
            m.attributes.push(RouteAttribute::Destination(ip.into()));
        }
        if let Some(p) = r.priority {
            m.attributes.push(RouteAttribute::Priority(p));
        }
        if let Some(s) = r.prefsrc {
            m.attributes.push(RouteAttribute::PrefSource(s.into()));
        }
        if let Some(g) = r.gateway {
            m.attributes.push(RouteAttribute::Gateway(g.into()));
        }
        if let Some(o) = r.oif {
            m.attributes.push(RouteAttribute::Oif(o));
        }
        m
    }

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse::<Ipv4Addr>().unwrap())
    }

    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
    }

    /// The namespace CNI's bridge plugin leaves (see the module comment).
    fn bridge_plugin_dump() -> NetlinkDump {
        NetlinkDump {
            links: vec![lo(), veth(2, "eth0")],
            addresses: vec![
                addr(1, v4("127.0.0.1"), 8),
                addr(2, v4("10.88.0.5"), 16),
                addr(1, v6("::1"), 128),
                addr(2, v6("fd00::5"), 64),
                addr(2, v6("fe80::858:aff:fe58:5"), 64),
            ],
            routes: vec![
                route(R {
                    gateway: Some(v4("10.88.0.1")),
                    ..R::default()
                }),
                route(R {
                    protocol: RouteProtocol::Kernel,
                    scope: RouteScope::Link,
                    dst: Some((v4("10.88.0.0"), 16)),
                    prefsrc: Some(v4("10.88.0.5")),
                    ..R::default()
                }),
                route(R {
                    table: 255,
                    protocol: RouteProtocol::Kernel,
                    scope: RouteScope::Host,
                    kind: RouteType::Local,
                    dst: Some((v4("10.88.0.5"), 32)),
                    prefsrc: Some(v4("10.88.0.5")),
                    ..R::default()
                }),
                route(R {
                    table: 255,
                    protocol: RouteProtocol::Kernel,
                    scope: RouteScope::Host,
                    kind: RouteType::Local,
                    dst: Some((v4("127.0.0.0"), 8)),
                    prefsrc: Some(v4("127.0.0.1")),
                    oif: Some(1),
                    ..R::default()
                }),
                route(R {
                    protocol: RouteProtocol::Kernel,
                    dst: Some((v6("fd00::"), 64)),
                    priority: Some(256),
                    ..R::default()
                }),
                route(R {
                    protocol: RouteProtocol::Kernel,
                    dst: Some((v6("fe80::"), 64)),
                    priority: Some(256),
                    ..R::default()
                }),
                route(R {
                    gateway: Some(v6("fd00::1")),
                    priority: Some(1024),
                    ..R::default()
                }),
                route(R {
                    table: 255,
                    protocol: RouteProtocol::Kernel,
                    kind: RouteType::Multicast,
                    dst: Some((v6("ff00::"), 8)),
                    priority: Some(256),
                    ..R::default()
                }),
            ],
            neighbours: vec![],
        }
    }

    #[test]
    fn the_bridge_plugins_namespace_becomes_one_interface_and_two_default_routes() {
        let plan = plan_from_dump(&bridge_plugin_dump()).unwrap();
        assert_eq!(
            plan,
            NetworkPlan {
                interfaces: vec![PlannedInterface {
                    name: "eth0".into(),
                    mac: MAC,
                    mtu: 1500,
                    kind: Some("veth".into()),
                    addresses: vec![(v4("10.88.0.5"), 16), (v6("fd00::5"), 64)],
                }],
                routes: vec![
                    PlannedRoute {
                        destination: None,
                        gateway: Some(v4("10.88.0.1")),
                        device: "eth0".into(),
                        source: None,
                        scope: 0,
                        metric: None,
                        onlink: false,
                    },
                    PlannedRoute {
                        destination: None,
                        gateway: Some(v6("fd00::1")),
                        device: "eth0".into(),
                        source: None,
                        scope: 0,
                        metric: Some(1024),
                        onlink: false,
                    },
                ],
                neighbors: vec![],
            }
        );
    }

    #[test]
    fn the_plan_round_trips_through_json() {
        let plan = plan_from_dump(&bridge_plugin_dump()).unwrap();
        let json = serde_json::to_string(&plan).unwrap();
        assert!(json.contains("\"10.88.0.5\""), "{json}");
        let back: NetworkPlan = serde_json::from_str(&json).unwrap();
        assert_eq!(back, plan);
    }

    #[test]
    fn link_scope_static_routes_come_before_routes_through_gateways_with_their_source_and_flags() {
        let mut dump = bridge_plugin_dump();
        // Calico-style: a gateway reachable only through a link-scope host route, plus a
        // route through an on-link gateway with a preferred source.
        dump.routes = vec![
            route(R {
                gateway: Some(v4("169.254.1.1")),
                ..R::default()
            }),
            route(R {
                scope: RouteScope::Link,
                dst: Some((v4("169.254.1.1"), 32)),
                ..R::default()
            }),
            {
                let mut m = route(R {
                    protocol: RouteProtocol::Static,
                    dst: Some((v4("192.168.0.0"), 24)),
                    gateway: Some(v4("172.16.0.1")),
                    prefsrc: Some(v4("10.88.0.5")),
                    priority: Some(50),
                    ..R::default()
                });
                m.header.flags = RouteFlags::Onlink;
                m
            },
        ];
        let plan = plan_from_dump(&dump).unwrap();
        assert_eq!(
            plan.routes,
            vec![
                PlannedRoute {
                    destination: Some((v4("169.254.1.1"), 32)),
                    gateway: None,
                    device: "eth0".into(),
                    source: None,
                    scope: 253,
                    metric: None,
                    onlink: false,
                },
                PlannedRoute {
                    destination: None,
                    gateway: Some(v4("169.254.1.1")),
                    device: "eth0".into(),
                    source: None,
                    scope: 0,
                    metric: None,
                    onlink: false,
                },
                PlannedRoute {
                    destination: Some((v4("192.168.0.0"), 24)),
                    gateway: Some(v4("172.16.0.1")),
                    device: "eth0".into(),
                    source: Some(v4("10.88.0.5")),
                    scope: 0,
                    metric: Some(50),
                    onlink: true,
                },
            ]
        );
    }

    #[test]
    fn only_permanent_neighbours_on_planned_interfaces_are_kept() {
        let mut dump = bridge_plugin_dump();
        let neigh = |ifindex, state, ip: IpAddr| {
            let mut m = NeighbourMessage::default();
            m.header.ifindex = ifindex;
            m.header.state = state;
            m.header.family = AddressFamily::Inet;
            m.attributes.push(NeighbourAttribute::Destination(match ip {
                IpAddr::V4(v) => NeighbourAddress::Inet(v),
                IpAddr::V6(v) => NeighbourAddress::Inet6(v),
            }));
            m.attributes
                .push(NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 1]));
            m
        };
        dump.neighbours = vec![
            neigh(2, NeighbourState::Permanent, v4("10.88.0.1")),
            neigh(2, NeighbourState::Reachable, v4("10.88.0.2")),
            neigh(2, NeighbourState::Permanent, v6("fd00::1")),
            neigh(1, NeighbourState::Permanent, v4("127.0.0.2")),
        ];
        let plan = plan_from_dump(&dump).unwrap();
        assert_eq!(
            plan.neighbors,
            vec![
                PlannedNeighbor {
                    device: "eth0".into(),
                    address: v4("10.88.0.1"),
                    mac: [2, 0, 0, 0, 0, 1],
                },
                PlannedNeighbor {
                    device: "eth0".into(),
                    address: v6("fd00::1"),
                    mac: [2, 0, 0, 0, 0, 1],
                },
            ]
        );
    }

    #[test]
    fn interfaces_come_in_index_order_with_their_own_addresses() {
        let mut dump = bridge_plugin_dump();
        let mut net1 = link(
            3,
            "net1",
            LinkLayerType::Ether,
            vec![LinkInfo::Kind(InfoKind::MacVlan)],
        );
        net1.attributes.push(LinkAttribute::Mtu(9000));
        net1.attributes
            .retain(|a| !matches!(a, LinkAttribute::Mtu(1500)));
        dump.links = vec![net1, veth(2, "eth0"), lo()];
        dump.addresses.push(addr(3, v4("192.168.10.4"), 24));
        let plan = plan_from_dump(&dump).unwrap();
        let names: Vec<_> = plan.interfaces.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["eth0", "net1"]);
        assert_eq!(plan.interfaces[1].mtu, 9000);
        assert_eq!(plan.interfaces[1].kind.as_deref(), Some("macvlan"));
        assert_eq!(plan.interfaces[1].addresses, vec![(v4("192.168.10.4"), 24)]);
        // A physical device moved into the namespace has no kind and is accepted.
        let mut dump = bridge_plugin_dump();
        dump.links = vec![lo(), link(2, "eth0", LinkLayerType::Ether, vec![])];
        assert_eq!(plan_from_dump(&dump).unwrap().interfaces[0].kind, None);
    }

    #[test]
    fn a_namespace_with_only_lo_is_refused() {
        let mut dump = bridge_plugin_dump();
        dump.links = vec![lo()];
        assert_eq!(plan_from_dump(&dump), Err(PlanError::NoInterface));
        assert_eq!(
            PlanError::NoInterface.to_string(),
            "no network interface besides lo"
        );
    }

    #[test]
    fn more_than_sixteen_interfaces_are_refused() {
        let mut dump = bridge_plugin_dump();
        dump.links = (2..=18).map(|i| veth(i, &format!("eth{i}"))).collect();
        assert_eq!(
            plan_from_dump(&dump),
            Err(PlanError::TooManyInterfaces { count: 17 })
        );
        dump.links.pop();
        assert_eq!(plan_from_dump(&dump).unwrap().interfaces.len(), 16);
    }

    #[test]
    fn a_tap_already_in_the_namespace_is_refused_by_name() {
        let mut dump = bridge_plugin_dump();
        dump.links.push(link(
            3,
            "tap0",
            LinkLayerType::Ether,
            vec![LinkInfo::Kind(InfoKind::Tun)],
        ));
        let err = plan_from_dump(&dump).unwrap_err();
        assert!(
            matches!(&err, PlanError::UnsupportedInterface { interface, .. } if interface == "tap0"),
            "{err:?}"
        );
        assert!(err.to_string().contains("tap0"), "{err}");
        assert!(err.to_string().contains("tun/tap"), "{err}");
    }

    #[test]
    fn ipvlan_in_l3_mode_is_refused_and_in_l2_mode_accepted() {
        let ipvlan = |mode| {
            link(
                2,
                "eth0",
                LinkLayerType::Ether,
                vec![
                    LinkInfo::Kind(InfoKind::IpVlan),
                    LinkInfo::Data(InfoData::IpVlan(vec![InfoIpVlan::Mode(mode)])),
                ],
            )
        };
        let mut dump = bridge_plugin_dump();
        dump.links = vec![lo(), ipvlan(IpVlanMode::L3)];
        let err = plan_from_dump(&dump).unwrap_err();
        assert!(err.to_string().contains("interface eth0"), "{err}");
        assert!(err.to_string().contains("L3 mode"), "{err}");
        dump.links = vec![lo(), ipvlan(IpVlanMode::L3S)];
        assert!(plan_from_dump(&dump).is_err());
        dump.links = vec![lo(), ipvlan(IpVlanMode::L2)];
        assert_eq!(
            plan_from_dump(&dump).unwrap().interfaces[0].kind.as_deref(),
            Some("ipvlan")
        );
    }

    #[test]
    fn a_layer_three_device_is_refused() {
        let mut dump = bridge_plugin_dump();
        dump.links.push(link(
            3,
            "wg0",
            LinkLayerType::None,
            vec![LinkInfo::Kind(InfoKind::Wireguard)],
        ));
        let err = plan_from_dump(&dump).unwrap_err();
        assert!(err.to_string().contains("interface wg0"), "{err}");
        assert!(err.to_string().contains("not Ethernet"), "{err}");
    }

    #[test]
    fn a_multipath_route_is_refused_rather_than_lost() {
        let mut dump = bridge_plugin_dump();
        let mut m = route(R {
            dst: Some((v4("10.1.0.0"), 16)),
            oif: None,
            ..R::default()
        });
        m.attributes.push(RouteAttribute::MultiPath(vec![]));
        dump.routes.push(m);
        let err = plan_from_dump(&dump).unwrap_err();
        assert_eq!(
            err.to_string(),
            "route 10.1.0.0/16 cannot be mirrored into a VM: multipath routes are not supported"
        );
    }

    #[test]
    fn routes_of_other_tables_and_unicast_routes_elsewhere_are_left_out() {
        let mut dump = bridge_plugin_dump();
        dump.routes = vec![
            route(R {
                table: 100,
                gateway: Some(v4("10.88.0.1")),
                ..R::default()
            }),
            route(R {
                oif: Some(1),
                dst: Some((v4("127.0.0.0"), 8)),
                ..R::default()
            }),
            route(R {
                kind: RouteType::BlackHole,
                dst: Some((v4("10.9.0.0"), 16)),
                oif: None,
                ..R::default()
            }),
        ];
        assert_eq!(plan_from_dump(&dump).unwrap().routes, vec![]);
    }

    #[test]
    fn an_ethernet_link_without_a_mac_is_refused() {
        let mut dump = bridge_plugin_dump();
        dump.links[1]
            .attributes
            .retain(|a| !matches!(a, LinkAttribute::Address(_)));
        let err = plan_from_dump(&dump).unwrap_err();
        assert!(err.to_string().contains("interface eth0"), "{err}");
    }
}

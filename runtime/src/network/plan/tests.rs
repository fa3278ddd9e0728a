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
    let v6 = matches!(r.dst, Some((IpAddr::V6(_), _))) || matches!(r.gateway, Some(IpAddr::V6(_)));
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

//! Unit tests of `model`.

use super::*;

fn itf(mac: &str, name: &str) -> InterfaceRequest {
    InterfaceRequest {
        mac: mac.into(),
        name: name.into(),
        mtu: 1500,
        addresses: vec![AddressRequest {
            address: "10.88.0.5".into(),
            prefix_len: 16,
        }],
    }
}

fn route(dst: &str, gw: &str, dev: &str) -> RouteRequest {
    RouteRequest {
        destination: dst.into(),
        gateway: gw.into(),
        device: dev.into(),
        ..Default::default()
    }
}

fn good() -> NetworkRequest {
    NetworkRequest {
        interfaces: vec![InterfaceRequest {
            mac: "02:AA:bb:cc:dd:05".into(),
            name: "eth0".into(),
            mtu: 1400,
            addresses: vec![
                AddressRequest {
                    address: "10.88.0.5".into(),
                    prefix_len: 16,
                },
                AddressRequest {
                    address: "fd00::5".into(),
                    prefix_len: 64,
                },
            ],
        }],
        routes: vec![
            route("", "10.88.0.1", "eth0"),
            route("", "fd00::1", ""),
            RouteRequest {
                destination: "10.99.0.0/24".into(),
                device: "eth0".into(),
                source: "10.88.0.5".into(),
                scope: 253,
                ..Default::default()
            },
        ],
        neighbors: vec![NeighborRequest {
            ip: "10.88.0.1".into(),
            mac: "02:00:00:00:00:01".into(),
            device: "eth0".into(),
        }],
    }
}

/// The error's text, which must be an Invalid one.
fn invalid(req: &NetworkRequest) -> String {
    match NetworkConfig::parse(req) {
        Err(e @ NetError::Invalid { .. }) => e.to_string(),
        other => panic!("not refused as invalid: {other:?}"),
    }
}

#[test]
fn a_good_request_parses_to_typed_values() {
    let c = NetworkConfig::parse(&good()).unwrap();
    let i = &c.interfaces[0];
    assert_eq!(i.mac, Mac([2, 0xaa, 0xbb, 0xcc, 0xdd, 5]));
    assert_eq!(i.mac.to_string(), "02:aa:bb:cc:dd:05");
    assert_eq!((i.name.as_str(), i.mtu), ("eth0", 1400));
    assert_eq!(i.addresses[0].to_string(), "10.88.0.5/16");
    assert_eq!(i.addresses[1].to_string(), "fd00::5/64");
    // An empty destination is the default route of the gateway's family.
    assert_eq!(c.routes[0].destination.to_string(), "0.0.0.0/0");
    assert_eq!(c.routes[0].to_string(), "default via 10.88.0.1 dev eth0");
    assert_eq!(c.routes[1].destination.to_string(), "::/0");
    assert_eq!(c.routes[1].device, None);
    assert_eq!(
        c.routes[2].to_string(),
        "10.99.0.0/24 dev eth0 src 10.88.0.5 scope link"
    );
    assert_eq!(c.routes[2].scope.raw(), 253);
    assert_eq!(
        c.neighbors[0].to_string(),
        "10.88.0.1 lladdr 02:00:00:00:00:01 dev eth0"
    );
    assert_eq!(
        NetworkConfig::parse(&NetworkRequest::default()).unwrap(),
        NetworkConfig::default()
    );
}

#[test]
fn too_many_entries_are_refused_by_count() {
    let mut r = NetworkRequest {
        interfaces: (0..17)
            .map(|i| itf(&format!("02:00:00:00:00:{i:02x}"), &format!("eth{i}")))
            .collect(),
        ..Default::default()
    };
    assert_eq!(invalid(&r), "interfaces: 17 entries, at most 16");
    r.interfaces.truncate(16);
    NetworkConfig::parse(&r).unwrap();

    let mut r = good();
    r.routes = vec![route("", "10.88.0.1", ""); 257];
    assert_eq!(invalid(&r), "routes: 257 entries, at most 256");
    let mut r = good();
    r.neighbors = vec![r.neighbors[0].clone(); 257];
    assert_eq!(invalid(&r), "neighbors: 257 entries, at most 256");
    // A huge list is refused before any entry is looked at.
    let mut r = good();
    r.routes = vec![route("junk", "junk", "junk"); 100_000];
    assert_eq!(invalid(&r), "routes: 100000 entries, at most 256");

    let mut r = good();
    r.interfaces[0].addresses = (1..=17)
        .map(|k| AddressRequest {
            address: format!("10.88.0.{k}"),
            prefix_len: 16,
        })
        .collect();
    assert_eq!(
        invalid(&r),
        "interfaces[0].addresses: 17 entries, at most 16"
    );
}

#[test]
fn bad_macs_are_refused() {
    for bad in [
        "",
        "02:00:00:00:00",
        "02:00:00:00:00:0g",
        "02-00-00-00-00-05",
        "02:00:00:00:00:005",
        "0200.0000.0005",
        "+2:00:00:00:00:05",
        "02:00:00:00:00:05 ",
        "é2:00:00:00:00:05",
    ] {
        let mut r = good();
        r.interfaces[0].mac = bad.into();
        let e = invalid(&r);
        assert!(
            e.starts_with("interfaces[0].mac: ") && e.contains("is not a MAC address"),
            "{bad:?}: {e}"
        );
    }
    let mut r = good();
    r.interfaces[0].mac = "00:00:00:00:00:00".into();
    assert!(invalid(&r).contains("not a NIC's"));
    r.interfaces[0].mac = "01:00:5e:00:00:01".into();
    assert!(invalid(&r).contains("not a NIC's"));
    let mut r = good();
    r.neighbors[0].mac = "nope".into();
    assert!(invalid(&r).starts_with("neighbors[0].mac: \"nope\" is not a MAC"));
    // The same NIC twice.
    let mut r = good();
    r.interfaces.push(itf("02:aa:bb:cc:dd:05", "eth1"));
    assert_eq!(
        invalid(&r),
        "interfaces[1].mac: 02:aa:bb:cc:dd:05 is also interfaces[0]'s"
    );
    // A long value is quoted cut short.
    let mut r = good();
    r.interfaces[0].mac = "x".repeat(1 << 20);
    assert!(invalid(&r).len() < 200);
}

#[test]
fn bad_mtus_are_refused() {
    for (mtu, ok) in [
        (0, false),
        (67, false),
        (68, true),
        (65535, true),
        (70000, false),
    ] {
        let mut r = good();
        r.interfaces.push(itf("02:00:00:00:00:06", "eth1"));
        r.interfaces[1].mtu = mtu;
        match NetworkConfig::parse(&r) {
            Ok(_) => assert!(ok, "{mtu} accepted"),
            Err(e) => {
                assert!(!ok, "{mtu}: {e}");
                assert_eq!(
                    e.to_string(),
                    format!("interfaces[1].mtu: {mtu} is out of 68..=65535")
                );
            }
        }
    }
}

#[test]
fn bad_addresses_and_prefixes_are_refused() {
    let set = |a: &str, len: u32| {
        let mut r = good();
        r.interfaces[0].addresses[1] = AddressRequest {
            address: a.into(),
            prefix_len: len,
        };
        r
    };
    NetworkConfig::parse(&set("10.1.2.3", 32)).unwrap();
    NetworkConfig::parse(&set("fd00::9", 128)).unwrap();
    assert_eq!(
        invalid(&set("10.1.2.3", 33)),
        "interfaces[0].addresses[1].prefix_len: 33 is longer than an IPv4 prefix (32)"
    );
    assert_eq!(
        invalid(&set("fd00::9", 129)),
        "interfaces[0].addresses[1].prefix_len: 129 is longer than an IPv6 prefix (128)"
    );
    assert!(invalid(&set("fd00::9", u32::MAX)).contains("4294967295 is longer"));
    for bad in [
        "",
        "10.88.0",
        "10.88.0.5/16",
        "010.88.0.5",
        "fd00::5%eth0",
        "eth0",
    ] {
        let e = invalid(&set(bad, 16));
        assert!(
            e.starts_with("interfaces[0].addresses[1].address: ")
                && e.contains("is not an IPv4 or IPv6 address"),
            "{bad:?}: {e}"
        );
    }
    for bad in ["0.0.0.0", "::", "224.0.0.1", "ff02::1"] {
        assert!(
            invalid(&set(bad, 8)).contains("unspecified or multicast"),
            "{bad}"
        );
    }
    assert_eq!(
        invalid(&set("10.88.0.5", 24)),
        "interfaces[0].addresses[1].address: 10.88.0.5 is also addresses[0]"
    );
}

#[test]
fn bad_interface_names_are_refused() {
    for bad in [
        "",
        ".",
        "..",
        "eth/0",
        "eth:0",
        "eth 0",
        "eth\t0",
        "eth\n",
        "eth\u{0}0",
        "eth\u{a0}0",
        "abcdefghijklmnop",
    ] {
        let mut r = good();
        r.interfaces[0].name = bad.into();
        let e = invalid(&r);
        assert!(e.starts_with("interfaces[0].name: "), "{bad:?}: {e}");
    }
    for ok in ["e", "abcdefghijklmno", "eth0.100", "net-1_x", "..."] {
        let mut r = good();
        r.interfaces[0].name = ok.into();
        for route in &mut r.routes {
            if !route.device.is_empty() {
                route.device = ok.into();
            }
        }
        r.neighbors[0].device = ok.into();
        NetworkConfig::parse(&r).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
    }
    let mut r = good();
    r.interfaces.push(itf("02:00:00:00:00:06", "eth0"));
    assert_eq!(
        invalid(&r),
        "interfaces[1].name: \"eth0\" is also interfaces[0]'s"
    );
    let mut r = good();
    r.routes[0].device = "a/b".into();
    assert!(invalid(&r).starts_with("routes[0].device: \"a/b\" has '/'"));
    let mut r = good();
    r.neighbors[0].device = String::new();
    assert!(invalid(&r).starts_with("neighbors[0].device: \"\" is empty"));
}

#[test]
fn bad_routes_are_refused() {
    let one = |r: RouteRequest| {
        let mut req = good();
        req.routes = vec![r];
        req
    };
    let e = invalid(&one(route("", "", "eth0")));
    assert!(e.starts_with("routes[0].destination: empty"), "{e}");
    let e = invalid(&one(route("10.99.0.0/24", "", "")));
    assert!(e.starts_with("routes[0].device: empty"), "{e}");
    for bad in [
        "10.99.0.0",
        "10.99.0.0/",
        "10.99.0.0/+8",
        "10.99.0.0/0008",
        "/8",
        "default",
    ] {
        let e = invalid(&one(route(bad, "10.88.0.1", "")));
        assert!(e.contains("is not a CIDR"), "{bad}: {e}");
    }
    assert_eq!(
        invalid(&one(route("10.99.0.0/33", "10.88.0.1", ""))),
        "routes[0].destination: 33 is longer than an IPv4 prefix (32)"
    );
    assert_eq!(
        invalid(&one(route("10.99.0.5/24", "10.88.0.1", ""))),
        "routes[0].destination: 10.99.0.5/24 has host bits set (the network is 10.99.0.0/24)"
    );
    assert!(invalid(&one(route("fd01::1/64", "fd00::1", ""))).contains("host bits"));
    NetworkConfig::parse(&one(route("0.0.0.0/0", "10.88.0.1", ""))).unwrap();
    NetworkConfig::parse(&one(route("10.99.0.5/32", "10.88.0.1", ""))).unwrap();
    NetworkConfig::parse(&one(route("fd01::/16", "fd00::1", ""))).unwrap();
    assert_eq!(
        invalid(&one(route("10.99.0.0/24", "fd00::1", ""))),
        "routes[0].gateway: fd00::1 is IPv6, the destination is IPv4"
    );
    assert!(invalid(&one(route("", "224.0.0.1", ""))).contains("multicast"));
    assert!(invalid(&one(route("", "gw", ""))).starts_with("routes[0].gateway: \"gw\""));
    let mut r = route("", "10.88.0.1", "");
    r.source = "fd00::5".into();
    assert_eq!(
        invalid(&one(r)),
        "routes[0].source: fd00::5 is IPv6, the destination is IPv4"
    );
    for (scope, ok) in [
        (0, true),
        (253, true),
        (254, true),
        (1, false),
        (200, false),
        (255, false),
        (u32::MAX, false),
    ] {
        let mut r = route("", "10.88.0.1", "");
        r.scope = scope;
        match NetworkConfig::parse(&one(r)) {
            Ok(_) => assert!(ok, "{scope}"),
            Err(e) => {
                assert!(!ok, "{scope}: {e}");
                assert!(e.to_string().starts_with("routes[0].scope: "));
            }
        }
    }
}

fn link(index: u32, name: &str, mac: Option<&str>) -> Link {
    Link {
        index,
        name: name.into(),
        mac: mac.map(|m| Mac::parse(m).unwrap()),
    }
}

fn guest_links() -> Vec<Link> {
    vec![
        link(1, "lo", Some("00:00:00:00:00:00")),
        link(2, "eth0", Some("02:00:00:00:00:0a")),
        link(3, "eth1", Some("02:00:00:00:00:0b")),
        link(4, "sit0", None),
    ]
}

fn config(itfs: &[(&str, &str)], routes: Vec<RouteRequest>) -> NetworkConfig {
    NetworkConfig::parse(&NetworkRequest {
        interfaces: itfs.iter().map(|(m, n)| itf(m, n)).collect(),
        routes,
        neighbors: vec![],
    })
    .unwrap()
}

#[test]
fn interfaces_are_matched_by_mac() {
    let c = config(
        &[("02:00:00:00:00:0b", "net1")],
        vec![
            route("", "10.88.0.1", "net1"),
            route("", "10.88.0.1", "eth0"),
        ],
    );
    let p = plan(&c, &guest_links()).unwrap();
    assert_eq!(
        p.links,
        vec![PlannedLink {
            index: 3,
            current: "eth1".into(),
            temporary: None
        }]
    );
    assert_eq!(p.devices["net1"], 3);
    assert_eq!(p.devices["eth0"], 2);
    assert!(!p.devices.contains_key("eth1"), "renamed away");
}

#[test]
fn a_mac_no_link_has_is_a_precondition_naming_it_and_the_macs_present() {
    let c = config(
        &[("02:00:00:00:00:0a", "eth0"), ("02:00:00:00:00:0c", "eth1")],
        vec![],
    );
    let e = plan(&c, &guest_links()).unwrap_err();
    assert!(matches!(e, NetError::Precondition { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "interfaces[1].mac: no link has MAC 02:00:00:00:00:0c (MACs present: \
         lo 00:00:00:00:00:00, eth0 02:00:00:00:00:0a, eth1 02:00:00:00:00:0b)"
    );
    let mut links = guest_links();
    links[2].mac = links[1].mac;
    let c = config(&[("02:00:00:00:00:0a", "eth0")], vec![]);
    let e = plan(&c, &links).unwrap_err();
    assert!(matches!(e, NetError::Precondition { .. }), "{e:?}");
    assert!(e.to_string().contains("two links"), "{e}");
}

#[test]
fn route_and_neighbor_devices_must_exist_after_renaming() {
    let c = config(
        &[("02:00:00:00:00:0b", "net1")],
        vec![route("", "10.88.0.1", "eth1")],
    );
    assert_eq!(
        plan(&c, &guest_links()).unwrap_err().to_string(),
        "routes[0].device: \"eth1\" is neither a configured interface nor an existing link"
    );
    let mut c = config(&[("02:00:00:00:00:0b", "net1")], vec![]);
    c.neighbors.push(Neighbor {
        ip: "10.88.0.1".parse().unwrap(),
        mac: Mac([2, 0, 0, 0, 0, 1]),
        device: "eth9".into(),
    });
    let e = plan(&c, &guest_links()).unwrap_err();
    assert!(matches!(e, NetError::Invalid { .. }), "{e:?}");
    assert!(e.to_string().starts_with("neighbors[0].device: \"eth9\""));
    // Existing links that are not configured are fine devices.
    c.neighbors[0].device = "sit0".into();
    plan(&c, &guest_links()).unwrap();
}

#[test]
fn a_name_held_by_a_link_not_configured_is_refused() {
    let c = config(&[("02:00:00:00:00:0b", "eth0")], vec![]);
    assert_eq!(
        plan(&c, &guest_links()).unwrap_err().to_string(),
        "interfaces[0].name: \"eth0\" is the name of link 2, which is not configured"
    );
    let c = config(&[("02:00:00:00:00:0b", "lo")], vec![]);
    assert!(plan(&c, &guest_links()).is_err());
}

#[test]
fn two_nics_swapping_names_go_through_temporary_names() {
    let mut links = guest_links();
    links.push(link(9, "cpn2", None));
    let c = config(
        &[("02:00:00:00:00:0b", "eth0"), ("02:00:00:00:00:0a", "eth1")],
        vec![],
    );
    let p = plan(&c, &links).unwrap();
    // eth1 (index 3) becomes eth0, held now by index 2, which moves aside first (its
    // first choice of temporary name is taken).
    assert_eq!(p.links[0].temporary.as_deref(), Some("cpn3"));
    assert_eq!(p.links[1].temporary.as_deref(), Some("cpn2_1"));
    assert_eq!((p.devices["eth0"], p.devices["eth1"]), (3, 2));
    // No swap: no temporary name.
    let c = config(
        &[("02:00:00:00:00:0a", "eth0"), ("02:00:00:00:00:0b", "net1")],
        vec![],
    );
    let p = plan(&c, &links).unwrap();
    assert!(p.links.iter().all(|l| l.temporary.is_none()));
}

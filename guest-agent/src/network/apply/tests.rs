//! The applier against the real kernel, as root, in a private network namespace made for
//! each test on a thread of its own (`unshare(CLONE_NEWNET)` applies to the calling
//! thread only), so the host's network is never touched. The guest's virtio-net NICs are
//! stood in for by veth links (this host's kernel has no dummy links), created with the
//! MACs the requests name; the result is read back over netlink.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rtnetlink::LinkVeth;
use rtnetlink::packet_route::address::AddressMessage;
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};

use super::*;
use crate::network::model::{
    AddressRequest, InterfaceRequest, NeighborRequest, NetworkRequest, RouteRequest,
};

/// Runs `f` in a new network namespace on a thread of its own with a current-thread
/// runtime (every netlink socket is then opened in that namespace). `None` (skipped,
/// said on stderr) when not root.
pub(crate) fn in_private_netns<F, Fut, T>(f: F) -> Option<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: creating a private network namespace needs root");
        return None;
    }
    let ns = || {
        std::fs::metadata("/proc/thread-self/ns/net")
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
    };
    let thread = std::thread::spawn(move || {
        let host = ns().unwrap();
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        assert_ne!(ns().unwrap(), host, "still in the host's network namespace");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    });
    match thread.join() {
        Ok(v) => Some(v),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A veth pair `name` (with `mac`) / `peer`, the peer up (so that `name` gets a carrier).
async fn nic(h: &Handle, name: &str, mac: [u8; 6], peer: &str) {
    h.link()
        .add(LinkVeth::new(name, peer).address(mac.to_vec()).build())
        .execute()
        .await
        .unwrap();
    let peer = link(h, peer).await;
    set(
        h,
        LinkUnspec::new_with_index(peer.header.index).up().build(),
        "peer up".into(),
    )
    .await
    .unwrap();
}

async fn link(h: &Handle, name: &str) -> LinkMessage {
    h.link()
        .get()
        .match_name(name)
        .execute()
        .try_next()
        .await
        .unwrap_or_else(|e| panic!("link {name}: {e}"))
        .unwrap()
}

fn mtu(m: &LinkMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(n) => Some(*n),
        _ => None,
    })
}

/// `addr/len` of every address of link `index`.
async fn addresses(h: &Handle, index: u32) -> Vec<String> {
    let all: Vec<AddressMessage> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .unwrap();
    let mut out = Vec::new();
    for m in all.iter().filter(|m| m.header.index == index) {
        for a in &m.attributes {
            if let AddressAttribute::Address(ip) = a {
                out.push(format!("{ip}/{}", m.header.prefix_len));
            }
        }
    }
    out
}

/// The main table's routes of one family as `dst/len [via gw] [oif n]`.
async fn routes(h: &Handle, v6: bool) -> Vec<String> {
    let query = if v6 {
        RouteMessageBuilder::<Ipv6Addr>::new().build()
    } else {
        RouteMessageBuilder::<Ipv4Addr>::new().build()
    };
    let all: Vec<RouteMessage> = h.route().get(query).execute().try_collect().await.unwrap();
    all.iter()
        .filter(|m| m.header.table == 254)
        .map(|m| {
            let addr = |a: &RouteAddress| match a {
                RouteAddress::Inet(v4) => v4.to_string(),
                RouteAddress::Inet6(v6) => v6.to_string(),
                other => format!("{other:?}"),
            };
            let mut dst = if v6 {
                "::".to_string()
            } else {
                "0.0.0.0".to_string()
            };
            let mut rest = String::new();
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(d) => dst = addr(d),
                    RouteAttribute::Gateway(g) => rest.push_str(&format!(" via {}", addr(g))),
                    RouteAttribute::Oif(i) => rest.push_str(&format!(" oif {i}")),
                    _ => {}
                }
            }
            format!("{dst}/{}{rest}", m.header.destination_prefix_length)
        })
        .collect()
}

/// `ip lladdr mac state` of the neighbour entries of link `index`.
async fn neighbours(h: &Handle, index: u32) -> Vec<String> {
    let all: Vec<_> = h.neighbours().get().execute().try_collect().await.unwrap();
    all.iter()
        .filter(|m| m.header.ifindex == index)
        .map(|m| {
            let mut ip = String::new();
            let mut mac = String::new();
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                        ip = v4.to_string()
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                        ip = v6.to_string()
                    }
                    NeighbourAttribute::LinkLayerAddress(l) => {
                        mac = <[u8; 6]>::try_from(l.as_slice())
                            .map(|m| Mac(m).to_string())
                            .unwrap_or_default()
                    }
                    _ => {}
                }
            }
            format!("{ip} lladdr {mac} {:?}", m.header.state)
        })
        .collect()
}

const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x05];

fn request() -> NetworkRequest {
    NetworkRequest {
        interfaces: vec![InterfaceRequest {
            mac: "02:00:00:00:00:05".into(),
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
            RouteRequest {
                gateway: "10.88.0.1".into(),
                device: "eth0".into(),
                ..Default::default()
            },
            RouteRequest {
                destination: "10.99.0.0/24".into(),
                gateway: "10.88.0.1".into(),
                device: "eth0".into(),
                ..Default::default()
            },
            RouteRequest {
                gateway: "fd00::1".into(),
                device: "eth0".into(),
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

#[test]
fn configures_the_nic_with_the_requested_mac_and_reads_it_back() {
    in_private_netns(|| async {
        let nl = Netlink::open().unwrap();
        let h = &nl.handle;

        // A new namespace's lo is down; CreateSandbox's step brings it up (twice: no-op).
        let lo = link(h, "lo").await;
        assert!(!lo.header.flags.contains(LinkFlags::Up));
        loopback_up().await.unwrap();
        loopback_up().await.unwrap();
        assert!(is_up(h, lo.header.index).await.unwrap(), "lo is up");

        nic(h, "nic0", MAC, "peer0").await;
        let index = link(h, "nic0").await.header.index;
        let config = NetworkConfig::parse(&request()).unwrap();
        configure(&config).await.unwrap();

        let eth0 = link(h, "eth0").await;
        assert_eq!(eth0.header.index, index, "nic0 renamed to eth0");
        assert_eq!(link_of(&eth0).mac, Some(Mac(MAC)));
        assert_eq!(mtu(&eth0), Some(1400));
        assert!(eth0.header.flags.contains(LinkFlags::Up));
        let addrs = addresses(h, index).await;
        assert!(addrs.contains(&"10.88.0.5/16".to_string()), "{addrs:?}");
        assert!(addrs.contains(&"fd00::5/64".to_string()), "{addrs:?}");
        let v4 = routes(h, false).await;
        assert!(
            v4.contains(&format!("0.0.0.0/0 via 10.88.0.1 oif {index}")),
            "{v4:?}"
        );
        assert!(
            v4.contains(&format!("10.99.0.0/24 via 10.88.0.1 oif {index}")),
            "{v4:?}"
        );
        assert!(
            v4.contains(&format!("10.88.0.0/16 oif {index}")),
            "the address's prefix route: {v4:?}"
        );
        let v6 = routes(h, true).await;
        assert!(
            v6.contains(&format!("::/0 via fd00::1 oif {index}")),
            "{v6:?}"
        );
        assert_eq!(
            neighbours(h, index).await,
            vec!["10.88.0.1 lladdr 02:00:00:00:00:01 Permanent".to_string()]
        );

        // A second interface whose MAC no link has: refused before anything changes,
        // naming the MAC and the MACs present.
        let mut two = request();
        two.interfaces.push(InterfaceRequest {
            mac: "02:00:00:00:00:66".into(),
            name: "eth1".into(),
            mtu: 9000,
            addresses: vec![],
        });
        two.interfaces[0].mtu = 1300;
        let e = configure(&NetworkConfig::parse(&two).unwrap())
            .await
            .unwrap_err();
        assert!(matches!(e, NetError::Precondition { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.starts_with("interfaces[1].mac: no link has MAC 02:00:00:00:00:66"),
            "{text}"
        );
        assert!(text.contains("eth0 02:00:00:00:00:05"), "{text}");
        assert_eq!(mtu(&link(h, "eth0").await), Some(1400), "nothing changed");

        // A kernel refusal names the step and the interface.
        let e = configure(&config).await.unwrap_err();
        assert_eq!(e.to_string(), "adding 10.88.0.5/16 to eth0: File exists");
    });
}

#[test]
fn ipv6_addresses_are_usable_at_once() {
    in_private_netns(|| async {
        let nl = Netlink::open().unwrap();
        let h = &nl.handle;
        nic(h, "nic0", MAC, "peer0").await;
        let mut req = request();
        req.routes.clear();
        req.neighbors.clear();
        configure(&NetworkConfig::parse(&req).unwrap())
            .await
            .unwrap();
        let index = link(h, "eth0").await.header.index;
        let all: Vec<AddressMessage> = h
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .unwrap();
        let fd00 = all
            .iter()
            .find(|m| {
                m.attributes.contains(&AddressAttribute::Address(IpAddr::V6(
                    "fd00::5".parse().unwrap(),
                )))
            })
            .expect("fd00::5");
        let flags = fd00.attributes.iter().find_map(|a| match a {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        });
        let flags = flags.unwrap_or(AddressFlags::empty());
        assert!(flags.contains(AddressFlags::Nodad), "{flags:?}");
        assert!(!flags.contains(AddressFlags::Tentative), "{flags:?}");
    });
}

#[test]
fn two_nics_can_swap_names() {
    in_private_netns(|| async {
        let nl = Netlink::open().unwrap();
        let h = &nl.handle;
        nic(h, "eth0", [2, 0, 0, 0, 0, 0x0a], "peer0").await;
        nic(h, "eth1", [2, 0, 0, 0, 0, 0x0b], "peer1").await;
        let (a, b) = (
            link(h, "eth0").await.header.index,
            link(h, "eth1").await.header.index,
        );
        let itf = |mac: &str, name: &str, address: &str| InterfaceRequest {
            mac: mac.into(),
            name: name.into(),
            mtu: 1500,
            addresses: vec![AddressRequest {
                address: address.into(),
                prefix_len: 24,
            }],
        };
        let req = NetworkRequest {
            interfaces: vec![
                itf("02:00:00:00:00:0a", "eth1", "10.1.0.2"),
                itf("02:00:00:00:00:0b", "eth0", "10.2.0.2"),
            ],
            routes: vec![RouteRequest {
                destination: "10.3.0.0/16".into(),
                gateway: "10.2.0.1".into(),
                ..Default::default()
            }],
            neighbors: vec![],
        };
        configure(&NetworkConfig::parse(&req).unwrap())
            .await
            .unwrap();
        assert_eq!(link(h, "eth1").await.header.index, a);
        assert_eq!(link(h, "eth0").await.header.index, b);
        assert_eq!(
            addresses(h, a).await.first().map(String::as_str),
            Some("10.1.0.2/24")
        );
        // No device: the kernel picked the gateway's.
        assert!(
            routes(h, false)
                .await
                .contains(&format!("10.3.0.0/16 via 10.2.0.1 oif {b}"))
        );
    });
}

//! `carapace_runtime::network` on this host (root, no VM): a pod namespace built the way
//! CNI's bridge plugin leaves one (a veth `eth0` with an address and a default route via
//! the gateway on the other end), then `inspect`, `attach` (taps, ingress qdiscs, redirect
//! filters, frames really flowing between the tap descriptor and the gateway) and
//! `detach`. The gateway end lives in a second namespace rather than the host's, so the
//! tests touch nothing of the host's network and can run in parallel. Each fixture is
//! removed by a guard, also when an assertion fails.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use carapace_runtime::network::{
    self, NetworkError, NetworkPlan, PlannedInterface, PlannedRoute, VNET_HDR_LEN,
};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde_json::Value;

const POD_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0x58, 0x07, 0x05];
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 7, 5);
const GW_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 7, 1);
const MTU: u32 = 1450;

/// Runs `ip`/`tc` with `args`, panicking with its stderr when it fails.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(cmd: &str, args: &[&str]) -> Vec<Value> {
    let out = run(cmd, args);
    if out.trim().is_empty() {
        return Vec::new();
    }
    serde_json::from_str::<Vec<Value>>(&out).unwrap_or_else(|e| panic!("{out}: {e}"))
}

/// A pod namespace `pod` with `eth0` (10.88.7.5/24, fd00:7::5/64, MTU 1450, default
/// routes via .1 and ::1) whose veth peer `gw0` is in the namespace `gw` with the
/// gateway addresses. Dropping it deletes both namespaces (and so the veth pair and any
/// tap left in them).
struct Fixture {
    pod: String,
    gw: String,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

impl Fixture {
    fn names() -> (String, String) {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        (format!("cpnet-pod-{id}"), format!("cpnet-gw-{id}"))
    }

    /// Just the namespaces (the pod one holds only `lo`).
    fn empty() -> Fixture {
        assert!(carapace_tests::is_root(), "needs root (network namespaces)");
        let (pod, gw) = Self::names();
        run("ip", &["netns", "add", &pod]);
        let f = Fixture { pod, gw };
        run("ip", &["netns", "add", &f.gw]);
        f
    }

    fn bridge_plugin_like() -> Fixture {
        let f = Fixture::empty();
        let (p, g) = (f.pod.as_str(), f.gw.as_str());
        run(
            "ip",
            &[
                "-n",
                p,
                "link",
                "add",
                "eth0",
                "mtu",
                "1450",
                "address",
                "0a:58:0a:58:07:05",
                "type",
                "veth",
                "peer",
                "name",
                "gw0",
                "netns",
                g,
            ],
        );
        run(
            "ip",
            &["-n", g, "addr", "add", "10.88.7.1/24", "dev", "gw0"],
        );
        run(
            "ip",
            &[
                "-n",
                g,
                "addr",
                "add",
                "fd00:7::1/64",
                "dev",
                "gw0",
                "nodad",
            ],
        );
        run("ip", &["-n", g, "link", "set", "gw0", "up"]);
        run("ip", &["-n", p, "link", "set", "lo", "up"]);
        run(
            "ip",
            &["-n", p, "addr", "add", "10.88.7.5/24", "dev", "eth0"],
        );
        run(
            "ip",
            &[
                "-n",
                p,
                "addr",
                "add",
                "fd00:7::5/64",
                "dev",
                "eth0",
                "nodad",
            ],
        );
        run("ip", &["-n", p, "link", "set", "eth0", "up"]);
        run(
            "ip",
            &["-n", p, "route", "add", "default", "via", "10.88.7.1"],
        );
        run(
            "ip",
            &["-n", p, "-6", "route", "add", "default", "via", "fd00:7::1"],
        );
        f
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.pod)
    }

    /// `ip -j -d link show` in the pod namespace.
    fn links(&self) -> Vec<Value> {
        json("ip", &["-n", &self.pod, "-j", "-d", "link", "show"])
    }

    fn link(&self, name: &str) -> Option<Value> {
        self.links().into_iter().find(|l| l["ifname"] == name)
    }

    /// Devices with an ingress qdisc in the pod namespace.
    fn ingress_qdiscs(&self) -> Vec<String> {
        json("tc", &["-n", &self.pod, "-j", "qdisc", "show"])
            .into_iter()
            .filter(|q| q["kind"] == "ingress")
            .map(|q| q["dev"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// The devices that `dev`'s ingress filters redirect to (egress mirred redirect).
    fn redirects_of(&self, dev: &str) -> Vec<String> {
        let Some(_) = self.link(dev) else {
            return Vec::new();
        };
        json(
            "tc",
            &[
                "-n", &self.pod, "-j", "filter", "show", "dev", dev, "ingress",
            ],
        )
        .iter()
        .filter(|f| f["protocol"] == "all" && f["kind"] == "u32")
        .filter_map(|f| f["options"]["actions"].as_array())
        .flatten()
        .filter(|a| {
            a["kind"] == "mirred" && a["mirred_action"] == "redirect" && a["direction"] == "egress"
        })
        .map(|a| a["to_dev"].as_str().unwrap_or_default().to_owned())
        .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.gw] {
            // Quiet: a test may have deleted one already.
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn v4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse().unwrap())
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
}

fn expected_plan() -> NetworkPlan {
    NetworkPlan {
        interfaces: vec![PlannedInterface {
            name: "eth0".into(),
            mac: POD_MAC,
            mtu: MTU,
            kind: Some("veth".into()),
            addresses: vec![(v4("10.88.7.5"), 24), (v6("fd00:7::5"), 64)],
        }],
        routes: vec![
            PlannedRoute {
                destination: None,
                gateway: Some(v4("10.88.7.1")),
                device: "eth0".into(),
                source: None,
                scope: 0,
                metric: None,
                onlink: false,
            },
            PlannedRoute {
                destination: None,
                gateway: Some(v6("fd00:7::1")),
                device: "eth0".into(),
                source: None,
                scope: 0,
                metric: Some(1024),
                onlink: false,
            },
        ],
        neighbors: vec![],
    }
}

fn thread_netns() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
}

fn chain(e: &NetworkError) -> String {
    carapace_errors::chain(e)
}

#[test]
fn inspect_reads_a_bridge_plugin_namespace_into_exactly_its_plan_without_moving_the_caller() {
    let f = Fixture::bridge_plugin_like();
    let before = thread_netns();
    let plan = network::inspect(&f.path()).expect("inspect");
    assert_eq!(plan, expected_plan());
    assert_eq!(
        thread_netns(),
        before,
        "the calling thread changed namespace"
    );
}

#[test]
fn inspect_refuses_a_namespace_with_only_lo() {
    let f = Fixture::empty();
    let err = network::inspect(&f.path()).unwrap_err();
    let msg = chain(&err);
    assert!(msg.contains(&f.pod), "{msg}");
    assert!(msg.ends_with("no network interface besides lo"), "{msg}");
}

#[test]
fn inspect_refuses_a_tap_already_in_the_namespace_naming_it() {
    let f = Fixture::bridge_plugin_like();
    run(
        "ip",
        &["-n", &f.pod, "tuntap", "add", "dev", "tapx", "mode", "tap"],
    );
    let msg = chain(&network::inspect(&f.path()).unwrap_err());
    assert!(msg.contains("interface tapx cannot be mirrored"), "{msg}");
}

#[test]
fn a_missing_netns_path_is_named_by_inspect_and_attach_and_detach_of_it_succeeds() {
    let path = Path::new("/var/run/netns/cpnet-does-not-exist");
    let msg = chain(&network::inspect(path).unwrap_err());
    assert!(
        msg.starts_with("network namespace /var/run/netns/cpnet-does-not-exist does not exist"),
        "{msg}"
    );
    let msg = chain(&network::attach(path, &expected_plan(), "s1").unwrap_err());
    assert!(
        msg.contains("/var/run/netns/cpnet-does-not-exist does not exist"),
        "{msg}"
    );

    let record = network::AttachRecord {
        sandbox_id: "s1".into(),
        netns: path.to_owned(),
        netns_id: network::NetnsId { dev: 4, ino: 1 },
        links: vec![network::AttachedLink {
            interface: "eth0".into(),
            tap: "tap0_carapace".into(),
            interface_qdisc: true,
            tap_qdisc: true,
        }],
    };
    network::detach(&record).expect("detach of a missing namespace");

    let not_netns = tempfile::NamedTempFile::new().unwrap();
    let msg = chain(&network::inspect(not_netns.path()).unwrap_err());
    assert!(msg.ends_with("is not a network namespace"), "{msg}");
}

#[test]
fn attach_makes_a_tap_with_ingress_redirects_both_ways_and_detach_removes_everything() {
    let f = Fixture::bridge_plugin_like();
    let plan = network::inspect(&f.path()).unwrap();
    let attached = network::attach(&f.path(), &plan, "sandbox-1").expect("attach");

    assert_eq!(attached.taps.len(), 1);
    assert_eq!(attached.taps[0].name, "tap0_carapace");
    assert_eq!(attached.taps[0].interface, "eth0");
    let record = &attached.record;
    assert_eq!(record.sandbox_id, "sandbox-1");
    assert_eq!(record.netns, f.path());
    assert_eq!(record.links.len(), 1);
    assert!(record.links[0].interface_qdisc && record.links[0].tap_qdisc);
    let saved = serde_json::to_string(record).unwrap();
    assert_eq!(
        &serde_json::from_str::<network::AttachRecord>(&saved).unwrap(),
        record
    );

    let tap = f
        .link("tap0_carapace")
        .expect("no tap0_carapace in the namespace");
    let info = &tap["linkinfo"];
    assert_eq!(info["info_kind"], "tun", "{tap}");
    assert_eq!(info["info_data"]["type"], "tap", "{tap}");
    assert_eq!(info["info_data"]["pi"], false, "{tap}");
    assert_eq!(info["info_data"]["vnet_hdr"], true, "{tap}");
    assert_eq!(info["info_data"]["persist"], false, "{tap}");
    assert_eq!(tap["mtu"], MTU, "{tap}");
    assert!(
        tap["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
        "{tap}"
    );

    // IPv6 is off on the tap: the namespace's stack sends nothing into the VM.
    let addrs = json(
        "ip",
        &["-n", &f.pod, "-j", "addr", "show", "dev", "tap0_carapace"],
    );
    assert_eq!(addrs[0]["addr_info"], serde_json::json!([]), "{addrs:?}");

    let mut qdiscs = f.ingress_qdiscs();
    qdiscs.sort();
    assert_eq!(qdiscs, ["eth0", "tap0_carapace"]);
    assert_eq!(f.redirects_of("eth0"), ["tap0_carapace"]);
    assert_eq!(f.redirects_of("tap0_carapace"), ["eth0"]);

    // The VMM would hold the descriptor; it stops before the teardown.
    drop(attached.taps);
    network::detach(record).expect("detach");
    assert!(f.link("tap0_carapace").is_none(), "{:?}", f.links());
    assert_eq!(f.ingress_qdiscs(), Vec::<String>::new());
    assert_eq!(f.redirects_of("eth0"), Vec::<String>::new());
    // eth0 itself is as CNI left it.
    assert_eq!(network::inspect(&f.path()).unwrap(), plan);
    // Idempotent.
    network::detach(record).expect("second detach");
}

#[test]
fn detach_removes_the_tap_even_while_its_descriptor_is_still_open() {
    let f = Fixture::bridge_plugin_like();
    let plan = network::inspect(&f.path()).unwrap();
    let attached = network::attach(&f.path(), &plan, "s").unwrap();
    network::detach(&attached.record).expect("detach");
    assert!(f.link("tap0_carapace").is_none());
    assert_eq!(f.ingress_qdiscs(), Vec::<String>::new());
}

#[test]
fn detach_after_the_namespace_was_deleted_succeeds() {
    let f = Fixture::bridge_plugin_like();
    let plan = network::inspect(&f.path()).unwrap();
    let attached = network::attach(&f.path(), &plan, "s").unwrap();
    drop(attached.taps);
    run("ip", &["netns", "del", &f.pod]);
    network::detach(&attached.record).expect("detach of a deleted namespace");
}

#[test]
fn detach_leaves_a_namespace_that_reuses_the_path_alone() {
    let f = Fixture::bridge_plugin_like();
    let plan = network::inspect(&f.path()).unwrap();
    let attached = network::attach(&f.path(), &plan, "s").unwrap();
    drop(attached.taps);
    // The namespace goes, and a new one with an ingress qdisc on its eth0 takes its path.
    run("ip", &["netns", "del", &f.pod]);
    run("ip", &["netns", "add", &f.pod]);
    run(
        "ip",
        &[
            "-n", &f.pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
        ],
    );
    run(
        "tc",
        &["-n", &f.pod, "qdisc", "add", "dev", "eth0", "ingress"],
    );
    network::detach(&attached.record).expect("detach");
    assert_eq!(f.ingress_qdiscs(), ["eth0"]);
}

#[test]
fn a_failed_attach_removes_the_taps_and_qdiscs_it_made() {
    let f = Fixture::bridge_plugin_like();
    let mut plan = network::inspect(&f.path()).unwrap();
    // The second interface does not exist: the first is fully attached by then.
    let mut missing = plan.interfaces[0].clone();
    missing.name = "eth1".into();
    plan.interfaces.push(missing);
    let err = network::attach(&f.path(), &plan, "s").unwrap_err();
    let msg = chain(&err);
    assert!(
        msg.starts_with(&format!("finding interface eth1 in {}", f.path().display())),
        "{msg}"
    );
    assert!(f.link("tap0_carapace").is_none(), "{:?}", f.links());
    assert!(f.link("tap1_carapace").is_none(), "{:?}", f.links());
    assert_eq!(f.ingress_qdiscs(), Vec::<String>::new());
}

#[test]
fn an_interface_with_an_ingress_qdisc_already_is_refused_and_its_qdisc_kept() {
    let f = Fixture::bridge_plugin_like();
    run(
        "tc",
        &["-n", &f.pod, "qdisc", "add", "dev", "eth0", "ingress"],
    );
    let plan = network::inspect(&f.path()).unwrap();
    let msg = chain(&network::attach(&f.path(), &plan, "s").unwrap_err());
    assert!(
        msg.starts_with("adding the ingress qdisc to eth0 (it has an ingress or clsact qdisc"),
        "{msg}"
    );
    assert!(msg.contains(&f.path().display().to_string()), "{msg}");
    assert!(msg.ends_with("File exists (os error 17)"), "{msg}");
    assert!(f.link("tap0_carapace").is_none(), "{:?}", f.links());
    assert_eq!(f.ingress_qdiscs(), ["eth0"]);
}

// --- frames through the tap ---

const ETH_ARP: u16 = 0x0806;
const ETH_IPV4: u16 = 0x0800;

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn arp_request(sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet, IPv4, request
    a.extend_from_slice(&sender_mac);
    a.extend_from_slice(&sender.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    eth([0xff; 6], sender_mac, ETH_ARP, &a)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(b"carapace network_host");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 1, 0, 0]); // id 1, DF, TTL 64, ICMP
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ip
}

/// Writes `frame` to the tap with the zeroed virtio-net header the VMM would send.
fn send(tap: &mut File, frame: &[u8]) {
    let mut buf = vec![0u8; VNET_HDR_LEN];
    buf.extend_from_slice(frame);
    let n = tap.write(&buf).expect("write to the tap");
    assert_eq!(n, buf.len());
}

/// Reads frames from the tap (dropping the virtio-net header) until `want` accepts one,
/// or panics after `timeout`, listing what came instead.
fn receive(tap: &mut File, timeout: Duration, what: &str, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no {what} from the tap within {timeout:?}; other frames: {seen:?}"
        );
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(tap.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(ms)).expect("poll") == 0 {
            continue;
        }
        let mut buf = vec![0u8; VNET_HDR_LEN + 65_550];
        let n = tap.read(&mut buf).expect("read from the tap");
        assert!(n >= VNET_HDR_LEN + 14, "short read {n}");
        let frame = buf[VNET_HDR_LEN..n].to_vec();
        if want(&frame) {
            return frame;
        }
        seen.push(format!(
            "{} bytes type {:02x}{:02x}",
            frame.len(),
            frame[12],
            frame[13]
        ));
    }
}

#[test]
fn frames_written_to_the_tap_reach_the_gateway_and_its_arp_and_echo_replies_come_back() {
    let f = Fixture::bridge_plugin_like();
    let plan = network::inspect(&f.path()).unwrap();
    let mut attached = network::attach(&f.path(), &plan, "s").unwrap();
    let mut tap = File::from(attached.taps.remove(0).fd);
    let timeout = Duration::from_secs(5);

    // ARP for the gateway, as the guest's eth0 (the pod's MAC and address) would.
    send(&mut tap, &arp_request(POD_MAC, POD_IP, GW_IP));
    let reply = receive(&mut tap, timeout, "ARP reply from the gateway", |fr| {
        fr.len() >= 42
            && fr[12..14] == ETH_ARP.to_be_bytes()
            && fr[20..22] == [0, 2]
            && fr[28..32] == GW_IP.octets()
            && fr[0..6] == POD_MAC
    });
    let mut gw_mac = [0u8; 6];
    gw_mac.copy_from_slice(&reply[22..28]);

    // A ping to the gateway.
    let echo = icmp_echo(POD_IP, GW_IP, 0x4321, 1);
    send(&mut tap, &eth(gw_mac, POD_MAC, ETH_IPV4, &echo));
    receive(
        &mut tap,
        timeout,
        "ICMP echo reply from the gateway",
        |fr| {
            fr.len() >= 14 + 28
            && fr[12..14] == ETH_IPV4.to_be_bytes()
            && fr[14 + 9] == 1 // ICMP
            && fr[14 + 12..14 + 16] == GW_IP.octets()
            && fr[14 + 16..14 + 20] == POD_IP.octets()
            && fr[14 + 20] == 0 // echo reply
            && fr[14 + 24..14 + 26] == 0x4321u16.to_be_bytes()
        },
    );

    drop(tap);
    network::detach(&attached.record).unwrap();
}

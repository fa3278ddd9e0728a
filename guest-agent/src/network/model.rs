//! ConfigureNetwork's request as plain data, parsed into typed values and validated
//! before anything touches the network. No netlink and no wire type here: the checks run
//! on plain data in the unit tests below.
//!
//! Every refusal is a [`NetError::Invalid`] naming the field (`interfaces[1].mtu: 70000
//! is out of 68..=65535`); request values are quoted at most [`SHOWN`] characters long.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;

use super::NetError;

/// At most this many interfaces in one request.
pub const MAX_INTERFACES: usize = 16;
/// At most this many addresses per interface.
pub const MAX_ADDRESSES: usize = 16;
/// At most this many routes in one request.
pub const MAX_ROUTES: usize = 256;
/// At most this many neighbours in one request.
pub const MAX_NEIGHBORS: usize = 256;
/// The MTUs accepted (68: the IPv4 minimum; 65535: the largest the kernel's MTU field
/// takes for an Ethernet-like device).
pub const MTU: RangeInclusive<u32> = 68..=65535;
/// Longest interface name (IFNAMSIZ 16 with its NUL).
pub const MAX_IFNAME: usize = 15;
/// Longest request value quoted in an error.
pub const SHOWN: usize = 64;

// ---- the request as plain data (what the service converts the wire message to) ----

/// ConfigureNetwork's request, unchecked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkRequest {
    pub interfaces: Vec<InterfaceRequest>,
    pub routes: Vec<RouteRequest>,
    pub neighbors: Vec<NeighborRequest>,
}

/// One address: textual IPv4 or IPv6, and a prefix length.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressRequest {
    pub address: String,
    pub prefix_len: u32,
}

/// One guest NIC, found by `mac`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceRequest {
    pub mac: String,
    pub name: String,
    pub mtu: u32,
    pub addresses: Vec<AddressRequest>,
}

/// One route; empty strings are absent values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteRequest {
    pub destination: String,
    pub gateway: String,
    pub device: String,
    pub source: String,
    pub scope: u32,
}

/// One permanent neighbour entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NeighborRequest {
    pub ip: String,
    pub mac: String,
    pub device: String,
}

// ---- typed values ----

/// A link-layer (Ethernet) address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// `aa:bb:cc:dd:ee:ff` (either case), nothing else.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != 17 {
            return None;
        }
        let mut mac = [0u8; 6];
        for (i, octet) in mac.iter_mut().enumerate() {
            let at = i * 3;
            if i > 0 && b[at - 1] != b':' {
                return None;
            }
            let hex = std::str::from_utf8(&b[at..at + 2]).ok()?;
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            *octet = u8::from_str_radix(hex, 16).ok()?;
        }
        Some(Self(mac))
    }

    /// Neither all zeroes (the loopback's) nor a group (multicast) address: what a NIC
    /// can have.
    pub fn is_unicast(&self) -> bool {
        self.0 != [0; 6] && self.0[0] & 1 == 0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// An address with its prefix length (an interface address, or a route's destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpNet {
    /// The default route's destination in `addr`'s family.
    fn default_of(addr: IpAddr) -> Self {
        let addr = match addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        Self {
            addr,
            prefix_len: 0,
        }
    }

    pub fn is_default(&self) -> bool {
        self.prefix_len == 0
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// rtnetlink route scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Universe,
    Link,
    Host,
}

impl Scope {
    /// The `rtm_scope` value (RT_SCOPE_*).
    pub fn raw(self) -> u8 {
        match self {
            Self::Universe => 0,
            Self::Link => 253,
            Self::Host => 254,
        }
    }
}

/// A guest interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub mac: Mac,
    /// Its name in the guest (checked: a valid kernel interface name).
    pub name: String,
    pub mtu: u32,
    pub addresses: Vec<IpNet>,
}

/// A route; every address is of `destination`'s family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: IpNet,
    pub gateway: Option<IpAddr>,
    /// An interface name (checked), or none when the kernel picks it from the gateway.
    pub device: Option<String>,
    pub source: Option<IpAddr>,
    pub scope: Scope,
}

impl fmt::Display for Route {
    /// As `ip route` shows it: `default via 10.88.0.1 dev eth0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.destination.is_default() {
            f.write_str("default")?;
        } else {
            write!(f, "{}", self.destination)?;
        }
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        if let Some(dev) = &self.device {
            write!(f, " dev {dev}")?;
        }
        if let Some(src) = self.source {
            write!(f, " src {src}")?;
        }
        match self.scope {
            Scope::Universe => Ok(()),
            Scope::Link => f.write_str(" scope link"),
            Scope::Host => f.write_str(" scope host"),
        }
    }
}

/// A permanent neighbour entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbor {
    pub ip: IpAddr,
    pub mac: Mac,
    pub device: String,
}

impl fmt::Display for Neighbor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} lladdr {} dev {}", self.ip, self.mac, self.device)
    }
}

/// ConfigureNetwork's request, parsed and checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkConfig {
    pub interfaces: Vec<Interface>,
    pub routes: Vec<Route>,
    pub neighbors: Vec<Neighbor>,
}

// ---- parsing ----

/// `s` quoted, cut at [`SHOWN`] characters.
pub fn shown(s: &str) -> String {
    match s.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{:?}...", &s[..cut]),
        None => format!("{s:?}"),
    }
}

fn family(a: IpAddr) -> &'static str {
    match a {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

fn max_prefix(a: IpAddr) -> u32 {
    match a {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn count(field: &str, n: usize, max: usize) -> Result<(), NetError> {
    if n > max {
        return Err(NetError::invalid(
            field,
            format!("{n} entries, at most {max}"),
        ));
    }
    Ok(())
}

fn mac(field: &str, s: &str) -> Result<Mac, NetError> {
    Mac::parse(s).ok_or_else(|| {
        NetError::invalid(
            field,
            format!("{} is not a MAC address (aa:bb:cc:dd:ee:ff)", shown(s)),
        )
    })
}

/// A valid kernel interface name: 1..=15 bytes, no '/', ':' or whitespace, no control
/// character, not "." or ".." (the kernel's `dev_valid_name`, plus control characters).
pub fn ifname(field: &str, s: &str) -> Result<String, NetError> {
    let bad = |why: &str| Err(NetError::invalid(field, format!("{} {why}", shown(s))));
    if s.is_empty() {
        return bad("is empty (an interface name is needed)");
    }
    if s.len() > MAX_IFNAME {
        return bad(&format!("is longer than {MAX_IFNAME} bytes"));
    }
    if s == "." || s == ".." {
        return bad("is not an interface name");
    }
    if s.chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return bad("has '/', ':', whitespace or a control character");
    }
    Ok(s.to_owned())
}

/// A host address: IPv4 or IPv6, neither unspecified nor multicast.
fn ip(field: &str, s: &str) -> Result<IpAddr, NetError> {
    let a: IpAddr = s.parse().map_err(|_| {
        NetError::invalid(
            field,
            format!("{} is not an IPv4 or IPv6 address", shown(s)),
        )
    })?;
    if a.is_unspecified() || a.is_multicast() {
        return Err(NetError::invalid(
            field,
            format!("{a} is unspecified or multicast"),
        ));
    }
    Ok(a)
}

fn prefix_len(field: &str, a: IpAddr, len: u32) -> Result<u8, NetError> {
    if len > max_prefix(a) {
        return Err(NetError::invalid(
            field,
            format!(
                "{len} is longer than an {} prefix ({})",
                family(a),
                max_prefix(a)
            ),
        ));
    }
    // At most 128.
    Ok(u8::try_from(len).unwrap_or(u8::MAX))
}

/// A CIDR with no host bits set (what the kernel accepts as a route destination).
fn cidr(field: &str, s: &str) -> Result<IpNet, NetError> {
    let bad = || NetError::invalid(field, format!("{} is not a CIDR (10.0.0.0/8)", shown(s)));
    let (a, len) = s.split_once('/').ok_or_else(bad)?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let addr: IpAddr = a.parse().map_err(|_| bad())?;
    let len: u32 = len.parse().map_err(|_| bad())?;
    let prefix_len = prefix_len(field, addr, len)?;
    let net = IpNet { addr, prefix_len };
    let masked = match addr {
        IpAddr::V4(v4) => {
            let m = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & m))
        }
        IpAddr::V6(v6) => {
            let m = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & m))
        }
    };
    if masked != addr {
        return Err(NetError::invalid(
            field,
            format!("{net} has host bits set (the network is {masked}/{len})"),
        ));
    }
    Ok(net)
}

fn same_family(field: &str, a: IpAddr, of: &str, b: IpAddr) -> Result<(), NetError> {
    if a.is_ipv4() != b.is_ipv4() {
        return Err(NetError::invalid(
            field,
            format!("{a} is {}, {of} is {}", family(a), family(b)),
        ));
    }
    Ok(())
}

impl NetworkConfig {
    /// Parses and checks `req` (the limits first, so that an oversized request costs
    /// nothing more).
    pub fn parse(req: &NetworkRequest) -> Result<Self, NetError> {
        count("interfaces", req.interfaces.len(), MAX_INTERFACES)?;
        count("routes", req.routes.len(), MAX_ROUTES)?;
        count("neighbors", req.neighbors.len(), MAX_NEIGHBORS)?;
        let mut interfaces = Vec::with_capacity(req.interfaces.len());
        let mut macs: HashMap<Mac, usize> = HashMap::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, r) in req.interfaces.iter().enumerate() {
            let f = |name: &str| format!("interfaces[{i}].{name}");
            let m = mac(&f("mac"), &r.mac)?;
            if !m.is_unicast() {
                return Err(NetError::invalid(
                    f("mac"),
                    format!("{m} is not a NIC's (all zeroes or multicast)"),
                ));
            }
            if let Some(j) = macs.insert(m, i) {
                return Err(NetError::invalid(
                    f("mac"),
                    format!("{m} is also interfaces[{j}]'s"),
                ));
            }
            let name = ifname(&f("name"), &r.name)?;
            if let Some(j) = names.insert(name.clone(), i) {
                return Err(NetError::invalid(
                    f("name"),
                    format!("{name:?} is also interfaces[{j}]'s"),
                ));
            }
            if !MTU.contains(&r.mtu) {
                return Err(NetError::invalid(
                    f("mtu"),
                    format!("{} is out of {}..={}", r.mtu, MTU.start(), MTU.end()),
                ));
            }
            count(&f("addresses"), r.addresses.len(), MAX_ADDRESSES)?;
            let mut addresses: Vec<IpNet> = Vec::with_capacity(r.addresses.len());
            for (k, a) in r.addresses.iter().enumerate() {
                let addr = ip(&f(&format!("addresses[{k}].address")), &a.address)?;
                let len = prefix_len(
                    &f(&format!("addresses[{k}].prefix_len")),
                    addr,
                    a.prefix_len,
                )?;
                if let Some(j) = addresses.iter().position(|n| n.addr == addr) {
                    return Err(NetError::invalid(
                        f(&format!("addresses[{k}].address")),
                        format!("{addr} is also addresses[{j}]"),
                    ));
                }
                addresses.push(IpNet {
                    addr,
                    prefix_len: len,
                });
            }
            interfaces.push(Interface {
                mac: m,
                name,
                mtu: r.mtu,
                addresses,
            });
        }
        let routes = req
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| route(i, r))
            .collect::<Result<_, _>>()?;
        let neighbors = req
            .neighbors
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let f = |name: &str| format!("neighbors[{i}].{name}");
                Ok(Neighbor {
                    ip: ip(&f("ip"), &n.ip)?,
                    mac: mac(&f("mac"), &n.mac)?,
                    device: ifname(&f("device"), &n.device)?,
                })
            })
            .collect::<Result<_, NetError>>()?;
        Ok(Self {
            interfaces,
            routes,
            neighbors,
        })
    }
}

fn route(i: usize, r: &RouteRequest) -> Result<Route, NetError> {
    let f = |name: &str| format!("routes[{i}].{name}");
    let gateway = match r.gateway.as_str() {
        "" => None,
        g => Some(ip(&f("gateway"), g)?),
    };
    let destination = match (r.destination.as_str(), gateway) {
        ("", Some(gw)) => IpNet::default_of(gw),
        ("", None) => {
            return Err(NetError::invalid(
                f("destination"),
                "empty (the default route) needs a gateway, whose family it takes",
            ));
        }
        (d, _) => cidr(&f("destination"), d)?,
    };
    if let Some(gw) = gateway {
        same_family(&f("gateway"), gw, "the destination", destination.addr)?;
    }
    let source = match r.source.as_str() {
        "" => None,
        s => {
            let s = ip(&f("source"), s)?;
            same_family(&f("source"), s, "the destination", destination.addr)?;
            Some(s)
        }
    };
    let device = match (r.device.as_str(), gateway) {
        ("", Some(_)) => None,
        ("", None) => {
            return Err(NetError::invalid(
                f("device"),
                "empty: an on-link route (no gateway) needs a device",
            ));
        }
        (d, _) => Some(ifname(&f("device"), d)?),
    };
    let scope = match r.scope {
        0 => Scope::Universe,
        253 => Scope::Link,
        254 => Scope::Host,
        s => {
            return Err(NetError::invalid(
                f("scope"),
                format!("{s} is not 0 (universe), 253 (link) or 254 (host)"),
            ));
        }
    };
    Ok(Route {
        destination,
        gateway,
        device,
        source,
        scope,
    })
}

// ---- matching the request to the guest's links ----

/// A link of the guest, as listed over netlink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Its address when it is 6 bytes long (Ethernet-like links).
    pub mac: Option<Mac>,
}

/// What to do to each configured interface's link, in the request's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedLink {
    pub index: u32,
    /// Its name now.
    pub current: String,
    /// A name to move it to before any interface is renamed, because its current name
    /// is another configured interface's new name (two NICs swapping names).
    pub temporary: Option<String>,
}

/// The request matched to the guest's links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// One per interface of the request, same order.
    pub links: Vec<PlannedLink>,
    /// Every link's index by its name once the interfaces are renamed.
    pub devices: HashMap<String, u32>,
}

/// Matches `config`'s interfaces to `links` by MAC and checks the names: a MAC no link
/// (or two links) has is [`NetError::Precondition`]; a new name held by a link that is
/// not configured, or a route or neighbour device that will not exist, is
/// [`NetError::Invalid`].
pub fn plan(config: &NetworkConfig, links: &[Link]) -> Result<Plan, NetError> {
    let mut planned = Vec::with_capacity(config.interfaces.len());
    let mut configured: HashSet<u32> = HashSet::new();
    for (i, itf) in config.interfaces.iter().enumerate() {
        let field = format!("interfaces[{i}].mac");
        let mut matching = links.iter().filter(|l| l.mac == Some(itf.mac));
        let Some(link) = matching.next() else {
            return Err(NetError::Precondition {
                field,
                reason: format!(
                    "no link has MAC {} (MACs present: {})",
                    itf.mac,
                    present(links)
                ),
            });
        };
        if let Some(other) = matching.next() {
            return Err(NetError::Precondition {
                field,
                reason: format!(
                    "two links have MAC {}: {} and {}",
                    itf.mac, link.name, other.name
                ),
            });
        }
        configured.insert(link.index);
        planned.push(PlannedLink {
            index: link.index,
            current: link.name.clone(),
            temporary: None,
        });
    }
    // Final names: the configured links' new ones, the others' current ones.
    let mut devices: HashMap<String, u32> = HashMap::new();
    for l in links.iter().filter(|l| !configured.contains(&l.index)) {
        devices.insert(l.name.clone(), l.index);
    }
    for (i, (itf, p)) in config.interfaces.iter().zip(&planned).enumerate() {
        if let Some(index) = devices.get(&itf.name) {
            return Err(NetError::invalid(
                format!("interfaces[{i}].name"),
                format!(
                    "{:?} is the name of link {index}, which is not configured",
                    itf.name
                ),
            ));
        }
        devices.insert(itf.name.clone(), p.index);
    }
    // A configured link whose current name is another one's new name moves aside first,
    // to a name that is nobody's, now or after.
    let taken: HashSet<&str> = links
        .iter()
        .map(|l| l.name.as_str())
        .chain(config.interfaces.iter().map(|i| i.name.as_str()))
        .collect();
    let targets: HashSet<&str> = config.interfaces.iter().map(|i| i.name.as_str()).collect();
    let mut temporaries: HashSet<String> = HashSet::new();
    for (itf, p) in config.interfaces.iter().zip(planned.iter_mut()) {
        if p.current != itf.name && targets.contains(p.current.as_str()) {
            let name = (0..)
                .map(|k| {
                    if k == 0 {
                        format!("cpn{}", p.index)
                    } else {
                        format!("cpn{}_{k}", p.index)
                    }
                })
                .find(|n| !taken.contains(n.as_str()) && !temporaries.contains(n))
                .unwrap_or_default();
            temporaries.insert(name.clone());
            p.temporary = Some(name);
        }
    }
    for (i, r) in config.routes.iter().enumerate() {
        if let Some(dev) = &r.device {
            device(&devices, &format!("routes[{i}].device"), dev)?;
        }
    }
    for (i, n) in config.neighbors.iter().enumerate() {
        device(&devices, &format!("neighbors[{i}].device"), &n.device)?;
    }
    Ok(Plan {
        links: planned,
        devices,
    })
}

fn device(devices: &HashMap<String, u32>, field: &str, name: &str) -> Result<u32, NetError> {
    devices.get(name).copied().ok_or_else(|| {
        NetError::invalid(
            field,
            format!("{name:?} is neither a configured interface nor an existing link"),
        )
    })
}

/// `name mac` of the links that have a MAC, for an error message (at most 32).
fn present(links: &[Link]) -> String {
    let with_mac: Vec<String> = links
        .iter()
        .filter_map(|l| l.mac.map(|m| format!("{} {m}", l.name)))
        .collect();
    if with_mac.is_empty() {
        return "none".into();
    }
    let mut s = with_mac
        .iter()
        .take(32)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if with_mac.len() > 32 {
        s.push_str(", ...");
    }
    s
}

#[cfg(test)]
mod tests {
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
}

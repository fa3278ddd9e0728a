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
mod tests;

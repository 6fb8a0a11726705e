//! The SSRF guard: which destination addresses a webhook may be sent to.
//!
//! Callback URLs are typed in by customers, so a sender must not let them
//! reach the sender's own network. The guard resolves a host once, refuses it
//! if *any* address is non-public, and hands only the vetted addresses to the
//! HTTP client, which connects to them without a second lookup (so a DNS
//! answer cannot change between the check and the connection). IP literals
//! in URLs are checked before the request (the URL parser has already turned
//! decimal, octal and hex IPv4 spellings into plain addresses).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// Why an address is not public.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Reserved {
    Unspecified,
    Loopback,
    Private,
    LinkLocal,
    UniqueLocal,
    Multicast,
    Broadcast,
    Documentation,
    SharedCgnat,
    Metadata,
    Benchmarking,
    Reserved,
}

impl std::fmt::Display for Reserved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Reserved::Unspecified => "unspecified",
            Reserved::Loopback => "loopback",
            Reserved::Private => "private",
            Reserved::LinkLocal => "link-local",
            Reserved::UniqueLocal => "unique-local",
            Reserved::Multicast => "multicast",
            Reserved::Broadcast => "broadcast",
            Reserved::Documentation => "documentation",
            Reserved::SharedCgnat => "shared (CGNAT)",
            Reserved::Metadata => "cloud metadata",
            Reserved::Benchmarking => "benchmarking",
            Reserved::Reserved => "reserved",
        };
        f.write_str(s)
    }
}

/// Classifies an address: `None` for a public one.
pub fn classify(ip: IpAddr) -> Option<Reserved> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Reserved> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, _, _) => Reserved::Unspecified,
        (127, _, _) => Reserved::Loopback,
        (10, _, _) | (172, 16..=31, _) | (192, 168, _) => Reserved::Private,
        (169, 254, 169) if ip.octets()[3] == 254 => Reserved::Metadata,
        (169, 254, _) => Reserved::LinkLocal,
        (100, 64..=127, _) => Reserved::SharedCgnat,
        (192, 0, 0) => Reserved::Reserved,
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => Reserved::Documentation,
        (198, 18..=19, _) => Reserved::Benchmarking,
        (224..=239, _, _) => Reserved::Multicast,
        _ if ip == Ipv4Addr::BROADCAST => Reserved::Broadcast,
        (240..=255, _, _) => Reserved::Reserved,
        _ => return None,
    })
}

fn classify_v6(ip: Ipv6Addr) -> Option<Reserved> {
    let seg = ip.segments();
    let embedded = |hi: usize| {
        Ipv4Addr::new(
            (seg[hi] >> 8) as u8,
            seg[hi] as u8,
            (seg[hi + 1] >> 8) as u8,
            seg[hi + 1] as u8,
        )
    };
    if ip.is_unspecified() {
        return Some(Reserved::Unspecified);
    }
    if ip.is_loopback() {
        return Some(Reserved::Loopback);
    }
    match seg {
        // IPv4-mapped ::ffff:a.b.c.d and IPv4-compatible ::a.b.c.d.
        [0, 0, 0, 0, 0, 0xffff, _, _] => return classify_v4(embedded(6)),
        // IPv4-compatible ::a.b.c.d is deprecated and never routed.
        [0, 0, 0, 0, 0, 0, _, _] => return Some(classify_v4(embedded(6)).unwrap_or(Reserved::Reserved)),
        // NAT64 well-known prefix 64:ff9b::/96: the IPv4 address is in the low 32 bits.
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => return classify_v4(embedded(6)),
        // Local-use NAT64 64:ff9b:1::/48.
        [0x64, 0xff9b, 1, ..] => return Some(Reserved::Private),
        // 6to4 2002:AABB:CCDD::/48 embeds an IPv4 address.
        [0x2002, ..] => return classify_v4(embedded(1)),
        // Teredo 2001:0::/32 hides the client address: never a webhook receiver.
        [0x2001, 0, ..] => return Some(Reserved::Reserved),
        // Documentation 2001:db8::/32 and 3fff::/20.
        [0x2001, 0xdb8, ..] => return Some(Reserved::Documentation),
        [s, ..] if s & 0xfff0 == 0x3ff0 => return Some(Reserved::Documentation),
        // Discard-only 100::/64.
        [0x100, 0, 0, 0, ..] => return Some(Reserved::Reserved),
        // Benchmarking 2001:2::/48.
        [0x2001, 2, 0, ..] => return Some(Reserved::Benchmarking),
        _ => {}
    }
    let first = seg[0];
    if first & 0xffc0 == 0xfe80 {
        Some(Reserved::LinkLocal)
    } else if first & 0xffc0 == 0xfec0 {
        // Deprecated site-local: treated as private.
        Some(Reserved::Private)
    } else if first & 0xfe00 == 0xfc00 {
        // fc00::/7, which holds AWS's metadata address fd00:ec2::254.
        if seg == [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254] {
            Some(Reserved::Metadata)
        } else {
            Some(Reserved::UniqueLocal)
        }
    } else if first & 0xff00 == 0xff00 {
        Some(Reserved::Multicast)
    } else if first & 0xe000 != 0x2000 {
        // Outside 2000::/3, the only global unicast space allocated.
        Some(Reserved::Reserved)
    } else {
        None
    }
}

/// Which destinations are allowed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetworkPolicy {
    /// Allow every address (development and tests only).
    pub allow_private: bool,
    /// Networks allowed even though they are not public.
    pub allow: Vec<IpNet>,
}

/// A destination the guard refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "destination {host} resolves to {addr}, a {reason} address, which the SSRF guard refuses; \
     to allow it set POSTBOX_ALLOWED_NETWORKS={addr}/{bits} (or a wider CIDR), or \
     POSTBOX_ALLOW_PRIVATE_NETWORKS=true to turn the guard off (development only)",
    bits = if addr.is_ipv4() { 32 } else { 128 }
)]
pub struct Blocked {
    /// The host in the URL.
    pub host: String,
    /// The refused address.
    pub addr: IpAddr,
    /// Why it is refused.
    pub reason: Reserved,
}

impl NetworkPolicy {
    /// Checks one address of `host`.
    pub fn check(&self, host: &str, addr: IpAddr) -> Result<(), Blocked> {
        if self.allow_private || self.allow.iter().any(|n| n.contains(&addr)) {
            return Ok(());
        }
        match classify(addr) {
            None => Ok(()),
            Some(reason) => Err(Blocked {
                host: host.to_owned(),
                addr,
                reason,
            }),
        }
    }
}

/// The HTTP client's DNS resolver: resolves once and passes on the
/// addresses only if every one of them is allowed.
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    policy: Arc<NetworkPolicy>,
}

impl GuardedResolver {
    /// A resolver that enforces `policy`.
    pub fn new(policy: Arc<NetworkPolicy>) -> Self {
        GuardedResolver { policy }
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            for a in &addrs {
                policy.check(&host, a.ip())?;
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(s: &str) -> Option<Reserved> {
        classify(s.parse().unwrap())
    }

    #[test]
    fn address_table() {
        let table: &[(&str, Option<Reserved>)] = &[
            ("8.8.8.8", None),
            ("1.1.1.1", None),
            ("93.184.216.34", None),
            ("0.0.0.0", Some(Reserved::Unspecified)),
            ("127.0.0.1", Some(Reserved::Loopback)),
            ("127.255.255.254", Some(Reserved::Loopback)),
            ("10.1.2.3", Some(Reserved::Private)),
            ("172.16.0.1", Some(Reserved::Private)),
            ("172.31.255.255", Some(Reserved::Private)),
            ("172.32.0.1", None),
            ("192.168.1.1", Some(Reserved::Private)),
            ("169.254.169.254", Some(Reserved::Metadata)),
            ("169.254.1.1", Some(Reserved::LinkLocal)),
            ("100.64.0.1", Some(Reserved::SharedCgnat)),
            ("100.128.0.1", None),
            ("192.0.2.1", Some(Reserved::Documentation)),
            ("198.51.100.7", Some(Reserved::Documentation)),
            ("203.0.113.9", Some(Reserved::Documentation)),
            ("198.18.0.1", Some(Reserved::Benchmarking)),
            ("224.0.0.1", Some(Reserved::Multicast)),
            ("255.255.255.255", Some(Reserved::Broadcast)),
            ("240.0.0.1", Some(Reserved::Reserved)),
            ("2606:4700:4700::1111", None),
            ("::", Some(Reserved::Unspecified)),
            ("::1", Some(Reserved::Loopback)),
            ("fe80::1", Some(Reserved::LinkLocal)),
            ("fc00::1", Some(Reserved::UniqueLocal)),
            ("fd12:3456::1", Some(Reserved::UniqueLocal)),
            ("fd00:ec2::254", Some(Reserved::Metadata)),
            ("ff02::1", Some(Reserved::Multicast)),
            ("2001:db8::1", Some(Reserved::Documentation)),
            ("::ffff:127.0.0.1", Some(Reserved::Loopback)),
            ("::ffff:169.254.169.254", Some(Reserved::Metadata)),
            ("::ffff:8.8.8.8", None),
            ("::127.0.0.1", Some(Reserved::Loopback)),
            ("::10.0.0.1", Some(Reserved::Private)),
            ("64:ff9b::7f00:1", Some(Reserved::Loopback)),
            ("64:ff9b::a9fe:a9fe", Some(Reserved::Metadata)),
            ("64:ff9b::808:808", None),
            ("2002:7f00:1::", Some(Reserved::Loopback)),
            ("2002:c0a8:101::1", Some(Reserved::Private)),
            ("2002:808:808::1", None),
            ("2001:0:4136:e378::1", Some(Reserved::Reserved)),
            ("fec0::1", Some(Reserved::Private)),
        ];
        for (addr, want) in table {
            assert_eq!(reason(addr), *want, "{addr}");
        }
    }

    #[test]
    fn url_parser_normalises_odd_ipv4_spellings() {
        for url in [
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://127.1/",
        ] {
            let u = reqwest::Url::parse(url).unwrap();
            match u.host() {
                Some(url::Host::Ipv4(ip)) => assert_eq!(classify(IpAddr::V4(ip)), Some(Reserved::Loopback), "{url}"),
                other => panic!("{url} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn policy_allows_listed_networks_only() {
        let p = NetworkPolicy {
            allow_private: false,
            allow: vec!["10.0.0.0/8".parse().unwrap()],
        };
        assert!(p.check("a", "10.9.9.9".parse().unwrap()).is_ok());
        let e = p.check("a", "192.168.0.1".parse().unwrap()).unwrap_err();
        assert_eq!(e.reason, Reserved::Private);
        let open = NetworkPolicy {
            allow_private: true,
            allow: vec![],
        };
        assert!(open.check("a", "127.0.0.1".parse().unwrap()).is_ok());
    }
}

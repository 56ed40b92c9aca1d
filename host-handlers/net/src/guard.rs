//! The upstream address guard (DESIGN.md invariant 3): connections made on a
//! guest's behalf never go to loopback, link-local (incl. cloud metadata at
//! 169.254.169.254), private, shared (CGNAT), multicast, unspecified or reserved
//! addresses, nor to any address the host itself owns, unless the configuration
//! names the network. The same check drops such addresses from DNS answers
//! (rebinding defence) and is applied again to the address actually dialled.
//!
//! IPv6 forms that embed an IPv4 address (mapped, NAT64, 6to4) are judged by the
//! embedded address, so `::ffff:127.0.0.1` is loopback. The local-use NAT64
//! prefix `64:ff9b:1::/48` (RFC 8215) is refused whatever it embeds: its
//! translators lead into the site's own networks. Documentation ranges
//! (TEST-NET-1/2/3, `2001:db8::/32`) are refused as reserved.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::IpNet;

/// How long the list of the host's own addresses is reused before it is read again.
const HOST_ADDRS_REFRESH: Duration = Duration::from_secs(5);

/// Why an address was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Unspecified,
    Loopback,
    LinkLocal,
    Private,
    Multicast,
    Reserved,
    HostOwned,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Unspecified => "unspecified",
            Refusal::Loopback => "loopback",
            Refusal::LinkLocal => "link-local",
            Refusal::Private => "private",
            Refusal::Multicast => "multicast",
            Refusal::Reserved => "reserved",
            Refusal::HostOwned => "host-owned",
        })
    }
}

/// Decides which addresses a guest may reach.
#[derive(Debug)]
pub struct AddressGuard {
    allowed: Vec<IpNet>,
    host_addrs: Mutex<Option<(Instant, Vec<IpAddr>)>>,
}

impl AddressGuard {
    /// A guard that lets through the `allowed` networks in addition to public addresses.
    pub fn new(allowed: Vec<IpNet>) -> Self {
        Self { allowed, host_addrs: Mutex::new(None) }
    }

    /// `Ok` if a guest may reach `ip`.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        let ip = ip.to_canonical();
        if self.allowed.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        if let Some(refusal) = classify(ip) {
            return Err(refusal);
        }
        if self.host_owned(ip) {
            return Err(Refusal::HostOwned);
        }
        Ok(())
    }

    fn host_owned(&self, ip: IpAddr) -> bool {
        let mut cache = match self.host_addrs.lock() {
            Ok(cache) => cache,
            Err(poisoned) => poisoned.into_inner(),
        };
        let fresh = matches!(&*cache, Some((at, _)) if at.elapsed() < HOST_ADDRS_REFRESH);
        if !fresh {
            *cache = Some((Instant::now(), host_addresses()));
        }
        cache.as_ref().is_some_and(|(_, addrs)| addrs.contains(&ip))
    }
}

/// The addresses configured on the host's interfaces.
fn host_addresses() -> Vec<IpAddr> {
    match nix::ifaddrs::getifaddrs() {
        Ok(ifaddrs) => ifaddrs
            .filter_map(|ifa| ifa.address)
            .filter_map(|addr| {
                if let Some(v4) = addr.as_sockaddr_in() {
                    Some(IpAddr::V4(v4.ip()))
                } else {
                    addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                }
            })
            .collect(),
        Err(err) => {
            tracing::warn!(%err, "cannot list the host's addresses; only fixed ranges are refused");
            Vec::new()
        }
    }
}

/// The fixed ranges a guest may never reach by default.
fn classify(ip: IpAddr) -> Option<Refusal> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Refusal> {
    let [a, b, ..] = ip.octets();
    if a == 0 {
        Some(Refusal::Unspecified)
    } else if ip.is_loopback() {
        Some(Refusal::Loopback)
    } else if ip.is_link_local() {
        Some(Refusal::LinkLocal)
    } else if ip.is_private() || (a == 100 && (64..128).contains(&b)) || (a == 192 && b == 0 && ip.octets()[2] == 0) {
        // RFC 1918, RFC 6598 shared address space, RFC 6890 IETF protocol assignments.
        Some(Refusal::Private)
    } else if ip.is_multicast() {
        Some(Refusal::Multicast)
    } else if a >= 240 || (a == 198 && (b == 18 || b == 19)) || is_documentation_v4(ip) {
        // 240/4 reserved and broadcast, 198.18/15 benchmarking, RFC 5737 TEST-NETs.
        Some(Refusal::Reserved)
    } else {
        None
    }
}

fn classify_v6(ip: Ipv6Addr) -> Option<Refusal> {
    let seg = ip.segments();
    if ip.is_unspecified() {
        Some(Refusal::Unspecified)
    } else if ip.is_loopback() {
        Some(Refusal::Loopback)
    } else if seg[..3] == [0x64, 0xff9b, 1] {
        // RFC 8215 local-use NAT64: translated by the site's own translators,
        // to whatever IPv4 network they serve.
        Some(Refusal::Private)
    } else if let Some(v4) = embedded_v4(ip) {
        classify_v4(v4)
    } else if seg[0] & 0xffc0 == 0xfe80 {
        Some(Refusal::LinkLocal)
    } else if seg[0] & 0xfe00 == 0xfc00 || seg[0] & 0xffc0 == 0xfec0 {
        // Unique local addresses and deprecated site-local ones.
        Some(Refusal::Private)
    } else if ip.is_multicast() {
        Some(Refusal::Multicast)
    } else if seg[..4] == [0x100, 0, 0, 0] || seg[..2] == [0x2001, 0xdb8] {
        // Discard-only and documentation prefixes.
        Some(Refusal::Reserved)
    } else {
        None
    }
}

/// RFC 5737 documentation ranges: TEST-NET-1, -2 and -3.
fn is_documentation_v4(ip: Ipv4Addr) -> bool {
    matches!(ip.octets(), [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _])
}

/// The IPv4 address carried by IPv4-compatible, NAT64 (64:ff9b::/96) and
/// 6to4 (2002::/16) addresses. (Mapped addresses were canonicalised before.)
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let seg = ip.segments();
    let o = ip.octets();
    if seg[..6] == [0, 0, 0, 0, 0, 0] || seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
    } else if seg[0] == 0x2002 {
        Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(guard: &AddressGuard, ip: &str) -> Result<(), Refusal> {
        guard.check(ip.parse().unwrap())
    }

    #[test]
    fn refuses_internal_ranges_by_default() {
        let guard = AddressGuard::new(Vec::new());
        let cases = [
            ("0.0.0.0", Refusal::Unspecified),
            ("0.1.2.3", Refusal::Unspecified),
            ("127.0.0.1", Refusal::Loopback),
            ("127.255.0.9", Refusal::Loopback),
            ("169.254.169.254", Refusal::LinkLocal),
            ("10.1.2.3", Refusal::Private),
            ("172.16.0.1", Refusal::Private),
            ("172.31.255.255", Refusal::Private),
            ("192.168.1.1", Refusal::Private),
            ("100.64.0.1", Refusal::Private),
            ("192.0.0.170", Refusal::Private),
            ("224.0.0.1", Refusal::Multicast),
            ("255.255.255.255", Refusal::Reserved),
            ("198.18.0.1", Refusal::Reserved),
            ("::", Refusal::Unspecified),
            ("::1", Refusal::Loopback),
            ("::ffff:127.0.0.1", Refusal::Loopback),
            ("::ffff:169.254.169.254", Refusal::LinkLocal),
            ("::127.0.0.1", Refusal::Loopback),
            ("64:ff9b::10.0.0.1", Refusal::Private),
            ("2002:a9fe:a9fe::1", Refusal::LinkLocal),
            ("fe80::1", Refusal::LinkLocal),
            ("fd00::1", Refusal::Private),
            ("fec0::1", Refusal::Private),
            ("ff02::1", Refusal::Multicast),
            ("2001:db8::1", Refusal::Reserved),
        ];
        for (ip, refusal) in cases {
            assert_eq!(check(&guard, ip), Err(refusal), "{ip}");
        }
    }

    #[test]
    fn nat64_local_use_and_test_nets_are_refused() {
        let guard = AddressGuard::new(Vec::new());
        let cases = [
            ("64:ff9b:1::8.8.8.8", Refusal::Private),
            ("64:ff9b:1:ffff::1", Refusal::Private),
            ("192.0.2.10", Refusal::Reserved),
            ("198.51.100.7", Refusal::Reserved),
            ("203.0.113.200", Refusal::Reserved),
            ("::ffff:203.0.113.1", Refusal::Reserved),
            ("64:ff9b::192.0.2.1", Refusal::Reserved),
            ("2001:db8:ffff::1", Refusal::Reserved),
        ];
        for (ip, refusal) in cases {
            assert_eq!(check(&guard, ip), Err(refusal), "{ip}");
        }
        // The neighbours of those ranges stay public.
        for ip in ["192.0.3.1", "198.51.101.1", "203.0.114.1", "64:ff9b:2::1", "2001:db9::1"] {
            assert_eq!(check(&guard, ip), Ok(()), "{ip}");
        }
    }

    #[test]
    fn public_addresses_pass() {
        let guard = AddressGuard::new(Vec::new());
        for ip in ["93.184.216.34", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "64:ff9b::8.8.8.8"] {
            assert_eq!(check(&guard, ip), Ok(()), "{ip}");
        }
    }

    #[test]
    fn configured_networks_are_allowed() {
        let guard = AddressGuard::new(vec!["127.0.0.1/32".parse().unwrap(), "10.0.0.0/8".parse().unwrap()]);
        assert_eq!(check(&guard, "127.0.0.1"), Ok(()));
        assert_eq!(check(&guard, "::ffff:127.0.0.1"), Ok(()));
        assert_eq!(check(&guard, "10.9.9.9"), Ok(()));
        assert_eq!(check(&guard, "127.0.0.2"), Err(Refusal::Loopback));
        assert_eq!(check(&guard, "169.254.169.254"), Err(Refusal::LinkLocal));
    }

    #[test]
    fn host_owned_addresses_are_refused() {
        let guard = AddressGuard::new(Vec::new());
        let public_own = host_addresses().into_iter().find(|ip| classify(*ip).is_none());
        if let Some(ip) = public_own {
            assert_eq!(guard.check(ip), Err(Refusal::HostOwned), "{ip}");
        }
        assert!(host_addresses().iter().any(IpAddr::is_loopback));
    }
}

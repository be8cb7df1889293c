//! Client addresses reduced to the prefixes that failures are counted under.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// How addresses are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixPolicy {
    pub ipv4: u8,
    pub ipv6: u8,
    pub ipv6_wide: u8,
}

impl PrefixPolicy {
    /// The prefix an address is counted under (IPv4-mapped IPv6 counts as IPv4).
    pub fn key(&self, ip: IpAddr) -> IpNet {
        match ip.to_canonical() {
            IpAddr::V4(v4) => IpNet::V4(Ipv4Net::new_assert(v4, self.ipv4).trunc()),
            IpAddr::V6(v6) => IpNet::V6(Ipv6Net::new_assert(v6, self.ipv6).trunc()),
        }
    }

    /// The coarse bucket for IPv6 (e.g. /48), which has its own, larger budget.
    pub fn wide_key(&self, ip: IpAddr) -> Option<IpNet> {
        match ip.to_canonical() {
            IpAddr::V4(_) => None,
            IpAddr::V6(v6) => Some(IpNet::V6(Ipv6Net::new_assert(v6, self.ipv6_wide).trunc())),
        }
    }
}

/// Whether `ip` lies in any of `nets`.
pub fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: PrefixPolicy = PrefixPolicy { ipv4: 32, ipv6: 64, ipv6_wide: 48 };

    #[test]
    fn keys() {
        assert_eq!(POLICY.key("192.0.2.7".parse().unwrap()).to_string(), "192.0.2.7/32");
        assert_eq!(POLICY.key("::ffff:192.0.2.7".parse().unwrap()).to_string(), "192.0.2.7/32");
        assert_eq!(POLICY.key("2001:db8:1:2:3:4:5:6".parse().unwrap()).to_string(), "2001:db8:1:2::/64");
        assert_eq!(POLICY.wide_key("2001:db8:1:2:3:4:5:6".parse().unwrap()).unwrap().to_string(), "2001:db8:1::/48");
        assert_eq!(POLICY.wide_key("192.0.2.7".parse().unwrap()), None);
        let v4_24 = PrefixPolicy { ipv4: 24, ..POLICY };
        assert_eq!(v4_24.key("192.0.2.7".parse().unwrap()).to_string(), "192.0.2.0/24");
    }

    #[test]
    fn membership() {
        let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "2001:db8::/32".parse().unwrap()];
        assert!(contains(&nets, "10.1.2.3".parse().unwrap()));
        assert!(contains(&nets, "::ffff:10.1.2.3".parse().unwrap()));
        assert!(contains(&nets, "2001:db8::1".parse().unwrap()));
        assert!(!contains(&nets, "192.0.2.1".parse().unwrap()));
    }
}

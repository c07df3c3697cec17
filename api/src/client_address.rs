//! The client address of a request: the one function every limit keyed by address uses (login
//! and registration rate limits, connection caps).
//!
//! A request is attributed to its TCP peer, unless the peer is a trusted proxy
//! (`TRUSTED_PROXIES`): then to the nearest address in the forwarding chain that is not a
//! trusted proxy, read from `Forwarded` (RFC 7239) or, without it, `X-Forwarded-For`. Entries
//! are read from the right (the nearest hop) because only the hops our own proxies appended are
//! believable; whatever a client put at the left end is not. IPv6 addresses are grouped by /64
//! (one subscriber usually holds a whole /64), IPv4-mapped IPv6 addresses count as IPv4.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::HeaderMap;
use axum::http::request::Parts;
use ipnet::IpNet;

use crate::app::AppState;
use crate::error::ApiError;

/// The address a request is attributed to, already grouped: the key of every per-address limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientAddress(IpAddr);

impl ClientAddress {
    /// The group `ip` belongs to: itself for IPv4, its /64 for IPv6.
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let network = u128::from(v6) & !((1u128 << 64) - 1);
                Self(IpAddr::V6(Ipv6Addr::from(network)))
            }
        }
    }

    /// The address a request from `peer` with `headers` is attributed to.
    pub fn resolve(peer: SocketAddr, headers: &HeaderMap, trusted_proxies: &[IpNet]) -> Self {
        Self::of(client_ip(peer.ip(), headers, trusted_proxies))
    }

    pub fn ip(self) -> IpAddr {
        self.0
    }
}

/// `TRUSTED_PROXIES`: comma-separated CIDRs or bare addresses; empty means none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn as_slice(&self) -> &[IpNet] {
        &self.0
    }
}

impl std::str::FromStr for TrustedProxies {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{entry:?} is neither a CIDR (10.0.0.0/8) nor an IP address"))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

pub fn is_trusted(ip: IpAddr, trusted_proxies: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    trusted_proxies.iter().any(|net| net.contains(&ip))
}

/// The nearest untrusted address of the chain `client, proxy1, …, peer`.
fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted_proxies: &[IpNet]) -> IpAddr {
    if !is_trusted(peer, trusted_proxies) {
        return peer;
    }
    let chain = forwarded_for(headers).or_else(|| x_forwarded_for(headers));
    let Some(chain) = chain else { return peer };
    let mut nearest = peer;
    for hop in chain.into_iter().rev() {
        match hop {
            // An obfuscated or unknown hop: nothing further left can be believed.
            None => return nearest,
            Some(ip) => {
                nearest = ip;
                if !is_trusted(ip, trusted_proxies) {
                    return ip;
                }
            }
        }
    }
    nearest
}

/// The `for=` hops of every `Forwarded` header, in order; `None` for a hop that is not an
/// address. `None` overall without the header.
fn forwarded_for(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    let mut hops = Vec::new();
    let mut seen = false;
    for value in headers.get_all(axum::http::header::FORWARDED) {
        seen = true;
        let Ok(value) = value.to_str() else {
            hops.push(None);
            continue;
        };
        for element in value.split(',') {
            let node = element
                .split(';')
                .filter_map(|pair| pair.split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("for"))
                .map(|(_, node)| node.trim().trim_matches('"'));
            if let Some(node) = node {
                hops.push(parse_node(node));
            }
        }
    }
    seen.then_some(hops)
}

fn x_forwarded_for(headers: &HeaderMap) -> Option<Vec<Option<IpAddr>>> {
    let mut hops = Vec::new();
    let mut seen = false;
    for value in headers.get_all("x-forwarded-for") {
        seen = true;
        let Ok(value) = value.to_str() else {
            hops.push(None);
            continue;
        };
        hops.extend(value.split(',').map(|hop| parse_node(hop.trim())));
    }
    seen.then_some(hops)
}

/// `192.0.2.1`, `192.0.2.1:8080`, `[2001:db8::1]`, `[2001:db8::1]:8080` or `2001:db8::1`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    node.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')).and_then(|ip| ip.parse().ok())
}

impl FromRequestParts<AppState> for ClientAddress {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let ConnectInfo(peer) = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .copied()
            .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("the server gave the request no peer address")))?;
        Ok(Self::resolve(peer, &parts.headers, state.config.trusted_proxies.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
        }
        h
    }

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 40000)
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn resolved(p: &str, h: &[(&str, &str)], trusted: &[&str]) -> String {
        ClientAddress::resolve(peer(p), &headers(h), &nets(trusted)).ip().to_string()
    }

    #[test]
    fn forwarded_headers_of_an_untrusted_peer_are_ignored() {
        assert_eq!(resolved("203.0.113.9", &[("x-forwarded-for", "198.51.100.1")], &[]), "203.0.113.9");
        assert_eq!(resolved("203.0.113.9", &[("forwarded", "for=198.51.100.1")], &["10.0.0.0/8"]), "203.0.113.9");
    }

    #[test]
    fn a_trusted_proxy_hands_over_the_nearest_untrusted_hop() {
        let trusted = ["10.0.0.0/8"];
        // The client wrote a fake left-most entry; our proxies appended the rest.
        let xff = [("x-forwarded-for", "1.2.3.4, 198.51.100.7, 10.0.0.3")];
        assert_eq!(resolved("10.0.0.2", &xff, &trusted), "198.51.100.7");
        let fwd = [("forwarded", "for=1.2.3.4, for=\"198.51.100.7:4711\";proto=https, for=10.0.0.3")];
        assert_eq!(resolved("10.0.0.2", &fwd, &trusted), "198.51.100.7");
        let v6 = [("forwarded", "for=\"[2001:db8:cafe::17]:4711\"")];
        assert_eq!(resolved("10.0.0.2", &v6, &trusted), "2001:db8:cafe::");
        // Without a header, or with only trusted hops, the request is the proxy's own.
        assert_eq!(resolved("10.0.0.2", &[], &trusted), "10.0.0.2");
        assert_eq!(resolved("10.0.0.2", &[("x-forwarded-for", "10.0.0.5")], &trusted), "10.0.0.5");
        // An obfuscated hop stops the walk at the nearest address believed so far.
        assert_eq!(resolved("10.0.0.2", &[("forwarded", "for=198.51.100.7, for=_hidden")], &trusted), "10.0.0.2");
        // Forwarded wins over X-Forwarded-For.
        let both = [("forwarded", "for=198.51.100.7"), ("x-forwarded-for", "198.51.100.8")];
        assert_eq!(resolved("10.0.0.2", &both, &trusted), "198.51.100.7");
    }

    #[test]
    fn the_trusted_proxy_list_takes_cidrs_and_addresses_and_may_be_empty() {
        let parsed: TrustedProxies = " 10.0.0.0/8, 192.0.2.7 ,fd00::/8".parse().unwrap();
        assert_eq!(parsed.as_slice(), nets(&["10.0.0.0/8", "192.0.2.7/32", "fd00::/8"]));
        assert_eq!("".parse::<TrustedProxies>().unwrap(), TrustedProxies::default());
        assert!("10.0.0.0/33".parse::<TrustedProxies>().is_err());
        assert!("proxy.internal".parse::<TrustedProxies>().is_err());
    }

    #[test]
    fn ipv6_addresses_are_grouped_by_their_64_and_mapped_ipv4_is_ipv4() {
        let a = ClientAddress::of("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = ClientAddress::of("2001:db8:1:2:bbbb::9".parse().unwrap());
        let c = ClientAddress::of("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(ClientAddress::of("::ffff:192.0.2.1".parse().unwrap()).ip().to_string(), "192.0.2.1");
        assert!(is_trusted("::ffff:10.1.2.3".parse().unwrap(), &nets(&["10.0.0.0/8"])));
    }
}

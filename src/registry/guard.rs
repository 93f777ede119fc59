//! The network policy against server-side request forgery: a mirror fetches what strangers name, so
//! in the service every connection must reach a public address, unless its host is one the operator
//! named (an allow-listed source or the target). Checked for IP literals before each request (and
//! each redirect hop) and for host names at resolution, on every address they resolve to, so DNS
//! rebinding does not help.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

/// Which addresses connections may reach.
#[derive(Debug, Clone, Default)]
pub struct NetworkPolicy {
    /// Refuse non-public addresses (loopback, private, link-local, CGNAT, unique-local, …).
    pub public_only: bool,
    /// Hosts (names or IP literals, lowercase, without port) exempt from the rule.
    pub trusted_hosts: HashSet<String>,
    /// The HTTP(S) proxies requests go through; with `public_only`, through the pinning relay.
    pub proxy: super::proxy::ProxyConfig,
}

/// A connection the policy refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "refused to connect to {host} ({addr}): it is not a public address; allow-list the registry explicitly to reach it"
)]
pub struct Refused {
    /// The host asked for.
    pub host: String,
    /// The address it is or resolves to.
    pub addr: IpAddr,
}

/// Whether `ip` is a public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link local fe80::/10
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x0064 && s[1] == 0xff9b) // NAT64 to any v4, private included
                || s[0] == 0x2002) // 6to4, which embeds any v4
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // CGNAT 100.64.0.0/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18.0.0/15
        || o[0] >= 240) // reserved
}

impl NetworkPolicy {
    /// No restriction (the `copy` command: its user names the registries).
    pub fn permissive() -> Self {
        NetworkPolicy::default()
    }

    /// Public addresses only, except for `trusted` hosts (`host` or `host:port`).
    pub fn public_only(trusted: impl IntoIterator<Item = String>) -> Self {
        NetworkPolicy {
            public_only: true,
            trusted_hosts: trusted
                .into_iter()
                .map(|h| strip_port(&h).to_ascii_lowercase())
                .collect(),
            proxy: Default::default(),
        }
    }

    /// The same policy, with requests going through `proxy`.
    pub fn with_proxy(mut self, proxy: super::proxy::ProxyConfig) -> Self {
        self.proxy = proxy;
        self
    }

    /// [`NetworkPolicy::check_url`], and for a name that a proxy would resolve (so the resolver
    /// never sees it), resolves it here and checks every address: the refusal then names the
    /// host. (The relay checks again when it connects, and connects to the checked address.)
    pub async fn check_before_sending(&self, url: &url::Url) -> Result<(), Refused> {
        self.check_url(url)?;
        if !self.public_only || !self.proxy.proxies(url) {
            return Ok(());
        }
        if let Some(url::Host::Domain(name)) = url.host()
            && !self.trusted(name)
        {
            let port = url.port_or_known_default().unwrap_or(443);
            if let Err(super::proxy::PinError::Refused(r)) =
                super::proxy::pin(self, name, port).await
            {
                return Err(r);
            }
        }
        Ok(())
    }

    pub(crate) fn trusted(&self, host: &str) -> bool {
        !self.public_only || self.trusted_hosts.contains(&host.to_ascii_lowercase())
    }

    /// Checks a URL's host when it is an IP literal (names are checked at resolution).
    pub fn check_url(&self, url: &url::Url) -> Result<(), Refused> {
        let ip = match url.host() {
            Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => return Ok(()),
        };
        let host = url
            .host_str()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_string();
        if self.trusted(&host) || self.trusted(url.host_str().unwrap_or_default()) || is_public(ip)
        {
            Ok(())
        } else {
            Err(Refused { host, addr: ip })
        }
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The resolver behind the HTTP client: resolves, then refuses if any address is not allowed.
pub struct GuardedResolver(pub Arc<NetworkPolicy>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !policy.trusted(&host)
                && let Some(bad) = addrs.iter().find(|a| !is_public(a.ip()))
            {
                return Err(Box::new(Refused {
                    host,
                    addr: bad.ip(),
                })
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Whether `err` (anywhere in its chain) is a policy refusal.
pub fn is_refusal(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<Refused>().is_some() {
            return true;
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_special_addresses_are_not_public() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "::",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a}");
        }
        for a in [
            "8.8.8.8",
            "140.82.112.3",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn ip_literals_are_checked_and_trusted_hosts_pass() {
        let p = NetworkPolicy::public_only(["127.0.0.1:5000".to_string()]);
        let ok = |u: &str| p.check_url(&url::Url::parse(u).unwrap()).is_ok();
        assert!(ok("http://127.0.0.1:5000/v2/"));
        assert!(ok("http://127.0.0.1:6000/v2/"), "trust is by host");
        assert!(!ok("http://169.254.169.254/latest/meta-data/"));
        assert!(!ok("http://[::ffff:10.0.0.1]/x"));
        assert!(!ok("http://10.0.0.1:5000/v2/"));
        assert!(
            ok("https://registry.example/v2/"),
            "names are checked when resolved"
        );
        assert!(
            NetworkPolicy::permissive()
                .check_url(&url::Url::parse("http://10.0.0.1/").unwrap())
                .is_ok()
        );
    }
}

//! HTTP(S) proxies: `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` (either case, as curl
//! reads them) for every request to registries and token servers.
//!
//! Through a proxy the proxy resolves the destination's name, so the network policy
//! ([`super::guard`]) would never see where a name points. When the policy restricts addresses
//! (`serve`), requests therefore go to a relay inside the process that resolves the destination
//! itself, checks every address, and asks the real proxy to connect to the checked address
//! (`CONNECT 203.0.113.7:443`; for plain HTTP, the request line names the address and `Host`
//! keeps the name): what the policy checked is what is reached. TLS inside the tunnel still
//! verifies the certificate against the name. The proxy's own address is the operator's choice and
//! is not checked; hosts the operator named (the target, exact allow-listed sources) are passed
//! on by name.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::client::proxy::matcher::Matcher;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::guard::{NetworkPolicy, Refused, is_public};

/// Which proxy serves which request, from the environment (or set by tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Proxy for `http://` requests.
    pub http: Option<String>,
    /// Proxy for `https://` requests.
    pub https: Option<String>,
    /// Proxy for both when the specific one is unset.
    pub all: Option<String>,
    /// Hosts, domains and networks reached directly (`NO_PROXY` syntax).
    pub no: Option<String>,
}

impl ProxyConfig {
    /// `HTTP_PROXY`/`http_proxy`, `HTTPS_PROXY`/`https_proxy`, `ALL_PROXY`/`all_proxy`,
    /// `NO_PROXY`/`no_proxy` (the upper-case one first; empty counts as unset).
    pub fn from_env() -> ProxyConfig {
        let var = |names: [&str; 2]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
        };
        ProxyConfig {
            http: var(["HTTP_PROXY", "http_proxy"]),
            https: var(["HTTPS_PROXY", "https_proxy"]),
            all: var(["ALL_PROXY", "all_proxy"]),
            no: var(["NO_PROXY", "no_proxy"]),
        }
    }

    /// Whether any proxy is set.
    pub fn is_set(&self) -> bool {
        self.http.is_some() || self.https.is_some() || self.all.is_some()
    }

    /// Checks the proxy URLs: one line naming the variable when one is not a URL.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("HTTP_PROXY", &self.http),
            ("HTTPS_PROXY", &self.https),
            ("ALL_PROXY", &self.all),
        ] {
            let Some(v) = v else { continue };
            let with_scheme = if v.contains("://") {
                v.clone()
            } else {
                format!("http://{v}")
            };
            match url::Url::parse(&with_scheme) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
                Ok(u) if u.scheme().starts_with("socks") => {
                    return Err(format!(
                        "{name} is a SOCKS proxy ({}); only HTTP proxies are supported",
                        u.scheme()
                    ));
                }
                _ => {
                    return Err(format!(
                        "{name} is not a proxy URL such as http://proxy.example:3128"
                    ));
                }
            }
        }
        Ok(())
    }

    fn matcher(&self) -> Matcher {
        let mut b = Matcher::builder();
        if let Some(v) = &self.all {
            b = b.all(v.clone());
        }
        if let Some(v) = &self.http {
            b = b.http(v.clone());
        }
        if let Some(v) = &self.https {
            b = b.https(v.clone());
        }
        if let Some(v) = &self.no {
            b = b.no(v.clone());
        }
        b.build()
    }

    /// Applies the proxies to a client builder. Without a restricting `policy`, reqwest talks
    /// to the proxy itself; with one, requests that go through a proxy go through the pinning
    /// relay (started here, on a loopback port; needs a Tokio runtime).
    pub fn apply(
        &self,
        builder: reqwest::ClientBuilder,
        policy: &Arc<NetworkPolicy>,
        relay: Option<SocketAddr>,
    ) -> reqwest::ClientBuilder {
        // Our configuration replaces reqwest's own reading of the environment.
        let builder = builder.no_proxy();
        if !self.is_set() {
            return builder;
        }
        let matcher = Arc::new(self.matcher());
        match relay.filter(|_| policy.public_only) {
            None => builder.proxy(reqwest::Proxy::custom(move |url| {
                intercept(&matcher, url).map(|i| with_auth(&i))
            })),
            Some(relay) => {
                let to = format!("http://{relay}");
                builder.proxy(reqwest::Proxy::custom(move |url| {
                    intercept(&matcher, url).map(|_| to.clone())
                }))
            }
        }
    }

    /// Starts the pinning relay when `policy` restricts addresses and a proxy is set.
    pub fn relay(&self, policy: &Arc<NetworkPolicy>) -> std::io::Result<Option<Relay>> {
        if !policy.public_only || !self.is_set() {
            return Ok(None);
        }
        Relay::start(Arc::new(self.matcher()), policy.clone()).map(Some)
    }

    /// Whether a request to `url` goes through a proxy.
    pub fn proxies(&self, url: &url::Url) -> bool {
        self.is_set() && intercept(&self.matcher(), url).is_some()
    }
}

fn intercept(m: &Matcher, url: &url::Url) -> Option<hyper_util::client::proxy::matcher::Intercept> {
    let uri: http::Uri = url.as_str().parse().ok()?;
    m.intercept(&uri)
}

/// The proxy's URL with its credentials, for reqwest.
fn with_auth(i: &hyper_util::client::proxy::matcher::Intercept) -> String {
    let uri = i.uri().to_string();
    match i.raw_auth() {
        Some((u, p)) => {
            let mut url = match url::Url::parse(&uri) {
                Ok(u) => u,
                Err(_) => return uri,
            };
            let _ = url.set_username(u);
            let _ = url.set_password(Some(p));
            url.to_string()
        }
        None => uri,
    }
}

/// Resolves `host` and checks every address against `policy`; the address to reach.
pub async fn pin(policy: &NetworkPolicy, host: &str, port: u16) -> Result<SocketAddr, PinError> {
    let bare = host.trim_matches(['[', ']']);
    let addrs: Vec<SocketAddr> = match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((bare, port))
            .await
            .map_err(|e| PinError::Resolve(format!("cannot resolve {bare}: {e}")))?
            .collect(),
    };
    if !policy.trusted(bare)
        && let Some(bad) = addrs.iter().find(|a| !is_public(a.ip()))
    {
        return Err(PinError::Refused(Refused {
            host: bare.to_string(),
            addr: bad.ip(),
        }));
    }
    addrs
        .into_iter()
        .next()
        .ok_or_else(|| PinError::Resolve(format!("{bare} resolves to no address")))
}

/// Why the relay did not connect.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The policy refused the address.
    #[error(transparent)]
    Refused(Refused),
    /// The name did not resolve.
    #[error("{0}")]
    Resolve(String),
}

/// The pinning relay: a loopback HTTP proxy that checks each destination and hands it on to the
/// configured proxy by address. Stops when dropped.
pub struct Relay {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Largest request head the relay reads.
const MAX_HEAD: usize = 64 * 1024;

impl Relay {
    /// Where the relay listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn start(matcher: Arc<Matcher>, policy: Arc<NetworkPolicy>) -> std::io::Result<Relay> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| std::io::Error::other(format!("the proxy relay needs a runtime: {e}")))?;
        let task = handle.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("the proxy relay cannot listen: {e}");
                    return;
                }
            };
            loop {
                let (conn, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors, say: do not spin.
                        tracing::warn!("proxy relay: accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Only this process uses the relay.
                if !peer.ip().is_loopback() {
                    continue;
                }
                let (m, p) = (matcher.clone(), policy.clone());
                tokio::spawn(async move {
                    if let Err(e) = relay(conn, &m, &p).await {
                        tracing::debug!("proxy relay: {e}");
                    }
                });
            }
        });
        tracing::info!(relay = %addr, "requests through the proxy go through a relay that checks each destination first");
        Ok(Relay { addr, task })
    }
}

/// Reads up to the end of the request (or response) head; returns it and what came after.
async fn read_head(conn: &mut TcpStream) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before the end of the head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("request head too large"));
        }
    }
}

/// Answers the client with `status` and an OCI-style error body (so the registry client reports
/// the reason), then closes.
async fn refuse(conn: &mut TcpStream, status: &str, message: &str) -> std::io::Result<()> {
    let body = serde_json::json!({"errors": [{"code": "DENIED", "message": message}]}).to_string();
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

async fn relay(
    mut conn: TcpStream,
    matcher: &Matcher,
    policy: &NetworkPolicy,
) -> std::io::Result<()> {
    let (head, rest) = read_head(&mut conn).await?;
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default().to_string();
    let mut parts = first.split(' ');
    let (method, target, version) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or("HTTP/1.1"),
    );
    let connect = method.eq_ignore_ascii_case("CONNECT");
    let dest = if connect {
        url::Url::parse(&format!("https://{target}/"))
    } else {
        url::Url::parse(target)
    };
    let Ok(dest) = dest else {
        return refuse(&mut conn, "400 Bad Request", "not a proxy request").await;
    };
    let (Some(host), Some(port)) = (dest.host_str(), dest.port_or_known_default()) else {
        return refuse(&mut conn, "400 Bad Request", "no destination host").await;
    };
    let Some(upstream) = intercept(matcher, &dest) else {
        return refuse(
            &mut conn,
            "502 Bad Gateway",
            "no proxy for this destination",
        )
        .await;
    };
    let bare = host.trim_matches(['[', ']']);
    // Named by the operator: passed on by name. Everything else: by the checked address.
    let to = if policy.trusted(bare) {
        format!("{host}:{port}")
    } else {
        match pin(policy, host, port).await {
            Ok(a) => a.to_string(),
            Err(e) => {
                tracing::warn!(host = bare, "proxy relay: {e}");
                return refuse(&mut conn, "403 Forbidden", &e.to_string()).await;
            }
        }
    };
    let proxy_uri = upstream.uri();
    let proxy_addr = format!(
        "{}:{}",
        proxy_uri.host().unwrap_or("127.0.0.1"),
        proxy_uri
            .port_u16()
            .unwrap_or(match proxy_uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            })
    );
    let mut up = match TcpStream::connect(&proxy_addr).await {
        Ok(s) => s,
        Err(e) => {
            return refuse(
                &mut conn,
                "502 Bad Gateway",
                &format!("cannot reach the proxy {proxy_addr}: {e}"),
            )
            .await;
        }
    };
    let auth = upstream
        .basic_auth()
        .and_then(|v| v.to_str().ok())
        .map(|v| format!("Proxy-Authorization: {v}\r\n"))
        .unwrap_or_default();
    if connect {
        up.write_all(format!("CONNECT {to} HTTP/1.1\r\nHost: {to}\r\n{auth}\r\n").as_bytes())
            .await?;
        let (answer, early) = read_head(&mut up).await?;
        let ok = answer
            .split(' ')
            .nth(1)
            .is_some_and(|code| code.starts_with('2'));
        if !ok {
            let status = answer.lines().next().unwrap_or_default();
            return refuse(
                &mut conn,
                "502 Bad Gateway",
                &format!("the proxy {proxy_addr} refused CONNECT {to}: {status}"),
            )
            .await;
        }
        conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
        if !early.is_empty() {
            conn.write_all(&early).await?;
        }
        if !rest.is_empty() {
            up.write_all(&rest).await?;
        }
    } else {
        let mut url = dest.clone();
        let _ = url.set_host(Some(to.rsplit_once(':').map_or(to.as_str(), |(h, _)| h)));
        let _ = url.set_port(Some(port));
        let mut out = format!("{method} {url} {version}\r\n");
        for line in lines.filter(|l| !l.is_empty()) {
            let name = line.split(':').next().unwrap_or_default().trim();
            if [
                "connection",
                "proxy-connection",
                "proxy-authorization",
                "keep-alive",
            ]
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h))
            {
                continue;
            }
            out.push_str(line);
            out.push_str("\r\n");
        }
        // One request per connection: the next one is checked again.
        out.push_str(&format!("Connection: close\r\n{auth}\r\n"));
        up.write_all(out.as_bytes()).await?;
        if !rest.is_empty() {
            up.write_all(&rest).await?;
        }
    }
    tokio::io::copy_bidirectional(&mut conn, &mut up).await?;
    Ok(())
}

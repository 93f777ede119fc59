//! nginx (Debian `nginx-light`) as a real front before a real registry, with a rule of another
//! registry in its config: names only two levels deep (Docker Hub, Quay, ACR), body limits.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Registries that take only `namespace/repo` answer a deeper name with `400 NAME_INVALID`, as
/// Docker Hub does. Put in the front's server block.
pub const TWO_LEVEL_NAMES: &str = r#"
    location ~ "^/v2/([^/]+/){3,}(manifests|blobs|tags)/" {
        default_type application/json;
        return 400 '{"errors":[{"code":"NAME_INVALID","message":"invalid repository name","detail":"repository name must have at most 2 components"}]}';
    }
"#;

/// One line of the access log.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    /// The request target (path and query).
    pub target: String,
    /// What the front answered.
    pub status: u16,
    /// The servers tried, as nginx writes them (`a:1, b:2` when the first failed), or `-`.
    pub upstream: String,
}

/// A running nginx, stopped when dropped.
pub struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Nginx {
    /// A front on a free loopback port that passes every request to `upstream` (`host:port`),
    /// streaming bodies both ways, with `rules` (server-block directives, e.g.
    /// [`TWO_LEVEL_NAMES`] or `client_max_body_size 64m;`) before the catch-all location.
    #[track_caller]
    pub fn front(upstream: &str, rules: &str) -> Nginx {
        Nginx::run("", upstream, rules)
    }

    /// A front spreading requests over `servers` (`host:port` each) round-robin, as a load
    /// balancer before replicas does: a request whose server refuses the connection, resets it,
    /// times out or answers `502`/`503` goes to the next one, POSTs too (`non_idempotent`), and a
    /// server that failed is left out for a second. The access log names the server that answered
    /// (`upstream=`), every one tried in order.
    ///
    /// POSTs are retried because a replica stopping with SIGTERM closes its listener at once, and
    /// a connection the kernel had already accepted for it is reset with the request unread: nginx
    /// cannot tell that from a request the replica processed, so without `non_idempotent` it
    /// answers `502` (seen under load: 1 of 101 deliveries). What goes through here must be safe to
    /// repeat, as webhook deliveries (by `X-GitHub-Delivery`) and mirror requests (dedupe) are;
    /// the tests check no repeat made a second job. In Kubernetes the `preStop` pause keeps
    /// traffic away from a stopping pod instead. No server is ever marked down (`max_fails=0`):
    /// with `max_fails=1 fail_timeout=1s` a rolling restart could leave every server marked down
    /// at once (each restarted one within its second) and the front answered `502 no live
    /// upstreams` with two replicas up (seen once in CI: 2 of 66 deliveries); every request now
    /// tries the servers in turn, as a load balancer routing by readiness would reach a live one.
    #[track_caller]
    pub fn balance(servers: &[String], rules: &str) -> Nginx {
        assert!(!servers.is_empty());
        let mut upstream = String::from("upstream replicas {\n");
        for s in servers {
            upstream.push_str(&format!("        server {s} max_fails=0;\n"));
        }
        upstream.push_str("    }\n");
        let rules = format!(
            "proxy_next_upstream error timeout http_502 http_503 non_idempotent;\n        \
             proxy_next_upstream_tries {};\n        proxy_connect_timeout 2s;\n        {rules}",
            servers.len()
        );
        Nginx::run(&upstream, "replicas", &rules)
    }

    #[track_caller]
    fn run(upstreams: &str, upstream: &str, rules: &str) -> Nginx {
        super::require_tool("nginx");
        let dir = tempfile::tempdir().unwrap();
        let port = super::free_port();
        let d = dir.path().display();
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
error_log {d}/error.log info;
pid {d}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    log_format front '$remote_addr [$time_local] "$request" $status $body_bytes_sent upstream=$upstream_addr upstream_status=$upstream_status';
    access_log {d}/access.log front;
    {upstreams}
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_max_body_size 0;
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_http_version 1.1;
    server {{
        listen 127.0.0.1:{port};
        {rules}
        location / {{
            proxy_pass http://{upstream};
            proxy_set_header Host $http_host;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .expect("starting nginx");
        let mut front = Nginx { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = front.child.try_wait() {
                panic!("nginx exited with {status}:\n{}", front.log());
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen within 10 s:\n{}",
                front.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        front
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Its error log, stderr and access log, for failure messages.
    pub fn log(&self) -> String {
        ["stderr.log", "error.log", "access.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The access log: one line per request the front answered.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// Each request of the access log, in the order answered.
    pub fn requests(&self) -> Vec<Logged> {
        self.access_log()
            .lines()
            .filter_map(|l| {
                let mut parts = l.split('"');
                let request = parts.nth(1)?;
                let rest = parts.next()?;
                let status = rest.split_whitespace().next()?.parse().ok()?;
                // `upstream=a:1, b:2 upstream_status=502, 202`: the list has spaces.
                let upstream = rest
                    .split_once("upstream=")
                    .map(|(_, u)| u.split(" upstream_status=").next().unwrap_or(u).trim())
                    .unwrap_or("-")
                    .to_string();
                let mut r = request.split_whitespace();
                Some(Logged {
                    method: r.next()?.to_string(),
                    target: r.next()?.to_string(),
                    status,
                    upstream,
                })
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

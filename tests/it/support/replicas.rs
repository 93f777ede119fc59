//! N `mirror-mirror serve` replicas (the real binary, through [`Service`]) on one database URL,
//! behind a real nginx front that spreads requests over the live ones the way a Kubernetes Service
//! or a load balancer does: round-robin, a refused or cut connection or a `502`/`503` retried on
//! the next replica ([`Nginx::balance`]). A replica can be killed (SIGKILL, a crash), stopped
//! (SIGTERM, a deploy) and started again on its own port, so the front finds it there again.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::nginx::Nginx;
use super::service::{Launch, Service, free_port};

/// How long a replica may take to be ready: migrations, the store, the workers.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// The replicas and their front.
pub struct Replicas {
    database: String,
    dir: tempfile::TempDir,
    target: String,
    allowed: String,
    env: Vec<(String, String)>,
    ports: Vec<u16>,
    /// `None` while a replica is down.
    services: Vec<Option<Service>>,
    /// Every log written, per replica (one per start), oldest first.
    logs: Vec<Vec<PathBuf>>,
    /// nginx in front of every replica.
    pub front: Nginx,
}

impl Replicas {
    /// Starts `n` replicas at once on `database` (a `postgres://` URL, or a SQLite path for one
    /// replica), mirroring under `target` from `allowed` with the extra environment `env`, and
    /// waits (bounded) until every one answers `/readyz` with 200; then the front.
    pub async fn start(
        n: usize,
        database: &str,
        target: &str,
        allowed: &str,
        env: &[(&str, &str)],
    ) -> Replicas {
        assert!(n >= 1);
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let front = Nginx::balance(
            &ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect::<Vec<_>>(),
            "",
        );
        let mut r = Replicas {
            database: database.to_string(),
            dir,
            target: target.to_string(),
            allowed: allowed.to_string(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ports,
            services: (0..n).map(|_| None).collect(),
            logs: vec![Vec::new(); n],
            front,
        };
        // All processes first, then the waits: they start at once, as pods of a new Deployment do.
        for i in 0..n {
            r.spawn(i);
        }
        for i in 0..n {
            r.wait_ready(i).await;
        }
        r
    }

    fn spawn(&mut self, i: usize) {
        assert!(self.services[i].is_none(), "replica {i} is running");
        let log = self
            .dir
            .path()
            .join(format!("replica-{i}.{}.log", self.logs[i].len()));
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let svc = Service::spawn(&Launch {
            database: &self.database,
            dir: self.dir.path(),
            port: self.ports[i],
            log: log.clone(),
            target: &self.target,
            allowed: &self.allowed,
            env: &env,
        });
        self.logs[i].push(log);
        self.services[i] = Some(svc);
    }

    async fn wait_ready(&mut self, i: usize) {
        let svc = self.services[i].as_mut().expect("a running replica");
        svc.wait_answering("/readyz", READY_WITHIN).await;
    }

    /// How many replicas there are (running or not).
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// The database URL the replicas share.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The front's URL: what clients use.
    pub fn url(&self) -> String {
        format!("http://{}", self.front.host())
    }

    /// Replica `i`, which must be running.
    #[track_caller]
    pub fn replica(&self, i: usize) -> &Service {
        self.services[i]
            .as_ref()
            .unwrap_or_else(|| panic!("replica {i} is down"))
    }

    /// The running replicas, by index.
    pub fn running(&self) -> impl Iterator<Item = (usize, &Service)> {
        self.services
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i, s)))
    }

    /// SIGKILL replica `i`, as a crash or an OOM kill would: no shutdown, leases left to expire.
    pub fn kill(&mut self, i: usize) {
        let mut svc = self.services[i].take().expect("a running replica");
        svc.kill();
    }

    /// SIGTERM replica `i` and wait (bounded by `limit`) for it to exit, as a deploy stops a pod;
    /// the other tasks of the test keep running meanwhile. Returns how long it took. The exit
    /// must be a clean one.
    pub async fn stop(&mut self, i: usize, limit: Duration) -> Duration {
        let mut svc = self.services[i].take().expect("a running replica");
        let (took, status) = svc.terminate_async(limit).await;
        assert!(
            status.success(),
            "replica {i} exited with {status} after SIGTERM:\n{}",
            svc.log()
        );
        took
    }

    /// Starts replica `i` again on its port (the front's server list is fixed) and waits
    /// (bounded) until it is ready.
    pub async fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_ready(i).await;
    }

    /// Everything replica `i` logged, every start of it, oldest first.
    pub fn log_of(&self, i: usize) -> String {
        self.logs[i]
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every replica's log and the front's, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for i in 0..self.len() {
            out.push_str(&format!(
                "==== replica {i} (port {}) ====\n{}\n",
                self.ports[i],
                self.log_of(i)
            ));
        }
        out.push_str(&format!("==== front ====\n{}", self.front.log()));
        out
    }

    /// The running replica whose current process started job `id`, if one did.
    pub fn running_job(&self, id: i64) -> Option<usize> {
        let started = format!("job {id} started");
        self.running()
            .find(|(_, s)| s.log().contains(&started))
            .map(|(i, _)| i)
    }

    /// Waits (bounded) until `done` holds, checking every 50 ms; panics naming `what`, with the logs.
    pub async fn wait_until<F, Fut>(&self, what: &str, limit: Duration, mut done: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + limit;
        while !done().await {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {limit:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

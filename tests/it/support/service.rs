//! Runs `mirror-mirror serve` as a real process on a free port with a real SQLite file — or,
//! with `MIRROR_TEST_DATABASE=postgres`, a database of the harness's PostgreSQL server (one per
//! path, so a service started again on the same path finds its data). Through [`Launch`], on any
//! database URL and a port of the caller's choosing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use super::free_port;
use serde_json::Value;

/// The API token every test service accepts (named `ci`).
pub const TOKEN: &str = "test-token-0123456789abcdef";

/// Whether services run on PostgreSQL (`MIRROR_TEST_DATABASE=postgres`) rather than SQLite.
pub fn on_postgres() -> bool {
    std::env::var("MIRROR_TEST_DATABASE").is_ok_and(|v| v == "postgres")
}

/// What `MIRROR_DATABASE` is for a service whose test named the file `db`: the file itself, or
/// (on PostgreSQL) the database made for that path the first time it was named.
pub async fn database_for(db: &Path) -> String {
    if !on_postgres() {
        return db.display().to_string();
    }
    static DATABASES: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());
    if let Some((_, url)) = DATABASES.lock().unwrap().iter().find(|(p, _)| p == db) {
        return url.clone();
    }
    let url = super::postgres::shared().database().await;
    let mut known = DATABASES.lock().unwrap();
    if let Some((_, url)) = known.iter().find(|(p, _)| p == db) {
        return url.clone();
    }
    known.push((db.to_path_buf(), url.clone()));
    url
}

/// How to start one `serve`.
pub struct Launch<'a> {
    /// `MIRROR_DATABASE`: a SQLite path or a `postgres://` URL.
    pub database: &'a str,
    /// Where the Docker config (`DOCKER_CONFIG`) is looked for.
    pub dir: &'a Path,
    /// The loopback port it listens on.
    pub port: u16,
    /// Its stdout and stderr.
    pub log: PathBuf,
    pub target: &'a str,
    pub allowed: &'a str,
    /// Extra environment, set last (so it wins).
    pub env: &'a [(&'a str, &'a str)],
}

/// A running service.
pub struct Service {
    child: Child,
    pub url: String,
    pub log: PathBuf,
    http: reqwest::Client,
}

impl Service {
    /// Starts `serve` with the database at `db`, mirrors under `target`, sources from `allowed`,
    /// and extra environment `env`.
    pub async fn start(db: &Path, target: &str, allowed: &str, env: &[(&str, &str)]) -> Service {
        let port = free_port();
        let database = database_for(db).await;
        let mut svc = Service::spawn(&Launch {
            database: &database,
            dir: db.parent().unwrap(),
            port,
            log: db.with_extension(format!("{port}.log")),
            target,
            allowed,
            env,
        });
        svc.wait_answering("/healthz", Duration::from_secs(20))
            .await;
        svc
    }

    /// Starts `serve` as `launch` says and returns at once (see [`Service::wait_answering`]).
    pub fn spawn(launch: &Launch<'_>) -> Service {
        let out = std::fs::File::create(&launch.log).unwrap();
        let mut cmd = Command::new(super::bin());
        cmd.arg("serve")
            .env("MIRROR_LISTEN", format!("127.0.0.1:{}", launch.port))
            .env("MIRROR_DATABASE", launch.database)
            .env("MIRROR_TARGET", launch.target)
            .env("MIRROR_ALLOWED_SOURCES", launch.allowed)
            .env("MIRROR_API_TOKENS", format!("ci={TOKEN}"))
            .env("MIRROR_LOG", "info")
            .env("DOCKER_CONFIG", launch.dir)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null());
        for (k, v) in launch.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("starting mirror-mirror serve");
        Service {
            child,
            url: format!("http://127.0.0.1:{}", launch.port),
            log: launch.log.clone(),
            http: reqwest::Client::new(),
        }
    }

    /// Waits (bounded) until `GET path` answers 200 (`/healthz`: it serves; `/readyz`: it is
    /// ready for work); panics with the log if the process exits first.
    pub async fn wait_answering(&mut self, path: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("serve exited with {status}:\n{}", self.log());
            }
            if self
                .http
                .get(format!("{}{path}", self.url))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "serve did not answer {path} with 200 within {limit:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `req`; returns (status, body as JSON, or null).
    async fn json(req: reqwest::RequestBuilder) -> (u16, Value) {
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// `POST /mirror` with the test token; returns (status, body).
    pub async fn mirror(&self, body: &Value) -> (u16, Value) {
        let url = format!("{}/mirror", self.url);
        Self::json(self.http.post(url).bearer_auth(TOKEN).json(body)).await
    }

    /// `POST path` with the test token and no body; returns (status, body).
    pub async fn post(&self, path: &str) -> (u16, Value) {
        let url = format!("{}{path}", self.url);
        Self::json(self.http.post(url).bearer_auth(TOKEN)).await
    }

    /// `GET path`; returns (status, body).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        Self::json(self.http.get(format!("{}{path}", self.url))).await
    }

    /// `GET path` with `Cache-Control: no-cache` (an answer read from the database, not one
    /// kept); returns (status, body).
    pub async fn get_fresh(&self, path: &str) -> (u16, Value) {
        let url = format!("{}{path}", self.url);
        Self::json(self.http.get(url).header("cache-control", "no-cache")).await
    }

    /// `GET path` as text; returns (status, body).
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.text().await.unwrap_or_default())
    }

    /// `POST /drift/check`, then waits (bounded) for that round to finish; returns its counts.
    pub async fn drift_round(&self) -> Value {
        self.round("/drift/check", "/drift", "last_round").await
    }

    /// `POST /sync`, then waits (bounded) for that sync to finish; returns its report.
    pub async fn sync_round(&self) -> Value {
        self.round("/sync", "/sync", "last_sync").await
    }

    /// Asks for a background round at `post` (answered `202` with its id), then polls `get`
    /// until `key` is the round with that id.
    async fn round(&self, post: &str, get: &str, key: &str) -> Value {
        let (status, asked) = self.post(post).await;
        assert_eq!(status, 202, "POST {post}: {asked}");
        let id = asked["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("no round id: {asked}"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, state) = self.get(get).await;
            if state[key]["id"].as_u64() == Some(id) {
                return state[key].clone();
            }
            assert!(
                Instant::now() < deadline,
                "round {id} of {post} did not finish in 60 s: {state}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until job `id` is in a final state (bounded), and returns it.
    pub async fn wait_job(&self, id: i64, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let (_, job) = self.get(&format!("/jobs/{id}")).await;
            if job["state"] == "succeeded" || job["state"] == "failed" {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} did not finish in {limit:?}: {job}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit; returns how long it took.
    pub fn terminate(&mut self, limit: Duration) -> Duration {
        let started = Instant::now();
        self.send_term();
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "serve did not exit within {limit:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Service::terminate`] without blocking the runtime's thread (other tasks of the test go on
    /// meanwhile); returns how long it took and the exit status.
    pub async fn terminate_async(
        &mut self,
        limit: Duration,
    ) -> (Duration, std::process::ExitStatus) {
        let started = Instant::now();
        self.send_term();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return (started.elapsed(), status);
            }
            assert!(
                started.elapsed() < limit,
                "serve did not exit within {limit:?} of SIGTERM:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded, without blocking the runtime's thread) for the process to exit on its
    /// own; returns its exit status.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "serve did not exit within {limit:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and returns at once.
    pub fn send_term(&self) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {pid}");
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The service's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

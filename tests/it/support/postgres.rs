//! PostgreSQL from Debian (the `postgresql` package), started by the harness: `initdb` into a temp
//! dir owned by the `postgres` user (tests run as root and PostgreSQL refuses root), a free
//! loopback port, the unix socket in the temp dir, `synchronous_commit=on`.
//!
//! One server per test binary ([`shared`]) with a fresh database per test ([`Postgres::database`]):
//! `initdb` plus start-up costs seconds of CPU on a shared machine, a `create database` costs
//! milliseconds, and a database isolates a test as well as a server does (every table, sequence and
//! advisory-lock user is per database; LISTEN channels are per database too). [`Postgres::start`]
//! gives a test its own server when it needs one (to stop it, say).
//!
//! The server runs under a small shell that holds the read end of a pipe from this process: when the
//! `Postgres` is dropped — or the test binary exits, even by a panic or a signal, which never drops
//! the shared one — the pipe closes, the shell stops the server (fast shutdown) and removes the data
//! directory. No server outlives its tests.

use super::free_port;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A running PostgreSQL server on `127.0.0.1:port`.
pub struct Postgres {
    port: u16,
    dir: PathBuf,
    /// The watchdog shell; its stdin is the pipe whose closing stops the server.
    child: Option<Child>,
}

/// The server shared by every test of this binary.
pub fn shared() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(Postgres::start)
}

/// The newest PostgreSQL installed under /usr/lib/postgresql.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b).unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres); run scripts/test.sh, which installs the postgresql package"
        )
    })
}

#[track_caller]
fn run_as_postgres(cmd: &Path, args: &[&str]) {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(cmd)
        .args(args)
        .output()
        .expect("runuser (util-linux) runs PostgreSQL as the postgres user");
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}{}",
        cmd.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Postgres {
    /// Initialises and starts a server of its own; stopped (and its files removed) on drop.
    #[track_caller]
    pub fn start() -> Postgres {
        let bin = bin_dir();
        let mut last = String::new();
        // A free port can be taken between choosing and binding it: try again on another.
        for _ in 0..3 {
            match Postgres::try_start(&bin) {
                Ok(pg) => return pg,
                Err(e) => last = e,
            }
        }
        panic!("PostgreSQL did not start: {last}");
    }

    fn try_start(bin: &Path) -> Result<Postgres, String> {
        // A directory owned by postgres, so the server (and the watchdog, which removes it) can
        // write there; `keep` because the watchdog removes it, not the TempDir.
        let dir = tempfile::Builder::new()
            .prefix("mm-pg-")
            .tempdir()
            .unwrap()
            .keep();
        let chown = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(chown.success(), "chown postgres {}", dir.display());
        let data = dir.join("data");
        run_as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                // initdb's own fsyncs only: the server fsyncs every commit as in production.
                "--no-sync",
            ],
        );
        let port = free_port();
        let script = format!(
            r#"'{postgres}' -D '{data}' -p {port} -k '{dir}' -c listen_addresses=127.0.0.1 \
                -c synchronous_commit=on -c fsync=on -c max_connections=300 \
                -c shared_buffers=32MB >'{dir}/log' 2>&1 &
            pid=$!
            read _ignored
            kill -INT $pid 2>/dev/null
            wait $pid
            rm -rf '{dir}'"#,
            postgres = bin.join("postgres").display(),
            data = data.display(),
            dir = dir.display(),
        );
        let child = Command::new("runuser")
            .args(["-u", "postgres", "--", "sh", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("runuser starts PostgreSQL");
        let mut pg = Postgres {
            port,
            dir,
            child: Some(child),
        };
        // On failure `pg` is dropped: the watchdog stops what started and removes the files.
        pg.wait_ready(bin, Duration::from_secs(60))?;
        Ok(pg)
    }

    fn wait_ready(&mut self, bin: &Path, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!("it exited ({status}): {}", self.log()));
            }
            let ok = Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if self.log().contains("could not bind") {
                return Err(self.log());
            }
            if Instant::now() > deadline {
                return Err(format!("not ready within {within:?}: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// The URL of the server's `postgres` database.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A new, empty database; returns its `postgres://postgres@127.0.0.1:PORT/DB` URL.
    pub async fn database(&self) -> String {
        use sqlx::Connection as _;
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let mut admin = sqlx::PgConnection::connect(&self.admin_url())
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.admin_url()));
        sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.unwrap();
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Closing the pipe tells the watchdog to stop the server and remove its files.
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(b"\n");
            }
            let _ = child.wait();
        }
    }
}

//! Command-line and environment configuration: every flag has an environment twin.

use clap::{Args, Parser, Subcommand};

/// A secret setting: its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::ops::Deref for Secret {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// Mirror container images between registries without changing a digest.
#[derive(Debug, Parser)]
#[command(name = "mirror-mirror", version, about, propagate_version = true)]
pub struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `mirror_mirror=debug`.
    #[arg(long, env = "MIRROR_LOG", default_value = "info", global = true)]
    pub log: String,

    /// Log format: `human` or `json` (one JSON object per line).
    #[arg(long, env = "MIRROR_LOG_FORMAT", default_value = "human", value_parser = ["human", "json"], global = true)]
    pub log_format: String,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Copy an image (a whole multi-platform index with every child) digest-exact, like `crane cp`.
    Copy(CopyArgs),
    /// Run the mirror service: REST API, durable SQLite queue, workers, and the digest ledger.
    Serve(Box<ServeArgs>),
    /// Check that a mirror serves exactly the image of an official digest (exit 0 ok, 1 missing or
    /// different, 2 usage, 3 could not check).
    Verify(Box<VerifyArgs>),
    /// Move a SQLite store (ledger, jobs, requests, drift, notices) into a new, empty PostgreSQL
    /// database, keeping every id: the step before scaling out (docs/scaling-out.md).
    Import(ImportArgs),
}

/// `mirror-mirror import`.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// The SQLite file the service used (its MIRROR_DATABASE); stop the service first.
    #[arg(long)]
    pub from: String,
    /// The new, empty PostgreSQL database: `postgres://user@host:port/db`.
    #[arg(long)]
    pub to: String,
}

/// Settings shared by everything that talks to registries.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// Registry (host or host:port) to reach over plain HTTP; repeat or comma-separate.
    /// Loopback registries (localhost, 127.0.0.0/8, [::1]) always use plain HTTP.
    #[arg(
        long = "insecure-registry",
        env = "MIRROR_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,

    /// Attempts per request (and per blob) before a transient failure is reported.
    #[arg(long, env = "MIRROR_RETRIES", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub retries: u32,

    /// Seconds a request waits for a registry's rate limit (`Retry-After`, a spent allowance) to
    /// clear; beyond it the copy gives up for now (a service job goes back to the queue until then,
    /// without spending an attempt).
    #[arg(long, env = "MIRROR_RATE_LIMIT_MAX_WAIT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=21600))]
    pub rate_limit_max_wait: u64,

    /// Upload blobs larger than this to every target in `PATCH` chunks of this size (`8MiB`,
    /// `5M`, bytes; 256 KiB to 64 MiB; ECR needs at least 5 MiB, GHCR at most 4 MiB). Unset: one
    /// `PUT` per blob, and 8 MiB chunks to a registry once it answers `413 Payload Too Large`.
    #[arg(long, env = "MIRROR_CHUNK_SIZE", value_parser = parse_size)]
    pub chunk_size: Option<u64>,

    /// A YAML file of per-registry settings (CA directory, client certificate, insecure, chunk
    /// size, body limit, layout), keyed by HOST[:PORT]; see deploy/registries.example.yaml.
    #[arg(long, env = "MIRROR_REGISTRIES_FILE")]
    pub registries_file: Option<std::path::PathBuf>,

    /// A directory laid out like /etc/docker/certs.d (HOST[:PORT]/ca.crt, client.cert,
    /// client.key), such as a mounted Kubernetes Secret; its CAs are added to the system roots.
    #[arg(long, env = "MIRROR_CERTS_DIR")]
    pub certs_dir: Option<std::path::PathBuf>,

    /// The Docker and containers certs.d directories looked in (comma-separated).
    #[arg(long, env = "MIRROR_SYSTEM_CERTS_DIRS", default_value = crate::registry::tls::SYSTEM_CERTS_DIRS, value_delimiter = ',')]
    pub system_certs_dirs: Vec<std::path::PathBuf>,
}

/// A byte size: `4194304`, `512k`/`512KiB`, `8M`/`8MiB`, `1G`/`1GiB` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => {
            return Err(format!(
                "{s:?} is not a size: use bytes or a number with K, M or G (8MiB)"
            ));
        }
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size: use bytes or a number with K, M or G (8MiB)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `mirror-mirror copy SRC DST`.
#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Source image: `gcr.io/kaniko-project/executor:v1.8.1`, `nginx`, `repo@sha256:…`.
    pub source: String,

    /// Target: a full reference, or a repository (then the source's tag is used; a digest-only
    /// source is written by digest with no tag).
    pub target: String,

    /// Blob byte streams (GET → PUT) at once; HEADs, upload POSTs and manifests run up to 4 × this.
    /// 16: over a long round trip each stream waits on it, so 8 left a 30-blob copy in 4 waves.
    #[arg(long, short = 'j', env = "MIRROR_COPY_JOBS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub jobs: u32,

    /// Print the whole result as JSON on stdout instead of the pull line.
    #[arg(long)]
    pub json: bool,

    /// Do not copy signatures, attestations and other referrers with the image.
    #[arg(long)]
    pub no_referrers: bool,

    /// Say what a copy would do (manifests to push; blobs to upload, mount or skip; bytes) and
    /// write nothing: the source is read, the target only asked with HEAD.
    #[arg(long)]
    pub dry_run: bool,

    /// Copy only this platform of an index (`os/arch` or `os/arch/variant`; repeat for several),
    /// each child under its official digest with its attestations. One platform: the tag names
    /// that child. Several: the tag names an index rebuilt from those entries, whose digest is not
    /// an official one. A single image is copied only if its config names the platform.
    #[arg(long = "platform", value_name = "OS/ARCH[/VARIANT]")]
    pub platforms: Vec<crate::registry::platforms::PlatformSpec>,

    /// Treat DST as a repository prefix and name the image under it as `serve` does: `nested`
    /// (`DST/registry/path`) or `flat` (`DST/registry__path`, for registries that take only
    /// `namespace/repo`). The source's tag is kept.
    #[arg(long)]
    pub layout: Option<crate::mapping::Layout>,

    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// `mirror-mirror verify MIRROR_REF --digest sha256:…`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The mirror reference users pull: `ghcr.io/acme/mirror/…:v1.8.1`, or `…@sha256:…`.
    #[arg(value_parser = parse_image)]
    pub mirror: crate::reference::ImageRef,

    /// The official digest (from a trusted channel); optional when MIRROR_REF ends in `@sha256:…`.
    #[arg(long, value_parser = parse_digest)]
    pub digest: Option<crate::digest::Digest>,

    /// The source the mirror was made from: it must serve the same digest (one HEAD).
    #[arg(long, value_parser = parse_source)]
    pub source: Option<crate::reference::ImageRef>,

    /// Base URL of a running `mirror-mirror serve` whose ledger must record this mirror carrying
    /// the digest (`GET /digests/{digest}`).
    #[arg(long)]
    pub ledger: Option<url::Url>,

    /// Bearer token for the ledger, when it requires one for reads.
    #[arg(long, env = "MIRROR_LEDGER_TOKEN", hide_env_values = true)]
    pub ledger_token: Option<Secret>,

    /// Manifests and blobs read at once.
    #[arg(long, short = 'j', env = "MIRROR_COPY_JOBS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub jobs: u32,

    /// Print the whole report as JSON on stdout instead of the verdict line.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub registry: RegistryArgs,
}

fn parse_image(s: &str) -> Result<crate::reference::ImageRef, String> {
    crate::reference::ImageRef::parse(s).map_err(|e| format!("not an image reference: {e}"))
}

fn parse_source(s: &str) -> Result<crate::reference::ImageRef, String> {
    crate::reference::ImageRef::parse_source(s).map_err(|e| format!("not an image reference: {e}"))
}

fn parse_digest(s: &str) -> Result<crate::digest::Digest, String> {
    crate::digest::Digest::parse(s).map_err(|e| format!("not a digest (sha256:<64 hex>): {e}"))
}

/// `mirror-mirror serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "MIRROR_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,

    /// SQLite database: a file path or a `sqlite:` URL; created if missing.
    #[arg(long, env = "MIRROR_DATABASE", default_value = "./mirror-mirror.db")]
    pub database: String,

    /// Repository prefix mirrors are written under, such as `ghcr.io/acme/mirror` (the one-target
    /// form of `MIRROR_TARGETS`; its name is `default`).
    #[arg(long, env = "MIRROR_TARGET")]
    pub target: Option<String>,

    /// Several named targets, each request mirrored to every one (or to those it names in
    /// `"targets"`): comma-separated `name=registry/prefix`, such as
    /// `ghcr=ghcr.io/acme/mirror,home=registry.example.cn/acme`. Instead of `MIRROR_TARGET`.
    #[arg(long, env = "MIRROR_TARGETS")]
    pub targets: Option<String>,

    /// How sources are named under the target: `nested` (`prefix/registry/path`) or `flat` (one
    /// name below the prefix, for registries that take only `namespace/repo`: Docker Hub, Quay, ACR).
    /// Unset: each target registry's `layout` in the registries file, else `nested`.
    #[arg(long, env = "MIRROR_TARGET_LAYOUT")]
    pub target_layout: Option<crate::mapping::Layout>,

    /// Bearer tokens allowed to request mirrors: comma-separated `token` or `name=token`.
    #[arg(long, env = "MIRROR_API_TOKENS", hide_env_values = true)]
    pub api_tokens: Option<Secret>,

    /// Registries or registry/path prefixes that may be mirrored (`*.pkg.dev` wildcards allowed).
    #[arg(long, env = "MIRROR_ALLOWED_SOURCES", default_value = crate::mapping::DEFAULT_ALLOWED_SOURCES)]
    pub allowed_sources: String,

    /// Copies running at once.
    #[arg(long, env = "MIRROR_WORKERS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,

    /// Attempts per job before it fails for good.
    #[arg(long, env = "MIRROR_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,

    /// Require a token for the read endpoints too (`/images`, `/digests`, `/jobs`).
    #[arg(long, env = "MIRROR_READ_REQUIRES_TOKEN", default_value_t = false)]
    pub read_requires_token: bool,

    /// Seconds running copies get to finish at shutdown before their jobs go back to the queue.
    #[arg(long, env = "MIRROR_SHUTDOWN_GRACE", default_value_t = 30)]
    pub shutdown_grace: u64,

    /// MiB of `GET /images` and `GET /digests` answers kept in memory while the ledger does not
    /// change (on PostgreSQL: on no replica, as its notifications say). 0: none kept.
    #[arg(long, env = "MIRROR_READ_CACHE_MIB", default_value_t = 16, value_parser = clap::value_parser!(u64).range(0..=4096))]
    pub read_cache_mib: u64,

    /// Seconds a kept answer is served at most, even while the ledger does not change.
    #[arg(long, env = "MIRROR_READ_CACHE_MAX_AGE", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub read_cache_max_age: u64,

    /// Seconds the listener keeps serving after SIGTERM, with `/readyz` answering 503, so a load
    /// balancer that follows `/readyz` stops sending traffic before the port closes (where no
    /// Kubernetes `preStop` pause does it). 0: the listener closes at once.
    #[arg(long, env = "MIRROR_SHUTDOWN_DRAIN", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_drain: u64,

    /// Seconds a worker's lease on a job lasts; renewed every third of it.
    #[arg(long, env = "MIRROR_LEASE", default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..=3600))]
    pub lease: u64,

    /// Copy signatures, attestations and other referrers with each image (a request may turn it off).
    #[arg(long, env = "MIRROR_REFERRERS", default_value_t = true, action = clap::ArgAction::Set)]
    pub referrers: bool,

    /// Blob byte streams at once within one copy; HEADs, upload POSTs and manifests up to 4 × this.
    #[arg(long, env = "MIRROR_COPY_JOBS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub jobs: u32,

    /// Seconds between drift-watch rounds, which re-check every mirrored tag upstream (HEAD) and on
    /// the target; 0 turns the schedule off (`POST /drift/check` still runs a round).
    #[arg(long, env = "MIRROR_DRIFT_INTERVAL", default_value_t = 21600)]
    pub drift_interval: u64,

    /// What drift watch does when a source tag moves: `follow` (mirror the new digest) or `pin`
    /// (keep the mirrored one and record the move). A request may choose for its tag.
    #[arg(long, env = "MIRROR_DRIFT_POLICY", default_value = "follow")]
    pub drift_policy: crate::drift::Policy,

    /// A YAML mirror list (images and which tags to keep mirrored; see deploy/mirrors.example.yaml),
    /// synced at start, every `MIRROR_SYNC_INTERVAL` and on `POST /sync`.
    #[arg(long, env = "MIRROR_SYNC_FILE")]
    pub sync_file: Option<std::path::PathBuf>,

    /// Seconds between syncs of the mirror list; 0: only at start and on `POST /sync`.
    #[arg(long, env = "MIRROR_SYNC_INTERVAL", default_value_t = 3600)]
    pub sync_interval: u64,

    /// GitHub webhook secrets (comma-separated, so one can be rotated without downtime).
    /// Unset: `POST /webhooks/github` answers 503.
    #[arg(long, env = "MIRROR_GITHUB_WEBHOOK_SECRETS", hide_env_values = true)]
    pub github_webhook_secrets: Option<Secret>,

    /// `repository_dispatch` event types that request mirrors (comma-separated).
    #[arg(long, env = "MIRROR_GITHUB_EVENT_TYPES", default_value = "mirror")]
    pub github_event_types: String,

    /// Repositories allowed to trigger mirrors: `owner/repo` or `owner/*`, comma-separated. Unset: any.
    #[arg(long, env = "MIRROR_GITHUB_REPOSITORIES")]
    pub github_repositories: Option<String>,

    /// Source repositories on the target's registry that the target's credentials may read
    /// (`registry/path` prefixes, comma-separated). Any other repository there is read without
    /// credentials, so a request cannot make the service copy a private repository with them.
    #[arg(long, env = "MIRROR_TRUSTED_SOURCE_CREDENTIALS", value_delimiter = ',')]
    pub trusted_source_credentials: Vec<String>,

    /// URL to POST a signed JSON notice to when a job succeeds or fails.
    #[arg(long, env = "MIRROR_NOTIFY_URL")]
    pub notify_url: Option<String>,

    /// Secret for the notices' `X-Mirror-Signature-256` (HMAC-SHA256 of the body).
    #[arg(long, env = "MIRROR_NOTIFY_SECRET", hide_env_values = true)]
    pub notify_secret: Option<Secret>,

    /// Attempts per notice (backoff from 0.5 s doubling to 10 min) before it is marked failed.
    #[arg(long, env = "MIRROR_NOTIFY_MAX_ATTEMPTS", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub notify_max_attempts: u32,

    #[command(flatten)]
    pub registry: RegistryArgs,
}

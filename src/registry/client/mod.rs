//! The Registry HTTP API v2 transport: one HTTP client for every registry, with authentication,
//! retries and size limits. Each operation is one protocol step; the copy engine composes them.
//!
//! This module holds the client, its settings and URLs; each concern lives in its own file:
//! `requests` (sending, authentication, budgets, retries, error answers), `manifests`,
//! `blobs` (size, streaming with verification), `uploads` (sessions and mounts), `tags` and
//! `referrers`.

mod blobs;
mod manifests;
mod referrers;
mod requests;
mod small_blobs;
mod tags;
mod uploads;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::auth::Authenticator;
use super::budget::{BudgetPolicy, Budgets};
use super::connect::{Connections, TransportConfig};
use super::credentials::CredentialStore;
use super::error::{Error, Result};
use super::guard::{GuardedResolver, NetworkPolicy};
use super::proxy::Relay;
use super::retry::RetryPolicy;
use super::trust::CredentialReach;
use crate::digest::Digest;
use crate::reference::ImageRef;

pub use blobs::Source as BlobSource;
pub use manifests::{MAX_MANIFEST_BYTES, ManifestHead};
pub use tags::{MAX_TAG_PAGE_BYTES, MAX_TAG_PAGES, MAX_TAGS};
pub use uploads::{MountOutcome, UploadLimits, UploadSession};

/// A repository on a registry: where manifests and blobs live.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Repo {
    /// The normalised registry name (`docker.io`, `ghcr.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// The repository path (`library/nginx`).
    pub name: String,
}

impl Repo {
    /// The repository an image reference lives in.
    pub fn of(image: &ImageRef) -> Repo {
        Repo {
            registry: image.registry().to_string(),
            name: image.repository().to_string(),
        }
    }

    /// The host to send HTTP requests to (Docker Hub's API lives on `registry-1.docker.io`).
    pub fn api_host(&self) -> &str {
        if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    fn scope(&self, actions: &str) -> String {
        format!("repository:{}:{actions}", self.name)
    }
}

impl std::fmt::Display for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}

/// Settings for [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Registries (host or host:port) to talk to over plain HTTP. Loopback registries always are.
    pub insecure_registries: Vec<String>,
    /// Retry policy for every request.
    pub retry: RetryPolicy,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of an answer before the connection counts as stalled.
    pub read_timeout: Duration,
    /// Which addresses connections may reach.
    pub network: NetworkPolicy,
    /// The longest a request waits for a registry's rate limit; beyond it the request fails with
    /// [`Error::RateLimited`] so the caller can reschedule.
    pub rate_limit_max_wait: Duration,
    /// How blobs go up to a registry, by `host[:port]` as image references name it (`docker.io`
    /// for Docker Hub): body limit and chunk size. Registries not named get
    /// [`ClientConfig::default_upload_limits`].
    pub upload_limits: HashMap<String, UploadLimits>,
    /// Upload limits for every registry not in [`ClientConfig::upload_limits`] (the
    /// `--chunk-size` shortcut); by default one `PUT` per blob, chunks after a `413`.
    pub default_upload_limits: UploadLimits,
    /// Per-registry TLS (certs.d, `MIRROR_CERTS_DIR`) and the registries file.
    pub transport: TransportConfig,
    /// Which repositories each registry's stored credentials may be used for.
    pub credential_reach: CredentialReach,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            insecure_registries: Vec::new(),
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(120),
            network: NetworkPolicy::permissive(),
            rate_limit_max_wait: Duration::from_secs(60),
            upload_limits: HashMap::new(),
            default_upload_limits: UploadLimits::default(),
            transport: TransportConfig::default(),
            credential_reach: CredentialReach::unrestricted(),
        }
    }
}

/// Counts bytes as they stream, shared with whoever reports progress.
pub type ByteCounter = Arc<std::sync::atomic::AtomicU64>;

/// The registry client: cheap to clone, shared by every copy in the process.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    /// Where blobs are on targets, shared beyond this process (none: this process's memory).
    locations: Option<Arc<dyn crate::registry::locations::BlobLocations>>,
}

struct Inner {
    /// The HTTP client of each registry (its TLS), and the scheme.
    conn: Connections,
    /// The relay proxied requests go through when the policy restricts addresses.
    _relay: Option<Relay>,
    auth: Authenticator,
    retry: RetryPolicy,
    network: Arc<NetworkPolicy>,
    /// Rate-limit budgets per registry and credential, shared by every copy.
    budgets: Arc<Budgets>,
    /// Per (target registry, blob): the repository this process last put it in, behind a lock
    /// that one transfer of that blob holds at a time.
    blob_slots: Mutex<HashMap<(String, Digest), BlobSlot>>,
    /// Configured upload limits per registry, and the default.
    upload_limits: HashMap<String, UploadLimits>,
    default_upload_limits: UploadLimits,
    /// Chunk sizes learned from registries that answered `413 Payload Too Large`.
    learned_chunks: Mutex<HashMap<String, u64>>,
}

/// Where a blob is known to be on a target registry; locked while it is being moved there.
pub type BlobSlot = Arc<tokio::sync::Mutex<Option<String>>>;

/// Entries kept in the blob record before idle ones are dropped.
const MAX_BLOB_SLOTS: usize = 100_000;

impl Client {
    /// A client with `config`, authenticating with `credentials`.
    pub fn new(config: ClientConfig, credentials: CredentialStore) -> Result<Client> {
        for (registry, limits) in &config.upload_limits {
            limits
                .check()
                .map_err(|e| Error::Invalid(format!("upload limits for {registry}: {e}")))?;
        }
        config
            .default_upload_limits
            .check()
            .map_err(|e| Error::Invalid(format!("the default upload limits: {e}")))?;
        let network = Arc::new(config.network.clone());
        config.network.proxy.check().map_err(Error::Invalid)?;
        let relay = config
            .network
            .proxy
            .relay(&network)
            .map_err(|e| Error::Invalid(format!("starting the proxy relay: {e}")))?;
        let relay_addr = relay.as_ref().map(Relay::addr);
        let (connect_timeout, read_timeout) = (config.connect_timeout, config.read_timeout);
        let policy = network.clone();
        let builder = Arc::new(move || {
            let hops = policy.clone();
            let b = reqwest::Client::builder()
                .dns_resolver(Arc::new(GuardedResolver(policy.clone())))
                .user_agent(concat!("mirror-mirror/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(connect_timeout)
                .read_timeout(read_timeout)
                // Blob GETs redirect to object storage; reqwest drops Authorization on a
                // cross-host hop. Each hop meets the network policy; at most 5.
                .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                    if attempt.previous().len() >= 5 {
                        attempt.error("more than 5 redirects")
                    } else if let Err(refused) = hops.check_url(attempt.url()) {
                        attempt.error(refused)
                    } else {
                        attempt.follow()
                    }
                }));
            policy.proxy.apply(b, &policy, relay_addr)
        });
        let mut transport = config.transport.clone();
        transport.insecure.extend(config.insecure_registries);
        let conn = Connections::new(builder, transport)?;
        let budgets = Arc::new(Budgets::for_credentials(
            BudgetPolicy {
                max_wait: config.rate_limit_max_wait,
                backoff: config.retry.base,
                max_backoff: config.retry.max_backoff,
            },
            &credentials,
        ));
        Ok(Client {
            inner: Arc::new(Inner {
                conn,
                _relay: relay,
                auth: Authenticator::new(credentials, network.clone(), budgets.clone())
                    .with_reach(config.credential_reach),
                budgets,
                retry: config.retry,
                network,
                blob_slots: Mutex::new(HashMap::new()),
                upload_limits: config.upload_limits,
                default_upload_limits: config.default_upload_limits,
                learned_chunks: Mutex::new(HashMap::new()),
            }),
            locations: None,
        })
    }

    /// This client, consulting and updating `locations` when it moves blobs into a target.
    pub fn with_blob_locations(
        mut self,
        locations: Arc<dyn crate::registry::locations::BlobLocations>,
    ) -> Client {
        self.locations = Some(locations);
        self
    }

    /// The shared record of where blobs are, if any.
    pub fn blob_locations(&self) -> Option<&dyn crate::registry::locations::BlobLocations> {
        self.locations.as_deref()
    }

    /// The slot of `digest` on `registry` (see [`BlobSlot`]).
    pub fn blob_slot(&self, registry: &str, digest: &Digest) -> BlobSlot {
        let mut slots = self.inner.blob_slots.lock().expect("blob slots poisoned");
        if slots.len() >= MAX_BLOB_SLOTS {
            slots.retain(|_, s| Arc::strong_count(s) > 1);
        }
        slots
            .entry((registry.to_string(), digest.clone()))
            .or_default()
            .clone()
    }

    /// What the registries file (`MIRROR_REGISTRIES_FILE`) says about `registry`: typed
    /// `chunk_size()`, `max_body()`, `layout()` and the TLS and scheme settings already in force.
    pub fn registry_settings(
        &self,
        registry: &str,
    ) -> &crate::registry::settings::RegistrySettings {
        self.inner.conn.settings(registry)
    }

    /// Whether manifest GETs to `registry` count against an allowance (see [`Budgets::meters`]):
    /// then a tag is resolved with a `HEAD`, which does not count.
    pub fn meters_manifest_gets(&self, registry: &str) -> bool {
        self.inner.budgets.meters(registry)
    }

    /// The retry policy in force.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.retry
    }

    fn scheme(&self, registry: &str) -> &'static str {
        self.inner.conn.scheme(registry)
    }

    fn url(&self, repo: &Repo, tail: &str) -> Result<url::Url> {
        let s = format!(
            "{}://{}/v2/{}/{}",
            self.scheme(&repo.registry),
            repo.api_host(),
            repo.name,
            tail
        );
        url::Url::parse(&s).map_err(|e| Error::Invalid(format!("cannot build URL {s}: {e}")))
    }
}

//! mirror-mirror: mirror container images between registries without changing a digest, and keep a
//! ledger of the trusted digests.
//!
//! Data flows one way: `http` → `store` ← `worker`/`drift`/`sync` → `registry`.

/// The one-shot commands (`copy`): glue between the command line and the library.
pub mod cmd;
/// Command-line and environment configuration.
pub mod config;
/// Content digests (`sha256:…`): parsing, hashing, verification.
pub mod digest;
/// Drift watch: re-checking mirrored tags upstream and on the target.
pub mod drift;
/// The HTTP API: `/mirror`, `/jobs`, `/images`, `/digests`.
pub mod http;
/// Where a source lands under the target prefix, and which sources are allowed.
pub mod mapping;
/// Process-wide counters rendered at `/metrics`.
pub mod metrics;
/// The declarative mirror list (YAML): parsing, checks with line numbers, tag selection.
pub mod mirrorlist;
/// Signed notices to `MIRROR_NOTIFY_URL`, sent from the outbox with backoff.
pub mod notify;
/// Image references: parsed and normalised at the edge.
pub mod reference;
/// The registry transport and the digest-preserving copy engine.
pub mod registry;
/// Background rounds (drift watch, mirror-list sync): queued, one at a time, stopped at shutdown.
pub mod rounds;
/// `serve`: the service's start-up and orderly shutdown.
pub mod serve;
/// The one place with SQL and transactions: units of work over SQLite or PostgreSQL.
pub mod store;
/// The mirror list kept in sync through the queue: on start, on a schedule, on `POST /sync`.
pub mod sync;
/// `verify`: does a mirror serve exactly the image of an official digest?
pub mod verify;
/// The worker loop that runs copies under a lease.
pub mod worker;

//! The one integration test binary: real registries, a real SQLite file, skopeo as an independent check.

mod copy;
mod deploy;
mod drift;
mod faults;
mod github;
mod namespace;
mod notices;
mod queue;
mod referrers;
mod retries;
mod rounds;
mod service;
mod ssrf;
mod support;
mod sync;
mod uploads;
mod worker;

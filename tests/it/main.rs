//! The one integration test binary: real registries, a real SQLite file, skopeo as an independent check.

mod copy;
mod deploy;
mod deputy;
mod drift;
mod faults;
mod github;
mod helpers;
mod namespace;
mod proxy;
mod queue;
mod service;
mod ssrf;
mod support;
mod sync;
mod tls;

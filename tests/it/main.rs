//! The one integration test binary: real registries, a real SQLite file, skopeo as an independent check.

mod copy;
mod deploy;
mod drift;
mod faults;
mod github;
mod namespace;
mod queue;
mod service;
mod ssrf;
mod store;
mod support;
mod sync;

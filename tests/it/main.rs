//! The one integration test binary: real registries, a real SQLite file, skopeo as an independent check.

mod action;
mod copy;
mod deploy;
mod drift;
mod dryrun;
mod faults;
mod github;
mod metrics;
mod namespace;
mod queue;
mod retries;
mod rounds;
mod service;
mod ssrf;
mod status;
mod support;
mod sync;
mod uploads;
mod verify;
mod worker;

//! The one integration test binary: real registries, a real SQLite file, skopeo as an independent check.

mod action;
mod copy;
mod deploy;
mod deputy;
mod drift;
mod faults;
mod github;
mod helpers;
mod namespace;
mod notices;
mod proxy;
mod queue;
mod quirks;
mod referrers;
mod registries;
mod retries;
mod rounds;
mod service;
mod ssrf;
mod status;
mod support;
mod sync;
mod tls;
mod uploads;
mod verify;
mod worker;

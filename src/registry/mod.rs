//! Registry HTTP API v2: our own transport (auth, retries, limits), manifests as exact bytes, and
//! the digest-preserving copy engine built on them.

pub mod auth;
pub mod budget;
pub mod client;
pub mod connect;
pub mod copy;
pub mod credential_helper;
pub mod credentials;
pub mod error;
pub mod fanout;
mod gate;
pub mod guard;
pub mod locations;
pub mod manifest;
pub mod platforms;
pub mod proxy;
pub mod retry;
pub mod settings;
pub mod tls;
pub mod trust;

pub use client::{Client, ClientConfig, Repo};
pub use copy::{CopyOptions, CopyResult, Progress, copy, dry_run, resolve};
pub use error::Error;

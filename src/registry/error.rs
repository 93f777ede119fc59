//! What can go wrong talking to a registry or copying an image, and whether trying again can help.

use std::time::Duration;

use crate::digest::Digest;

/// An error from the registry transport or the copy engine.
///
/// [`Error::is_transient`] sorts them: transient errors (throttling, 5xx, cut connections) are retried
/// with backoff; permanent ones (unknown manifest, denied, digest mismatch) fail at once.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry answered with an unexpected HTTP status.
    #[error("{method} {url} answered HTTP {status}{}{}", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default(), if message.is_empty() { String::new() } else { format!(": {message}") })]
    Status {
        method: String,
        url: String,
        status: u16,
        /// The OCI error code from the body (`MANIFEST_UNKNOWN`, `DENIED`, …), when there was one.
        code: Option<String>,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The request could not be sent or its answer could not be read (connection refused, reset, timeout).
    #[error("{context}: {}", causes(source))]
    Network {
        context: String,
        #[source]
        source: reqwest::Error,
    },
    /// The registry's TLS certificate could not be verified: says which registry and where its CA goes.
    #[error("TLS to {registry} failed: {reason}; {hint}")]
    Tls {
        registry: String,
        reason: String,
        hint: String,
    },
    /// The registry's certificate files (certs.d, `ca_dir`) cannot be used.
    #[error(transparent)]
    TlsFiles(#[from] super::tls::TlsError),
    /// A body ended before its announced size (a cut connection).
    #[error("{what}: the connection was cut after {received} of {expected} bytes")]
    Truncated {
        what: String,
        received: u64,
        expected: u64,
    },
    /// Content did not hash to the digest it was asked for by.
    #[error("{what}: digest mismatch: expected {expected}, the bytes hash to {actual}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    /// Content was larger than its descriptor says.
    #[error(
        "{what}: size mismatch: the descriptor says {expected} bytes, the registry sent {actual}"
    )]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    /// A transfer cannot continue where it stopped and has to start again (a source that ignores
    /// `Range`, an upload session that lost bytes).
    #[error("{what}: {reason}; starting again")]
    Restart { what: String, reason: String },
    /// A manifest was larger than the limit.
    #[error(
        "manifest {reference} is larger than {limit} bytes; registries refuse manifests this large"
    )]
    ManifestTooLarge { reference: String, limit: usize },
    /// A Docker schema 1 manifest, whose digest cannot be kept on a v2 registry.
    #[error(
        "{reference} is a Docker schema 1 manifest; its digest cannot be kept on a v2 registry, so it cannot be mirrored digest-exact (rebuild or re-push the image with a current client)"
    )]
    Schema1 { reference: String },
    /// A manifest we cannot interpret.
    #[error("manifest {reference} is not valid: {reason}")]
    InvalidManifest { reference: String, reason: String },
    /// Authentication failed or was refused.
    #[error("authentication to {registry} failed: {reason}")]
    Auth {
        registry: String,
        reason: String,
        transient: bool,
    },
    /// A registry answer lacked a header the protocol requires.
    #[error("{registry} answered {what} without a {header} header")]
    MissingHeader {
        registry: String,
        what: String,
        header: &'static str,
    },
    /// The target refused a manifest, with the reason we can tell.
    #[error("{reason}")]
    Refused { reason: String },
    /// Reading the written image back from the target did not give what was written
    /// (permanent), or could not be done for now (`transient`: a 5xx, a timeout).
    #[error("verification on the target failed: {reason}")]
    Verify { reason: String, transient: bool },
    /// The network policy refused a connection (a private address for an untrusted host).
    #[error(transparent)]
    Blocked(#[from] super::guard::Refused),
    /// A registry's rate limit holds its requests for longer than a request waits
    /// (`MIRROR_RATE_LIMIT_MAX_WAIT`): try again after `retry_after`.
    #[error(
        "{registry} is rate-limiting requests ({reason}); they may resume in {} s, longer than a request waits (MIRROR_RATE_LIMIT_MAX_WAIT)",
        retry_after.as_secs_f64().ceil() as u64
    )]
    RateLimited {
        registry: String,
        retry_after: Duration,
        reason: String,
    },
    /// A bad argument (a URL that cannot be built, a digest on the target that differs from the source).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Whether trying the same operation again may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Status { status, .. } => matches!(*status, 408 | 429 | 500..=599),
            Error::Network { source, .. } => {
                !source.is_builder() && !source.is_redirect() && !super::guard::is_refusal(source)
            }
            Error::Blocked(_) | Error::Tls { .. } | Error::TlsFiles(_) => false,
            Error::Truncated { .. } | Error::Restart { .. } | Error::RateLimited { .. } => true,
            Error::Auth { transient, .. } | Error::Verify { transient, .. } => *transient,
            Error::MissingHeader { .. } => false,
            Error::DigestMismatch { .. }
            | Error::SizeMismatch { .. }
            | Error::ManifestTooLarge { .. }
            | Error::Schema1 { .. }
            | Error::InvalidManifest { .. }
            | Error::Refused { .. }
            | Error::Invalid(_) => false,
        }
    }

    /// How long the registry asked us to wait (`Retry-After`), if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Status { retry_after, .. } => *retry_after,
            Error::RateLimited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The HTTP status, for errors that carry one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The OCI error code (`MANIFEST_BLOB_UNKNOWN`, …), for errors that carry one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Status { code, .. } => code.as_deref(),
            _ => None,
        }
    }
}

/// An error and its causes, joined once each: reqwest's own message hides the cause (refused,
/// reset, …). The URL reqwest adds (`… for url (https://…)`) is left out: the context names it.
pub(crate) fn causes(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    if let Some(url) = e.url() {
        out = out.replace(&format!(" for url ({url})"), "");
    }
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

/// Shorthand for results in this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

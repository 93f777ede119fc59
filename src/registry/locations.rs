//! Where blobs already are on target registries beyond this process's memory: a record shared by
//! every replica (the store's `blob_location`), so a copy on replica B mounts what replica A
//! uploaded into another repository instead of uploading it again.

use std::future::Future;
use std::pin::Pin;

/// A boxed future borrowing its arguments.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A shared record of which repositories of a registry hold which blobs. Errors are the
/// implementation's to log: a lost look-up costs an upload, never a wrong copy (the mount is
/// asked of the registry, which knows).
pub trait BlobLocations: Send + Sync {
    /// Repositories of `registry` known to hold `digest`, most recently seen first. While
    /// another process moves the blob there, this waits for it; an empty answer makes the caller
    /// the one to move it into `repo`, until [`BlobLocations::record`] or
    /// [`BlobLocations::abandon`].
    fn locate<'a>(
        &'a self,
        registry: &'a str,
        digest: &'a str,
        repo: &'a str,
    ) -> Pending<'a, Vec<String>>;
    /// Notes that `repo` on `registry` holds `digest` (written, mounted or found there), ending
    /// the caller's move of it.
    fn record<'a>(&'a self, registry: &'a str, repo: &'a str, digest: &'a str) -> Pending<'a, ()>;
    /// Ends the caller's move of `digest` without it (the transfer failed).
    fn abandon<'a>(&'a self, registry: &'a str, digest: &'a str) -> Pending<'a, ()>;
}

//! One source read for several targets (issue 15). The copies of one request to its targets share
//! a [`Fanout`], each through its [`Member`]: every source manifest is fetched once; a small blob
//! is read once and kept until every copy that needs it has it; a larger blob is read once and
//! its bytes are fed to every copy that needs it at the same time, the fastest at most
//! [`LAG_BYTES`] ahead of the slowest. A copy that holds the others back longer than
//! [`LAG_GRACE`] is dropped from the shared read; it, a copy whose upload failed, and a copy that
//! comes once the read has started read the source on their own, as without a fan-out.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, OnceCell, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{BlobSource, ByteCounter, Client, Repo};
use super::error::{Error, Result};
use super::manifest::Manifest;
use crate::digest::Digest;

const MIB: u64 = 1024 * 1024;

/// Most bytes of a shared blob read the fastest copy may be ahead of the slowest (the bytes held
/// in memory for it: every copy is fed the same buffers).
pub const LAG_BYTES: u64 = 4 * MIB;

/// How long a copy whose buffer is full may hold back another that has taken everything, before
/// it is dropped from the shared read (it then reads the source on its own).
pub const LAG_GRACE: Duration = Duration::from_secs(2);

/// How long the first copy to reach a blob waits for the other copies that may need it.
pub const GATHER: Duration = Duration::from_secs(5);

/// Most bytes of small blobs kept for the copies that still need them (beyond it, each reads its own).
const SMALL_KEPT: u64 = 8 * MIB;

/// How often a shared read waiting for room looks again at copies that stopped reading.
const ROOM_POLL: Duration = Duration::from_millis(50);

type Key = (Repo, Digest);

/// The shared source reads of `n` copies of one image (one per target).
pub struct Fanout {
    hub: Arc<Hub>,
}

impl Fanout {
    /// Source reads shared by `members` copies.
    pub fn new(members: usize) -> Fanout {
        Fanout {
            hub: Arc::new(Hub {
                state: Mutex::new(State {
                    declared: vec![None; members],
                    registries: vec![None; members],
                    left: vec![false; members],
                    done: vec![HashSet::new(); members],
                    ..State::default()
                }),
                changed: Notify::new(),
            }),
        }
    }

    /// The place of copy `index` (below `members`); dropping it (its copy ended) leaves the fan-out.
    pub fn member(&self, index: usize) -> Member {
        Member {
            inner: Arc::new(Place {
                hub: self.hub.clone(),
                index,
            }),
        }
    }
}

/// One copy's place in a [`Fanout`]. Cheap to clone; the copy leaves when the last clone drops.
#[derive(Clone)]
pub struct Member {
    inner: Arc<Place>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Member({})", self.inner.index)
    }
}

struct Place {
    hub: Arc<Hub>,
    index: usize,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut st = self.hub.state.lock().expect("fan-out poisoned");
        st.left[self.index] = true;
        st.sweep();
        drop(st);
        self.hub.changed.notify_waiters();
    }
}

struct Hub {
    state: Mutex<State>,
    /// Rung whenever a copy declares, finishes a blob, leaves or joins a read.
    changed: Notify,
}

#[derive(Default)]
struct State {
    /// Per copy: the blobs its plan may move; `None` until it has planned.
    declared: Vec<Option<HashSet<Digest>>>,
    /// Per copy: its target registry, once it has planned.
    registries: Vec<Option<String>>,
    /// Per copy: it ended (or was dropped).
    left: Vec<bool>,
    /// Per copy: the blobs it is done with (moved, mounted, found on its target).
    done: Vec<HashSet<Digest>>,
    manifests: HashMap<Key, Arc<OnceCell<Manifest>>>,
    small: HashMap<Key, (Arc<OnceCell<Bytes>>, u64)>,
    small_bytes: u64,
    casts: HashMap<Key, Cast>,
    onces: HashMap<String, Arc<OnceCell<Arc<dyn std::any::Any + Send + Sync>>>>,
}

impl State {
    /// Whether copy `m` may still come for `digest`.
    fn may_come(&self, m: usize, digest: &Digest) -> bool {
        !self.left[m]
            && match &self.declared[m] {
                None => true,
                Some(blobs) => blobs.contains(digest) && !self.done[m].contains(digest),
            }
    }

    /// Drops the small blobs no copy may still come for.
    fn sweep(&mut self) {
        let gone: Vec<Key> = self
            .small
            .keys()
            .filter(|(_, d)| (0..self.left.len()).all(|m| !self.may_come(m, d)))
            .cloned()
            .collect();
        for k in gone {
            if let Some((_, size)) = self.small.remove(&k) {
                self.small_bytes -= size;
            }
        }
    }

    /// Whether every copy that may need the blob of `key` has joined its read.
    fn gathered(&self, key: &Key) -> bool {
        let Some(Cast::Gathering(subs, _)) = self.casts.get(key) else {
            return true;
        };
        (0..self.left.len()).all(|m| subs.iter().any(|(i, _)| *i == m) || !self.may_come(m, &key.1))
    }
}

/// A shared read of one blob.
enum Cast {
    /// Copies waiting for the read to start, and what they ring when they take bytes.
    Gathering(Vec<(usize, Sub)>, Arc<Notify>),
    /// The read started (or is over): a copy that comes now reads on its own.
    Started,
}

/// What a shared read sends each copy.
enum Msg {
    /// The read starts; the bytes follow.
    Start,
    /// No other copy came: read it on your own.
    Alone,
    Data(Bytes),
    /// Every byte was sent (the last only once the digest was verified).
    End,
    Failed(String),
}

/// One copy fed by a shared read.
struct Sub {
    tx: mpsc::UnboundedSender<Msg>,
    consumed: Arc<AtomicU64>,
    /// Cancelled when the read drops this copy or fails: its upload may be stuck where no
    /// message reaches it (a target that stopped reading), so it is stopped from outside.
    dropped: CancellationToken,
}

/// The bytes of a blob from a shared read, for one copy's upload: verified as a whole by the
/// read (a wrong blob ends in an error before its last bytes).
pub struct Feed {
    rx: mpsc::UnboundedReceiver<Msg>,
    consumed: Arc<AtomicU64>,
    room: Arc<Notify>,
    dropped: CancellationToken,
    digest: Digest,
    size: u64,
    progress: Option<ByteCounter>,
}

impl Feed {
    /// The blob's digest.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Cancelled when the shared read dropped this copy (it fell behind) or failed: stop the
    /// upload then, even one stuck on a target that stopped reading.
    pub fn dropped(&self) -> CancellationToken {
        self.dropped.clone()
    }

    /// The next bytes, `None` after the last; an error when the shared read failed or dropped
    /// this copy (it then reads the source on its own).
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        let failed = |reason: String| Error::Restart {
            what: format!("blob {}", self.digest.short()),
            reason,
        };
        match self.rx.recv().await {
            Some(Msg::Data(b)) => {
                self.consumed.fetch_add(b.len() as u64, Ordering::Relaxed);
                self.room.notify_one();
                if let Some(p) = &self.progress {
                    p.fetch_add(b.len() as u64, Ordering::Relaxed);
                }
                Ok(Some(b))
            }
            Some(Msg::End) => Ok(None),
            Some(Msg::Failed(reason)) => Err(failed(reason)),
            Some(Msg::Start | Msg::Alone) | None => {
                Err(failed("the shared read of the source ended early".into()))
            }
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.rx.close();
        self.room.notify_one();
    }
}

impl Member {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.inner.hub.state.lock().expect("fan-out poisoned"));
        self.inner.hub.changed.notify_waiters();
        out
    }

    /// Says which blobs this copy's plan may move into `registry` (it has fetched every manifest
    /// it needs): a shared read waits for the copies that may need its blob, and no longer. A
    /// copy to a registry another copy declared first is not waited for: it waits for that one's
    /// transfer there and mounts what it put (waiting for it would hold both up).
    pub fn declare(&self, registry: &str, blobs: impl IntoIterator<Item = Digest>) {
        let i = self.inner.index;
        self.with(|st| {
            let shared = st
                .registries
                .iter()
                .enumerate()
                .any(|(j, r)| j != i && r.as_deref() == Some(registry));
            st.registries[i] = Some(registry.to_string());
            st.declared[i] = Some(match shared {
                true => HashSet::new(),
                false => blobs.into_iter().collect(),
            });
            st.sweep();
        })
    }

    /// This copy is done with `digest` (moved, mounted or found on its target).
    pub fn done(&self, digest: &Digest) {
        let i = self.inner.index;
        self.with(|st| {
            st.done[i].insert(digest.clone());
            st.sweep();
        })
    }

    /// Manifest `digest` of `src`, fetched (verified) by `fetch` once for every copy.
    pub async fn manifest(
        &self,
        src: &Repo,
        digest: &Digest,
        fetch: impl Future<Output = Result<Manifest>>,
    ) -> Result<Manifest> {
        let cell = {
            let mut st = self.inner.hub.state.lock().expect("fan-out poisoned");
            st.manifests
                .entry((src.clone(), digest.clone()))
                .or_default()
                .clone()
        };
        cell.get_or_try_init(|| fetch).await.cloned()
    }

    /// What `work` answers, computed once for every copy asking with the same `key` (a lookup on
    /// the source, such as the image's referrers); kept while the fan-out lives. `key` names what
    /// is asked and so its type: the same key always comes with the same `T`.
    pub async fn once<T: Clone + Send + Sync + 'static>(
        &self,
        key: String,
        work: impl Future<Output = T>,
    ) -> T {
        let cell = {
            let mut st = self.inner.hub.state.lock().expect("fan-out poisoned");
            st.onces.entry(key).or_default().clone()
        };
        let v = cell
            .get_or_init(|| async { Arc::new(work.await) as Arc<dyn std::any::Any + Send + Sync> })
            .await;
        v.downcast_ref::<T>()
            .expect("a fan-out key asked with another type")
            .clone()
    }

    /// Small blob `digest` (`size` bytes) of `src`, read whole by `fetch` once for every copy and
    /// kept until no copy may still need it (within [`SMALL_KEPT`] bytes; beyond, read here).
    pub async fn small_blob(
        &self,
        src: &Repo,
        digest: &Digest,
        size: u64,
        fetch: impl Future<Output = Result<Bytes>>,
    ) -> Result<Bytes> {
        let cell = {
            let mut st = self.inner.hub.state.lock().expect("fan-out poisoned");
            let key = (src.clone(), digest.clone());
            match st.small.get(&key) {
                Some((c, _)) => Some(c.clone()),
                None if st.small_bytes + size <= SMALL_KEPT => {
                    st.small_bytes += size;
                    let c = Arc::new(OnceCell::new());
                    st.small.insert(key, (c.clone(), size));
                    Some(c)
                }
                None => None,
            }
        };
        match cell {
            Some(c) => c.get_or_try_init(|| fetch).await.cloned(),
            None => fetch.await,
        }
    }

    /// Joins the shared read of blob `digest` (`size` bytes) of `src`: waits (at most
    /// [`GATHER`]) for the other copies that may need it, then answers the bytes, counted into
    /// `progress` as this copy takes them. `None`: read it on your own (no other copy came, or
    /// the read started without this one).
    pub async fn open(
        &self,
        client: &Client,
        src: &Repo,
        digest: &Digest,
        size: u64,
        progress: Option<ByteCounter>,
    ) -> Option<Feed> {
        let key = (src.clone(), digest.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        let consumed = Arc::new(AtomicU64::new(0));
        let dropped = CancellationToken::new();
        let sub = Sub {
            tx,
            consumed: consumed.clone(),
            dropped: dropped.clone(),
        };
        let i = self.inner.index;
        let (first, room) = self.with(|st| match st.casts.get_mut(&key) {
            Some(Cast::Started) => None,
            Some(Cast::Gathering(subs, _)) if subs.iter().any(|(m, _)| *m == i) => None,
            Some(Cast::Gathering(subs, room)) => {
                subs.push((i, sub));
                Some((false, room.clone()))
            }
            None => {
                let room = Arc::new(Notify::new());
                st.casts
                    .insert(key.clone(), Cast::Gathering(vec![(i, sub)], room.clone()));
                Some((true, room))
            }
        })?;
        if first {
            // The read is started by a task of its own: whichever copy goes away meanwhile, the
            // others are fed.
            tokio::spawn(cast(
                self.inner.hub.clone(),
                key,
                client.clone(),
                size,
                room.clone(),
            ));
        }
        let mut feed = Feed {
            rx,
            consumed,
            room,
            dropped,
            digest: digest.clone(),
            size,
            progress,
        };
        match feed.rx.recv().await {
            Some(Msg::Start) => Some(feed),
            _ => {
                feed.rx.close();
                None
            }
        }
    }
}

/// Gathers the copies that may need the blob of `key`, then reads it once and feeds every one
/// that joined.
async fn cast(hub: Arc<Hub>, key: Key, client: Client, size: u64, room: Arc<Notify>) {
    let deadline = Instant::now() + GATHER;
    loop {
        let changed = hub.changed.notified();
        if hub.state.lock().expect("fan-out poisoned").gathered(&key) {
            break;
        }
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    let subs = {
        let mut st = hub.state.lock().expect("fan-out poisoned");
        match st.casts.insert(key.clone(), Cast::Started) {
            Some(Cast::Gathering(subs, _)) => subs,
            _ => Vec::new(),
        }
    };
    drop(hub);
    let mut subs: Vec<Sub> = subs
        .into_iter()
        .map(|(_, s)| s)
        .filter(|s| !s.tx.is_closed())
        .collect();
    if subs.len() < 2 {
        for s in &subs {
            let _ = s.tx.send(Msg::Alone);
        }
        return;
    }
    let (src, digest) = key;
    tracing::debug!(
        blob = %digest.short(),
        copies = subs.len(),
        "reading blob {} from {src} once for {} targets",
        digest.short(),
        subs.len()
    );
    for s in &subs {
        let _ = s.tx.send(Msg::Start);
    }
    let mut source = match BlobSource::open(&client, &src, &digest, size, None).await {
        Ok(s) => s,
        Err(e) => {
            for s in &subs {
                let _ = s.tx.send(Msg::Failed(e.to_string()));
                s.dropped.cancel();
            }
            return;
        }
    };
    let mut sent = 0u64;
    let mut stalled_since: Option<Instant> = None;
    loop {
        // Room: every copy within LAG_BYTES of what was sent.
        loop {
            subs.retain(|s| !s.tx.is_closed());
            if subs.is_empty() {
                return;
            }
            let lag = |s: &Sub| sent.saturating_sub(s.consumed.load(Ordering::Relaxed));
            let most = subs.iter().map(lag).max().unwrap_or(0);
            if most < LAG_BYTES / 2 {
                stalled_since = None;
            }
            if most <= LAG_BYTES {
                break;
            }
            // A copy that took everything is waiting for the one whose buffer is full.
            if subs.iter().any(|s| lag(s) == 0) {
                let since = *stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= LAG_GRACE {
                    subs.retain(|s| {
                        let behind = lag(s) > LAG_BYTES;
                        if behind {
                            tracing::warn!(
                                blob = %digest.short(),
                                "a target took no more of blob {} for {} ms with {} MiB buffered; it reads the source on its own",
                                digest.short(),
                                LAG_GRACE.as_millis(),
                                LAG_BYTES / MIB
                            );
                            let _ = s.tx.send(Msg::Failed(format!(
                                "this target fell {} MiB behind the others",
                                LAG_BYTES / MIB
                            )));
                            s.dropped.cancel();
                        }
                        !behind
                    });
                    stalled_since = None;
                    continue;
                }
            }
            let freed = room.notified();
            tokio::select! {
                _ = freed => {}
                _ = tokio::time::sleep(ROOM_POLL) => {}
            }
        }
        match source.next().await {
            Ok(Some(bytes)) => {
                sent += bytes.len() as u64;
                subs.retain(|s| s.tx.send(Msg::Data(bytes.clone())).is_ok());
            }
            Ok(None) => {
                for s in &subs {
                    let _ = s.tx.send(Msg::End);
                }
                return;
            }
            Err(e) => {
                for s in &subs {
                    let _ = s.tx.send(Msg::Failed(e.to_string()));
                    s.dropped.cancel();
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn repo() -> Repo {
        Repo {
            registry: "src.example".into(),
            name: "a/b".into(),
        }
    }

    #[tokio::test]
    async fn a_small_blob_is_read_once_and_let_go_when_no_copy_needs_it() {
        let fan = Fanout::new(2);
        let (a, b) = (fan.member(0), fan.member(1));
        let d = Digest::sha256_of(b"config");
        a.declare("one.example", [d.clone()]);
        b.declare("two.example", [d.clone()]);
        let reads = AtomicUsize::new(0);
        let fetch = || async {
            reads.fetch_add(1, Ordering::SeqCst);
            Ok(Bytes::from_static(b"config"))
        };
        assert_eq!(
            a.small_blob(&repo(), &d, 6, fetch()).await.unwrap(),
            "config"
        );
        assert_eq!(
            b.small_blob(&repo(), &d, 6, fetch()).await.unwrap(),
            "config"
        );
        assert_eq!(reads.load(Ordering::SeqCst), 1, "read once for both");
        let held = || fan.hub.state.lock().unwrap().small_bytes;
        a.done(&d);
        assert_eq!(held(), 6, "kept while the second copy may need it");
        drop(b);
        assert_eq!(held(), 0, "let go once no copy may need it");
    }

    #[test]
    fn a_copy_to_a_registry_another_declared_is_not_waited_for() {
        let fan = Fanout::new(3);
        let (a, b, c) = (fan.member(0), fan.member(1), fan.member(2));
        let d = Digest::sha256_of(b"layer");
        b.declare("same.example", [d.clone()]);
        a.declare("same.example", [d.clone()]);
        let st = fan.hub.state.lock().unwrap();
        assert!(st.may_come(1, &d), "the first to declare the registry");
        assert!(!st.may_come(0, &d), "it mounts what the other puts there");
        assert!(st.may_come(2, &d), "not declared yet: it may come");
        drop(st);
        c.declare("other.example", Vec::new());
        assert!(!fan.hub.state.lock().unwrap().may_come(2, &d));
    }
}

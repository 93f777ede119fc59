//! The copy's request chains (issue 16): what runs at once so a long link waits fewer round trips
//! — a child manifest fetched while the target is asked for it, small blobs read whole and put
//! with one request, byte streams largest first — and that each shortcut still lands the exact
//! image when a registry says no.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::Method;
use mirror_mirror::reference::ImageRef;
use mirror_mirror::registry::credentials::CredentialStore;
use mirror_mirror::registry::{Client, ClientConfig, CopyOptions, CopyResult, Progress, copy};

use crate::support::front::{Action, Front};
use crate::support::image::{Style, platform};
use crate::support::{Pusher, Registry};

const MIB: usize = 1024 * 1024;

async fn copy_with(source: &str, target: &str, jobs: usize) -> CopyResult {
    let client = Client::new(ClientConfig::default(), CredentialStore::empty()).unwrap();
    copy(
        &client,
        &ImageRef::parse(source).unwrap(),
        &ImageRef::parse(target).unwrap(),
        &CopyOptions {
            jobs,
            ..CopyOptions::default()
        },
        Arc::new(Progress::default()),
    )
    .await
    .unwrap_or_else(|e| panic!("copy {source} → {target}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_the_target_has_is_not_needed_from_the_source() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&src);
    let amd = p.image("two/app", 81, &[4000], false, Style::Compact).await;
    let arm = p.image("two/app", 82, &[5000], false, Style::Compact).await;
    let idx = p
        .index(
            "two/app",
            Some("v1"),
            &[
                (amd.clone(), platform("linux", "amd64")),
                (arm.clone(), platform("linux", "arm64")),
            ],
            false,
            Style::Compact,
        )
        .await;
    // The target has the amd64 child already.
    copy_with(
        &format!("{}/two/app@{}", src.host(), amd.digest),
        &format!("{}/two/app", dst.host()),
        8,
    )
    .await;
    // The child's GET now leaves with the target's HEAD of it; the source failing it must not
    // matter, since the target has it.
    let gone = format!("/manifests/{}", amd.digest);
    let front = Front::start(&src.host(), move |r| {
        if r.method == Method::GET && r.path.ends_with(&gone) {
            Action::Answer(404, "MANIFEST_UNKNOWN")
        } else {
            Action::Pass
        }
    })
    .await;
    let r = copy_with(
        &format!("{}/two/app:v1", front.host()),
        &format!("{}/two/app:v1", dst.host()),
        8,
    )
    .await;
    assert_eq!(r.target_digest.to_string(), idx.digest);
    assert_eq!(r.manifests_skipped, 1, "the amd64 child was there: {r:?}");
    let (_, _, served) = Pusher::new(&dst)
        .get_manifest("two/app", "v1")
        .await
        .expect("the tag on the target");
    assert_eq!(served, idx.digest);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_blob_put_that_is_refused_goes_again_as_a_stream() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    let img = Pusher::new(&src)
        .image("small/app", 83, &[200_000], false, Style::Compact)
        .await;
    // The first blob PUT (a small blob's bytes in one request) is refused.
    let puts = Arc::new(AtomicUsize::new(0));
    let front = Front::start(&dst.host(), move |r| {
        if r.method == Method::PUT
            && r.path.contains("/blobs/uploads/")
            && puts.fetch_add(1, Ordering::SeqCst) == 0
        {
            Action::Answer(400, "BLOB_UPLOAD_INVALID")
        } else {
            Action::Pass
        }
    })
    .await;
    let r = copy_with(
        &format!("{}/small/app@{}", src.host(), img.digest),
        &format!("{}/small/app:v1", front.host()),
        8,
    )
    .await;
    assert_eq!(r.target_digest.to_string(), img.digest);
    assert_eq!(r.blobs_uploaded, 2, "{r:?}");
    let log = front.log();
    let blob_puts: Vec<u16> = log
        .iter()
        .filter(|l| l.method == Method::PUT && l.path.contains("/blobs/uploads/"))
        .map(|l| l.status)
        .collect();
    assert_eq!(
        {
            let mut s = blob_puts.clone();
            s.sort();
            s
        },
        vec![201, 201, 400],
        "one refused, then each blob in: {log:?}"
    );
    let p = Pusher::new(&dst);
    for b in &img.blobs {
        assert!(p.blob_exists("small/app", b).await, "{b} on the target");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_blob_the_source_lost_is_not_needed_when_the_target_has_it() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    let config = br#"{"architecture":"amd64","os":"linux","seed":84}"#;
    let layer = crate::support::image::bytes(84, 3000);
    let img = Pusher::new(&src)
        .image_with("lost/app", config, &[layer], false, Style::Compact)
        .await;
    // The target has the config (another image's, say) but not the image.
    let config = Pusher::new(&dst).blob("lost/app", config).await;
    assert_eq!(config, img.blobs[0]);
    // A small blob is read from the source while the target is asked about it: the source
    // failing that read must not matter when the target answers that it has it.
    let gone = format!("/blobs/{config}");
    let front = Front::start(&src.host(), move |r| {
        if r.method == Method::GET && r.path.ends_with(&gone) {
            Action::Answer(404, "BLOB_UNKNOWN")
        } else {
            Action::Pass
        }
    })
    .await;
    let r = copy_with(
        &format!("{}/lost/app@{}", front.host(), img.digest),
        &format!("{}/lost/app:v1", dst.host()),
        8,
    )
    .await;
    assert_eq!(r.target_digest.to_string(), img.digest);
    assert_eq!((r.blobs_skipped, r.blobs_uploaded), (1, 1), "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn byte_streams_go_largest_first() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    // Smallest first in the manifest: the order a first-come gate would tend to follow.
    let sizes = [2 * MIB, 3 * MIB + 1, 4 * MIB + 2, 5 * MIB + 3];
    let img = Pusher::new(&src)
        .image("order/app", 85, &sizes, false, Style::Compact)
        .await;
    let front = Front::start(&src.host(), |_| Action::Pass).await;
    // One stream at a time: every layer but the first to ask waits for the gate.
    let r = copy_with(
        &format!("{}/order/app@{}", front.host(), img.digest),
        &format!("{}/order/app:v1", dst.host()),
        1,
    )
    .await;
    assert_eq!(r.target_digest.to_string(), img.digest);
    let size_of = |path: &str| {
        img.blobs[1..]
            .iter()
            .zip(sizes)
            .find(|(d, _)| path.ends_with(d.as_str()))
            .map(|(_, s)| s)
    };
    let order: Vec<usize> = front
        .log()
        .iter()
        .filter(|l| l.method == Method::GET)
        .filter_map(|l| size_of(&l.path))
        .collect();
    assert_eq!(order.len(), 4, "each layer read once: {order:?}");
    // When the first stream ends, the others wait at the gate: the largest goes next.
    let waited = &order[1..];
    assert_eq!(
        waited[0],
        *waited.iter().max().unwrap(),
        "the largest waiting layer went next: {order:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_source_up_to_date_on_the_target_needs_no_manifest_from_it() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    let img = Pusher::new(&src)
        .image("pin/app", 86, &[3000], false, Style::Compact)
        .await;
    let source = format!("{}/pin/app@{}", src.host(), img.digest);
    copy_with(&source, &format!("{}/pin/app:v1", dst.host()), 8).await;
    // The top manifest of a pinned source is fetched while the target's tag is checked; a source
    // failing that GET must not matter when the tag already names the digest.
    let front = Front::start(&src.host(), |r| {
        if r.method == Method::GET && r.path.contains("/manifests/") {
            Action::Answer(404, "MANIFEST_UNKNOWN")
        } else {
            Action::Pass
        }
    })
    .await;
    let r = copy_with(
        &format!("{}/pin/app@{}", front.host(), img.digest),
        &format!("{}/pin/app:v1", dst.host()),
        8,
    )
    .await;
    assert!(r.up_to_date, "{r:?}");
    assert_eq!(r.target_digest.to_string(), img.digest);
}

#[tokio::test(flavor = "multi_thread")]
async fn copies_sharing_a_base_at_once_upload_it_once_and_mount_it_everywhere_else() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&src);
    let base = crate::support::image::bytes(87, 2 * MIB);
    let mut images = Vec::new();
    for i in 0..4u64 {
        let config = format!(r#"{{"architecture":"amd64","os":"linux","n":{i}}}"#);
        let own = crate::support::image::bytes(870 + i, 10_000);
        let repo = format!("shared/app{i}");
        images.push((
            repo.clone(),
            p.image_with(
                &repo,
                config.as_bytes(),
                &[base.clone(), own],
                false,
                Style::Compact,
            )
            .await,
        ));
    }
    let base_digest = images[0].1.blobs[1].clone();
    let front = Front::start(&dst.host(), |_| Action::Pass).await;
    // One client, as the service's workers share: the first copy to reach the base uploads it,
    // the others wait for that and then mount it, all at once.
    let client = Client::new(ClientConfig::default(), CredentialStore::empty()).unwrap();
    let copies = images.iter().map(|(repo, img)| {
        let (client, source, target) = (
            client.clone(),
            format!("{}/{repo}@{}", src.host(), img.digest),
            format!("{}/{repo}:v1", front.host()),
        );
        async move {
            copy(
                &client,
                &ImageRef::parse(&source).unwrap(),
                &ImageRef::parse(&target).unwrap(),
                &CopyOptions::default(),
                Arc::new(Progress::default()),
            )
            .await
            .expect("copy")
        }
    });
    let results = futures_util::future::join_all(copies).await;
    let mounted: usize = results.iter().map(|r| r.blobs_mounted).sum();
    assert_eq!(
        mounted, 3,
        "the base mounted into three repositories: {results:#?}"
    );
    let log = front.log();
    let base_puts = log
        .iter()
        .filter(|l| l.method == Method::PUT && l.status == 201)
        .filter(|l| l.path.contains("/blobs/uploads/"))
        .count();
    // 4 configs + 4 own layers + the base once.
    assert_eq!(base_puts, 9, "{log:?}");
    let p = Pusher::new(&dst);
    for (repo, _) in &images {
        assert!(
            p.blob_exists(repo, &base_digest).await,
            "{repo} has the base"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_no_op_copy_reads_the_targets_tag_once_and_that_is_the_read_back() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    let img = Pusher::new(&src)
        .image("noop/app", 88, &[3000], false, Style::Compact)
        .await;
    Pusher::new(&src)
        .manifest("noop/app", "v1", &img.media_type, &img.bytes)
        .await;
    let (source, target) = (
        format!("{}/noop/app:v1", src.host()),
        format!("{}/noop/app:v1", dst.host()),
    );
    copy_with(&source, &target, 8).await;
    let front = Front::start(&dst.host(), |_| Action::Pass).await;
    let r = copy_with(&source, &format!("{}/noop/app:v1", front.host()), 8).await;
    assert!(r.up_to_date, "{r:?}");
    assert_eq!(r.target_digest.to_string(), img.digest);
    let log = front.log();
    assert_eq!(log.len(), 1, "one request to the target: {log:?}");
    assert!(
        log[0].method == Method::GET
            && log[0].path.ends_with("/manifests/v1")
            && log[0].status == 200,
        "the tag read whole: {log:?}"
    );
}

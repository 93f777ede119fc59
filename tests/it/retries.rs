//! Retries: one budget of attempts per operation, however deep the layers that retry (blob →
//! request → token), and read-back failures that are worth another try.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::Method;

use mirror_mirror::reference::ImageRef;
use mirror_mirror::registry::credentials::{Credential, CredentialStore};
use mirror_mirror::registry::retry::RetryPolicy;
use mirror_mirror::registry::{Client, ClientConfig, CopyOptions, Progress, copy};

use crate::support::front::{Action, Front};
use crate::support::image::Style;
use crate::support::{Pusher, Registry, TokenIssuer};

/// A client with `attempts` per operation and millisecond backoff, logged in as `user`.
fn client(host: &str, user: &str, pass: &str, attempts: u32) -> Client {
    let mut creds = CredentialStore::empty();
    creds.insert(
        host,
        Credential::Basic {
            username: user.into(),
            password: pass.into(),
        },
    );
    Client::new(
        ClientConfig {
            retry: RetryPolicy {
                max_attempts: attempts,
                base: Duration::from_millis(1),
                max_backoff: Duration::from_millis(5),
                max_retry_after: Duration::from_millis(5),
            },
            ..ClientConfig::default()
        },
        creds,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_server_answering_503_is_asked_at_most_retries_times() {
    let issuer = TokenIssuer::start("rita", "rita-password-1").await;
    let reg = Registry::token(&issuer).await;
    let img = Pusher::new(&reg)
        .image("rt/a", 51, &[1000], false, Style::Compact)
        .await;
    issuer.fail_next(&[503; 1000]);
    let before = issuer.requests();
    let client = client(&reg.host(), "rita", "rita-password-1", 3);
    let source = ImageRef::parse(&format!("{}/rt/a@{}", reg.host(), img.digest)).unwrap();
    let target = ImageRef::parse(&format!("{}/rt/b:x", reg.host())).unwrap();
    let err = copy(
        &client,
        &source,
        &target,
        &CopyOptions::default(),
        Arc::new(Progress::default()),
    )
    .await
    .expect_err("no token, no copy");
    let asked = issuer.requests() - before;
    eprintln!("--retries 3, token server answering 503: asked {asked} times");
    assert!(err.to_string().contains("503"), "{err}");
    assert!(
        asked <= 3,
        "the token server was asked {asked} times for one operation with --retries 3: {err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_503_while_reading_back_is_worth_another_attempt() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    let img = Pusher::new(&src)
        .image("rb/a", 52, &[2000], false, Style::Compact)
        .await;
    let answered = Arc::new(AtomicUsize::new(0));
    let counter = answered.clone();
    // The first read-back of a manifest by digest gets a 503.
    let front = Front::start(&dst.host(), move |r| {
        if r.method == Method::GET
            && r.path.contains("/manifests/sha256:")
            && counter.fetch_add(1, Ordering::SeqCst) == 0
        {
            Action::Answer(503, "UNAVAILABLE")
        } else {
            Action::Pass
        }
    })
    .await;
    // One attempt per operation (`--retries 1`): the read-back's 503 ends this copy.
    let client = client(&front.host(), "nobody", "none", 1);
    let source = ImageRef::parse(&format!("{}/rb/a@{}", src.host(), img.digest)).unwrap();
    let target = ImageRef::parse(&format!("{}/rb/a:v1", front.host())).unwrap();
    let options = CopyOptions::default();
    let run = || {
        copy(
            &client,
            &source,
            &target,
            &options,
            Arc::new(Progress::default()),
        )
    };
    let err = run().await.expect_err("the read-back failed");
    assert_eq!(answered.load(Ordering::SeqCst), 1, "{err}");
    assert!(
        err.to_string().contains("reading") && err.to_string().contains("503"),
        "{err}"
    );
    assert!(
        err.is_transient(),
        "a 503 is no verdict on what was written, so the job is retried: {err}"
    );
    // The job's next attempt: the image is there and reads back.
    let r = run().await.expect("the next attempt verifies");
    assert_eq!(r.target_digest.to_string(), img.digest);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mount_that_answered_201_does_not_wait_for_the_head_beside_it() {
    let (src, dst) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&src);
    let shared = crate::support::image::bytes(61, 300_000);
    let a = p
        .image_with(
            "mt/a",
            br#"{"a":1}"#,
            std::slice::from_ref(&shared),
            false,
            Style::Compact,
        )
        .await;
    let b = p
        .image_with(
            "mt/b",
            br#"{"b":1}"#,
            &[shared.clone(), b"own".to_vec()],
            false,
            Style::Compact,
        )
        .await;
    let layer = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&shared))
    );
    let heads = Arc::new(AtomicUsize::new(0));
    let counter = heads.clone();
    // The target answers the HEAD of the shared layer in the second repository 500, as
    // distribution may while a mount links it there.
    let path = format!("/v2/m/b/blobs/{layer}");
    let front = Front::start(&dst.host(), move |r| {
        if r.method == Method::HEAD && r.path == path {
            counter.fetch_add(1, Ordering::SeqCst);
            Action::Answer(500, "UNKNOWN")
        } else {
            Action::Pass
        }
    })
    .await;
    // Four attempts per operation, 500 ms apart at first: a HEAD waited for is asked 4 times.
    let client = Client::new(
        ClientConfig {
            retry: RetryPolicy {
                max_attempts: 4,
                base: Duration::from_millis(500),
                max_backoff: Duration::from_secs(2),
                max_retry_after: Duration::from_secs(2),
            },
            ..ClientConfig::default()
        },
        CredentialStore::empty(),
    )
    .unwrap();
    for (repo, img) in [("a", &a), ("b", &b)] {
        let source = ImageRef::parse(&format!("{}/mt/{repo}@{}", src.host(), img.digest)).unwrap();
        let target = ImageRef::parse(&format!("{}/m/{repo}:v1", front.host())).unwrap();
        let r = copy(
            &client,
            &source,
            &target,
            &CopyOptions::default(),
            Arc::new(Progress::default()),
        )
        .await
        .expect("the copy succeeds");
        if repo == "b" {
            assert_eq!(r.blobs_mounted, 1, "the shared layer is mounted: {r:?}");
        }
    }
    let asked = heads.load(Ordering::SeqCst);
    assert!(
        asked <= 2,
        "the mount answered 201, yet its HEAD was asked {asked} times (waited for its retries)"
    );
}

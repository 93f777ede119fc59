//! Retries: one budget of attempts per operation, however deep the layers that retry (blob →
//! request → token), and read-back failures that are worth another try.

use std::sync::Arc;
use std::time::Duration;

use mirror_mirror::reference::ImageRef;
use mirror_mirror::registry::credentials::{Credential, CredentialStore};
use mirror_mirror::registry::retry::RetryPolicy;
use mirror_mirror::registry::{Client, ClientConfig, CopyOptions, Progress, copy};

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
    assert!(err.to_string().contains("503"), "{err}");
    assert!(
        asked <= 3,
        "the token server was asked {asked} times for one operation with --retries 3: {err}"
    );
}

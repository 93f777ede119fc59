//! The registries file (`MIRROR_REGISTRIES_FILE`) reaches the transport: a registry's `chunk_size`
//! makes uploads to it go in `PATCH` chunks of that size while other registries get one `PUT`,
//! counted in the real registries' access logs. (TLS settings: `tls`.)

use std::process::Command;

use crate::support::image::Style;
use crate::support::{Pusher, Registry, bin, sha256};

fn patches(reg: &Registry) -> usize {
    reg.log().matches("\"PATCH /v2/").count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registrys_chunk_size_in_the_file_chunks_uploads_to_it_only() {
    let src = Registry::anonymous().await;
    let (chunked, plain) = (Registry::anonymous().await, Registry::anonymous().await);
    let p = Pusher::new(&src);
    let img = p
        .image("acme/app", 9, &[1024 * 1024 + 17], false, Style::Compact)
        .await;
    p.manifest("acme/app", "v1", &img.media_type, &img.bytes)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("registries.yaml");
    std::fs::write(
        &file,
        format!("{}:\n  chunk_size: 256KiB\n", chunked.host()),
    )
    .unwrap();
    let empty = tempfile::tempdir().unwrap();
    for dst in [&chunked, &plain] {
        let out = Command::new(bin())
            .args([
                "copy",
                &format!("{}/acme/app:v1", src.host()),
                &format!("{}/mirror/app", dst.host()),
            ])
            .env("DOCKER_CONFIG", empty.path())
            .env_remove("MIRROR_CHUNK_SIZE")
            .env("MIRROR_REGISTRIES_FILE", &file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (bytes, _, _) = Pusher::new(dst)
            .get_manifest("mirror/app", "v1")
            .await
            .expect("mirrored");
        assert_eq!(sha256(&bytes), img.digest);
    }
    // 1 MiB + 17 bytes in 256 KiB chunks: at least 4 PATCHes to the registry the file names.
    assert!(patches(&chunked) >= 4, "{}", patches(&chunked));
    assert_eq!(patches(&plain), 0, "one PUT per blob elsewhere");
}

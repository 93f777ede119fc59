//! buildah and podman (Debian packages) as the image builder and the puller a user would run: an
//! image from scratch pushed by buildah is a realistic input (real tar layers, a real config), and
//! `podman pull …@digest` checks what a mirror serves the way a user's machine would.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Storage of one test's buildah/podman (vfs, in a temp dir: no daemon, nothing shared).
pub struct Store {
    dir: tempfile::TempDir,
}

impl Store {
    /// A fresh store.
    #[track_caller]
    pub fn new() -> Store {
        super::require_tool("buildah");
        super::require_tool("podman");
        Store {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn args(&self) -> Vec<String> {
        let d = self.dir.path().display();
        vec![
            format!("--root={d}/root"),
            format!("--runroot={d}/run"),
            "--storage-driver=vfs".into(),
        ]
    }

    #[track_caller]
    fn run(&self, tool: &str, args: &[&str]) -> String {
        let out = Command::new(tool)
            .args(self.args())
            .args(args)
            .env("STORAGE_DRIVER", "vfs")
            .env("REGISTRIES_CONFIG_PATH", self.registries_conf())
            .output()
            .unwrap_or_else(|e| panic!("running {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// An empty registries.conf: no search registries, nothing but what a test names.
    fn registries_conf(&self) -> PathBuf {
        let p = self.dir.path().join("registries.conf");
        if !p.exists() {
            std::fs::write(&p, "unqualified-search-registries = []\n").unwrap();
        }
        p
    }

    /// Builds an image from scratch holding `files` (name → contents) for `os/arch` and pushes
    /// it to `reference` over plain HTTP; returns the pushed manifest's digest.
    #[track_caller]
    pub fn build_and_push(&self, reference: &str, arch: &str, files: &[(&str, &str)]) -> String {
        let ctx = self.dir.path().join(format!("ctx-{arch}"));
        std::fs::create_dir_all(&ctx).unwrap();
        let ctr = self.run("buildah", &["from", "scratch"]);
        for (name, contents) in files {
            let f = ctx.join(name);
            std::fs::write(&f, contents).unwrap();
            self.run("buildah", &["copy", &ctr, path(&f), &format!("/{name}")]);
        }
        self.run(
            "buildah",
            &["config", "--os", "linux", "--arch", arch, &ctr],
        );
        let image = format!("localhost/built-{arch}");
        self.run("buildah", &["commit", "-q", &ctr, &image]);
        let digest_file = self.dir.path().join(format!("digest-{arch}"));
        self.run(
            "buildah",
            &[
                "push",
                "--tls-verify=false",
                "--digestfile",
                path(&digest_file),
                &image,
                &format!("docker://{reference}"),
            ],
        );
        std::fs::read_to_string(&digest_file)
            .unwrap()
            .trim()
            .to_string()
    }

    /// `podman pull` of `reference` (plain HTTP); returns the digest podman recorded for it.
    #[track_caller]
    pub fn pull(&self, reference: &str) -> String {
        self.run("podman", &["pull", "-q", "--tls-verify=false", reference]);
        self.run(
            "podman",
            &["image", "inspect", "--format", "{{.Digest}}", reference],
        )
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

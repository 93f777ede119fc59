//! A throwaway PKI made with openssl: a CA that signs a server certificate for 127.0.0.1 and
//! localhost, and a second CA that signs a client certificate (for `http.tls.clientcas`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// The files of one test PKI (kept while any clone lives).
#[derive(Clone)]
pub struct Pki {
    dir: Arc<tempfile::TempDir>,
}

#[track_caller]
fn openssl(dir: &Path, args: &[&str]) {
    super::require_tool("openssl");
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

#[track_caller]
fn ca(dir: &Path, name: &str) {
    let mut args = vec!["req", "-x509", "-nodes", "-days", "2"];
    args.extend(EC);
    // A name of its own per PKI: two test CAs never look like the same issuer.
    let unique = dir.file_name().unwrap().to_string_lossy();
    let subj = format!("/CN=mirror-mirror test {name} {unique}");
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    args.extend(["-subj", &subj, "-keyout", &key, "-out", &crt]);
    args.extend([
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &args);
}

#[track_caller]
fn leaf(dir: &Path, name: &str, ca: &str, ext: &str) {
    let (key, csr, crt, cnf) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("{name}.cnf"),
    );
    std::fs::write(dir.join(&cnf), ext).unwrap();
    let mut args = vec!["req", "-nodes"];
    args.extend(EC);
    let subj = format!("/CN=mirror-mirror test {name}");
    args.extend(["-subj", &subj, "-keyout", &key, "-out", &csr]);
    openssl(dir, &args);
    let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &crt,
            "-extfile",
            &cnf,
        ],
    );
}

impl Pki {
    /// Makes the CAs and certificates.
    #[track_caller]
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        ca(d, "ca");
        leaf(
            d,
            "server",
            "ca",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        );
        ca(d, "client-ca");
        leaf(
            d,
            "client",
            "client-ca",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
        );
        Pki { dir: Arc::new(dir) }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA that signed the server certificate (PEM).
    pub fn ca(&self) -> PathBuf {
        self.path("ca.crt")
    }

    /// The server certificate and key.
    pub fn server(&self) -> (PathBuf, PathBuf) {
        (self.path("server.crt"), self.path("server.key"))
    }

    /// The CA that signed the client certificate.
    pub fn client_ca(&self) -> PathBuf {
        self.path("client-ca.crt")
    }

    /// The client certificate and key.
    pub fn client(&self) -> (PathBuf, PathBuf) {
        (self.path("client.crt"), self.path("client.key"))
    }

    /// Writes a certs.d directory for `host` under `base`, as Docker lays it out: `ca.crt`, and
    /// with `client`, `client.cert` + `client.key`.
    pub fn certs_d(&self, base: &Path, host: &str, client: bool) -> PathBuf {
        let dir = base.join(host);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(self.ca(), dir.join("ca.crt")).unwrap();
        if client {
            let (c, k) = self.client();
            std::fs::copy(c, dir.join("client.cert")).unwrap();
            std::fs::copy(k, dir.join("client.key")).unwrap();
        }
        dir
    }

    /// An HTTP client trusting only this CA, presenting the client certificate.
    pub fn http(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(self.ca()).unwrap()).unwrap();
        let (c, k) = self.client();
        let mut pem = std::fs::read(c).unwrap();
        pem.extend(std::fs::read(k).unwrap());
        reqwest::Client::builder()
            .tls_certs_only([ca])
            .identity(reqwest::Identity::from_pem(&pem).unwrap())
            .build()
            .unwrap()
    }
}

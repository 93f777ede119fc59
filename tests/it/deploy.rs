//! The deployment files: `Dockerfile`, `.dockerignore` and `deploy/` (Kubernetes, compose, systemd).
//! No Docker engine or cluster runs here, so these check what can be checked without one: the files
//! parse, and the values that must agree across them (ports, paths, users, probes, timeouts) do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize as _;
use serde_norway::Value;

/// The default of `MIRROR_SHUTDOWN_GRACE`, in seconds.
const DEFAULT_SHUTDOWN_GRACE: u64 = 30;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[track_caller]
fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every document of a YAML file, empty ones (a trailing `---`) left out.
#[track_caller]
fn documents(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
}

#[track_caller]
fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {v:?}"))
}

#[track_caller]
fn seq<'a>(v: &'a Value, what: &str) -> &'a [Value] {
    v.as_sequence()
        .unwrap_or_else(|| panic!("{what} is not a list: {v:?}"))
}

/// A mapping of strings (ConfigMap `data`, compose `environment`), numbers and booleans as text.
#[track_caller]
fn string_map(v: &Value, what: &str) -> BTreeMap<String, String> {
    v.as_mapping()
        .unwrap_or_else(|| panic!("{what} is not a mapping: {v:?}"))
        .iter()
        .map(|(k, v)| {
            let value = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => panic!("{what}: {k:?} is not a scalar: {other:?}"),
            };
            (str_of(k, what).to_string(), value)
        })
        .collect()
}

/// The port of a `host:port` listen address.
#[track_caller]
fn port_of(listen: &str) -> u16 {
    let (_, port) = listen
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{listen:?} has no port"));
    port.parse()
        .unwrap_or_else(|_| panic!("{listen:?}: bad port"))
}

/// The directory holding a database path (`/data/mirror-mirror.db` → `/data`).
#[track_caller]
fn dir_of(path: &str) -> &str {
    let path = path.strip_prefix("sqlite://").unwrap_or(path);
    assert!(path.starts_with('/'), "{path:?} is not absolute");
    path.rsplit_once('/').map(|(d, _)| d).unwrap()
}

/// `word` occurs in `text` as a whole word (so `MIRROR_WORKER` is not found in `MIRROR_WORKERS`).
fn mentions(text: &str, word: &str) -> bool {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word).any(|(i, _)| {
        !text[..i].chars().next_back().is_some_and(is_word)
            && !text[i + word.len()..].chars().next().is_some_and(is_word)
    })
}

/// Settings every deployment passes must be ones the README documents (catches typos, which the
/// service would silently ignore).
#[track_caller]
fn assert_documented<'a>(keys: impl IntoIterator<Item = &'a str>, file: &str) {
    let readme = read("README.md");
    for key in keys {
        assert!(
            mentions(&readme, key),
            "{file} sets {key}, which README.md does not document"
        );
    }
}

// ---- YAML -------------------------------------------------------------------------------------------

#[test]
fn every_yaml_file_under_deploy_parses() {
    let mut files = Vec::new();
    yaml_files(&root().join("deploy"), &mut files);
    files.sort();
    for expected in [
        "deploy/compose.yaml",
        "deploy/kubernetes/kustomization.yaml",
        "deploy/kubernetes/deployment.yaml",
        "deploy/kubernetes/service.yaml",
        "deploy/kubernetes/pvc.yaml",
        "deploy/kubernetes/configmap.yaml",
        "deploy/kubernetes/secret.example.yaml",
        "deploy/compose.postgres.yaml",
        "deploy/kubernetes/postgres/kustomization.yaml",
        "deploy/kubernetes/postgres/deployment.yaml",
        "deploy/kubernetes/postgres/pdb.yaml",
        "deploy/kubernetes/postgres/service.yaml",
        "deploy/kubernetes/postgres/configmap.yaml",
        "deploy/kubernetes/postgres/secret.example.yaml",
    ] {
        assert!(
            files.contains(&root().join(expected)),
            "{expected} is missing"
        );
    }
    for file in &files {
        let docs = documents(file);
        assert!(!docs.is_empty(), "{} has no document", file.display());
        for doc in &docs {
            assert!(
                doc.is_mapping(),
                "{}: a document is not a mapping",
                file.display()
            );
            if file.starts_with(root().join("deploy/kubernetes")) {
                assert!(
                    doc["apiVersion"].is_string() && doc["kind"].is_string(),
                    "{}: a document without apiVersion and kind",
                    file.display()
                );
                if doc["kind"] != "Kustomization" {
                    str_of(&doc["metadata"]["name"], "metadata.name");
                }
            }
        }
    }
}

// ---- Kubernetes -------------------------------------------------------------------------------------

/// The SQLite mode's manifests (one replica).
const SQLITE_MANIFESTS: &str = "deploy/kubernetes";
/// The PostgreSQL mode's manifests (three replicas on one database).
const POSTGRES_MANIFESTS: &str = "deploy/kubernetes/postgres";

/// Every object in one directory of manifests (not its subdirectories: each is a mode of its own).
struct Cluster {
    dir: &'static str,
    objects: Vec<(String, Value)>,
}

impl Cluster {
    /// The SQLite mode.
    fn load() -> Self {
        Self::load_dir(SQLITE_MANIFESTS)
    }

    fn load_dir(dir: &'static str) -> Self {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.is_file()
                    && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            })
            .collect();
        files.sort();
        let objects = files
            .iter()
            .flat_map(|f| {
                let name = f.file_name().unwrap().to_string_lossy().into_owned();
                documents(f).into_iter().map(move |d| (name.clone(), d))
            })
            .collect();
        Cluster { dir, objects }
    }

    #[track_caller]
    fn get(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .map(|(_, o)| o)
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} named {name} in {}", self.dir))
    }

    #[track_caller]
    fn only(&self, kind: &str) -> &Value {
        let all: Vec<_> = self
            .objects
            .iter()
            .filter(|(_, o)| o["kind"] == kind)
            .collect();
        assert_eq!(all.len(), 1, "expected one {kind} in {}", self.dir);
        &all[0].1
    }

    fn deployment(&self) -> &Value {
        self.only("Deployment")
    }

    #[track_caller]
    fn container(&self) -> &Value {
        let containers = seq(
            &self.deployment()["spec"]["template"]["spec"]["containers"],
            "containers",
        );
        containers
            .iter()
            .find(|c| c["name"] == "mirror-mirror")
            .expect("a container named mirror-mirror")
    }

    /// The ConfigMap the container takes its environment from.
    #[track_caller]
    fn settings(&self) -> BTreeMap<String, String> {
        let name = seq(&self.container()["envFrom"], "envFrom")
            .iter()
            .find_map(|e| e["configMapRef"]["name"].as_str())
            .expect("envFrom a ConfigMap");
        string_map(&self.get("ConfigMap", name)["data"], "ConfigMap data")
    }

    /// The Secret the container takes its environment from (from secret.example.yaml).
    #[track_caller]
    fn secrets(&self) -> BTreeMap<String, String> {
        let name = seq(&self.container()["envFrom"], "envFrom")
            .iter()
            .find_map(|e| e["secretRef"]["name"].as_str())
            .expect("envFrom a Secret");
        string_map(&self.get("Secret", name)["stringData"], "Secret stringData")
    }

    /// `MIRROR_SHUTDOWN_GRACE` as the ConfigMap sets it, or its default.
    fn shutdown_grace(&self) -> u64 {
        self.settings()
            .get("MIRROR_SHUTDOWN_GRACE")
            .map_or(DEFAULT_SHUTDOWN_GRACE, |g| g.parse().unwrap())
    }

    /// A container port by name or number, as its number.
    #[track_caller]
    fn container_port(&self, port: &Value) -> u64 {
        let ports = seq(&self.container()["ports"], "container ports");
        let found = match port {
            Value::Number(n) => ports
                .iter()
                .find(|p| p["containerPort"].as_u64() == n.as_u64()),
            Value::String(name) => ports.iter().find(|p| p["name"] == name.as_str()),
            other => panic!("port {other:?}"),
        };
        found
            .unwrap_or_else(|| panic!("port {port:?} is not one of the container's"))["containerPort"]
            .as_u64()
            .unwrap()
    }

    /// The mount path of the volume matching `pick`.
    #[track_caller]
    fn mount_of(&self, what: &str, pick: impl Fn(&Value) -> bool) -> String {
        let volumes = seq(
            &self.deployment()["spec"]["template"]["spec"]["volumes"],
            "volumes",
        );
        let volume = volumes
            .iter()
            .find(|v| pick(v))
            .unwrap_or_else(|| panic!("no volume for {what}"));
        let mounts = seq(&self.container()["volumeMounts"], "volumeMounts");
        let mount = mounts
            .iter()
            .find(|m| m["name"] == volume["name"])
            .unwrap_or_else(|| panic!("the {what} volume is not mounted"));
        str_of(&mount["mountPath"], "mountPath").to_string()
    }
}

#[test]
fn kubernetes_runs_one_replica_with_probes_on_the_service_port() {
    let k = Cluster::load();
    let deployment = k.deployment();
    assert_eq!(
        deployment["spec"]["replicas"].as_u64(),
        Some(1),
        "SQLite has one writer"
    );
    assert_eq!(
        deployment["spec"]["strategy"]["type"], "Recreate",
        "a rolling update would run two writers"
    );
    assert_serves_on_one_port(&k);
}

/// The pod is what the Deployment and the Service select; one port is where `MIRROR_LISTEN`
/// listens, where the Service sends traffic and where the probes look; the container runs `serve`.
#[track_caller]
fn assert_serves_on_one_port(k: &Cluster) {
    let deployment = k.deployment();
    let labels = deployment["spec"]["template"]["metadata"]["labels"]
        .as_mapping()
        .expect("pod labels");
    for selector in [
        &deployment["spec"]["selector"]["matchLabels"],
        &k.get("Service", "mirror-mirror")["spec"]["selector"],
    ]
    .into_iter()
    .chain(
        k.objects
            .iter()
            .filter(|(_, o)| o["kind"] == "PodDisruptionBudget")
            .map(|(_, o)| &o["spec"]["selector"]["matchLabels"]),
    ) {
        let selector = selector.as_mapping().expect("a selector");
        assert!(!selector.is_empty());
        for (key, value) in selector {
            assert_eq!(labels.get(key), Some(value), "the pod lacks label {key:?}");
        }
    }

    // One port: where MIRROR_LISTEN listens, where the Service sends traffic, where the probes look.
    let settings = k.settings();
    let listen = &settings["MIRROR_LISTEN"];
    assert!(
        listen.starts_with("0.0.0.0:") || listen.starts_with("[::]:"),
        "MIRROR_LISTEN {listen} must take traffic from outside the pod"
    );
    let port = u64::from(port_of(listen));
    let service_ports = seq(
        &k.get("Service", "mirror-mirror")["spec"]["ports"],
        "Service ports",
    );
    assert!(!service_ports.is_empty());
    for p in service_ports {
        assert_eq!(
            k.container_port(&p["targetPort"]),
            port,
            "Service targetPort"
        );
    }

    let container = k.container();
    let probe = |name: &str| {
        let get = &container[name]["httpGet"];
        assert_eq!(k.container_port(&get["port"]), port, "{name} port");
        str_of(&get["path"], name).to_string()
    };
    assert_eq!(probe("livenessProbe"), "/healthz");
    assert_eq!(probe("readinessProbe"), "/readyz");
    if !container["startupProbe"].is_null() {
        assert_eq!(probe("startupProbe"), "/healthz");
    }

    // It runs the service (the image's ENTRYPOINT is the binary).
    assert!(
        container["command"].is_null(),
        "keep the image's ENTRYPOINT"
    );
    let args: Vec<_> = seq(&container["args"], "args")
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    assert_eq!(args.first(), Some(&"serve"));
}

#[test]
fn kubernetes_keeps_the_database_on_the_claim_and_credentials_where_docker_config_points() {
    let k = Cluster::load();
    let settings = k.settings();

    let claim = k.only("PersistentVolumeClaim");
    let claim_name = str_of(&claim["metadata"]["name"], "PVC name");
    assert!(
        seq(&claim["spec"]["accessModes"], "accessModes").contains(&Value::from("ReadWriteOnce")),
        "one node writes the SQLite file"
    );
    let data = k.mount_of("the database", |v| {
        v["persistentVolumeClaim"]["claimName"] == claim_name
    });
    assert_eq!(
        dir_of(&settings["MIRROR_DATABASE"]),
        data,
        "MIRROR_DATABASE must be on the PersistentVolumeClaim"
    );

    // The Docker config Secret appears as $DOCKER_CONFIG/config.json.
    let docker_config = &settings["DOCKER_CONFIG"];
    let mount = k.mount_of("the Docker config", |v| {
        v["secret"]["items"]
            .as_sequence()
            .is_some_and(|items| items.iter().any(|i| i["path"] == "config.json"))
    });
    assert_eq!(&mount, docker_config);
    let volumes = seq(
        &k.deployment()["spec"]["template"]["spec"]["volumes"],
        "volumes",
    );
    let secret = volumes
        .iter()
        .find(|v| !v["secret"].is_null())
        .map(|v| &v["secret"])
        .unwrap();
    let auth = k.get("Secret", str_of(&secret["secretName"], "secretName"));
    assert_eq!(auth["type"], "kubernetes.io/dockerconfigjson");
    let key = str_of(&secret["items"][0]["key"], "item key");
    let json: serde_json::Value =
        serde_json::from_str(str_of(&auth["stringData"][key], "the Docker config"))
            .expect("the example Docker config is JSON");
    assert!(json["auths"].is_object(), "a Docker config has auths");

    // With a read-only root, SQLite's temporary files need a writable /tmp.
    let tmp = k.mount_of("/tmp", |v| !v["emptyDir"].is_null());
    assert_eq!(tmp, "/tmp");
}

#[test]
fn kubernetes_runs_unprivileged_and_stops_within_the_grace() {
    let k = Cluster::load();
    let pod = &k.deployment()["spec"]["template"]["spec"];
    assert_unprivileged(&k);
    assert_eq!(
        pod["securityContext"]["fsGroup"].as_u64(),
        pod["securityContext"]["runAsUser"].as_u64(),
        "the volume must be writable by the user"
    );
    let termination = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        termination > k.shutdown_grace(),
        "the pod is killed after {termination}s, before the {}s shutdown grace ends",
        k.shutdown_grace()
    );
}

/// Non-root as the image's user, read-only, no capabilities, memory bounded.
#[track_caller]
fn assert_unprivileged(k: &Cluster) {
    let pod = &k.deployment()["spec"]["template"]["spec"];
    let ctx = &pod["securityContext"];
    assert_eq!(ctx["runAsNonRoot"].as_bool(), Some(true));
    let uid = ctx["runAsUser"].as_u64().expect("runAsUser");
    assert_ne!(uid, 0);
    assert_eq!(
        uid,
        u64::from(Dockerfile::load().runtime_uid()),
        "the image's user"
    );

    let c = &k.container()["securityContext"];
    assert_eq!(c["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(c["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert!(seq(&c["capabilities"]["drop"], "capabilities.drop").contains(&Value::from("ALL")));

    let resources = &k.container()["resources"];
    for key in ["requests", "limits"] {
        assert!(
            !resources[key]["memory"].is_null(),
            "resources.{key}.memory"
        );
    }
}

#[test]
fn kubernetes_settings_are_documented_and_secrets_stay_in_the_secret() {
    let k = Cluster::load();
    for required in ["MIRROR_TARGET", "MIRROR_DATABASE", "MIRROR_LISTEN"] {
        assert!(
            k.settings().contains_key(required),
            "ConfigMap lacks {required}"
        );
    }
    assert_settings_documented_and_secrets_apart(&k);
}

/// Every setting is one the README documents; tokens and secrets are in the Secret only.
#[track_caller]
fn assert_settings_documented_and_secrets_apart(k: &Cluster) {
    let settings = k.settings();
    let secrets = k.secrets();
    let env: Vec<String> = k.container()["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|e| str_of(&e["name"], "env name").to_string())
        .collect();
    assert_documented(
        settings
            .keys()
            .chain(secrets.keys())
            .chain(&env)
            .map(String::as_str),
        k.dir,
    );
    assert!(secrets.contains_key("MIRROR_API_TOKENS"));
    for secret in [
        "MIRROR_API_TOKENS",
        "MIRROR_GITHUB_WEBHOOK_SECRETS",
        "MIRROR_NOTIFY_SECRET",
    ] {
        assert!(
            !settings.contains_key(secret),
            "{secret} belongs in the Secret, not the ConfigMap"
        );
    }
    // The service refuses to start with a notice secret and no URL.
    assert_eq!(
        secrets.contains_key("MIRROR_NOTIFY_SECRET"),
        settings.contains_key("MIRROR_NOTIFY_URL"),
        "MIRROR_NOTIFY_SECRET and MIRROR_NOTIFY_URL go together"
    );
    for (key, value) in &secrets {
        if key == "MIRROR_API_TOKENS" {
            for token in value.split(',') {
                let token = token.split_once('=').map_or(token, |(_, t)| t);
                assert!(token.len() >= 16, "example token {token:?} is too short");
            }
        }
    }
}

#[test]
fn kustomization_lists_every_manifest_but_the_example_secrets() {
    assert_kustomization_renders(
        &Cluster::load(),
        &[
            "ConfigMap",
            "PersistentVolumeClaim",
            "Deployment",
            "Service",
        ],
    );
}

/// The kustomization of `k.dir` lists every manifest there but the examples, sets the
/// Deployment's image, and (when kubectl is installed) renders `kinds` and no Secret.
#[track_caller]
fn assert_kustomization_renders(k: &Cluster, kinds: &[&str]) {
    let dir = root().join(k.dir);
    let kustomization = &documents(&dir.join("kustomization.yaml"))[0];
    let mut listed: Vec<_> = seq(&kustomization["resources"], "resources")
        .iter()
        .map(|r| str_of(r, "resource").to_string())
        .collect();
    listed.sort();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml" && !f.contains("example"))
        .collect();
    files.sort();
    assert_eq!(listed, files);
    assert!(
        seq(&kustomization["images"], "images")
            .iter()
            .any(|i| i["name"] == k.container()["image"]),
        "kustomization sets the Deployment's image"
    );

    // kubectl renders it offline, when installed.
    match Command::new("kubectl")
        .args(["kustomize"])
        .arg(&dir)
        .output()
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("kubectl is not installed: kustomize rendering not checked");
        }
        Err(e) => panic!("running kubectl: {e}"),
        Ok(out) => {
            assert!(
                out.status.success(),
                "kubectl kustomize: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let rendered = String::from_utf8(out.stdout).unwrap();
            let rendered: Vec<String> = serde_norway::Deserializer::from_str(&rendered)
                .map(|d| {
                    Value::deserialize(d).unwrap()["kind"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect();
            for kind in kinds {
                assert!(
                    rendered.iter().any(|k| k == kind),
                    "{kind} not rendered: {rendered:?}"
                );
            }
            assert!(
                !rendered.iter().any(|k| k == "Secret"),
                "placeholders must not ship"
            );
        }
    }
}

// ---- Kubernetes, PostgreSQL mode ------------------------------------------------------------------

/// Whether the service opens `location` with PostgreSQL (what `Store::open` checks).
fn is_postgres_url(location: &str) -> bool {
    location.starts_with("postgres://") || location.starts_with("postgresql://")
}

#[test]
fn kubernetes_postgres_runs_three_replicas_that_roll_one_at_a_time() {
    let k = Cluster::load_dir(POSTGRES_MANIFESTS);
    let spec = &k.deployment()["spec"];
    let replicas = spec["replicas"].as_u64().expect("replicas");
    assert_eq!(replicas, 3);
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");
    let rolling = &spec["strategy"]["rollingUpdate"];
    assert_eq!(
        rolling["maxUnavailable"].as_u64(),
        Some(0),
        "a replica stops only after its replacement is ready"
    );
    assert_eq!(
        rolling["maxSurge"].as_u64(),
        Some(1),
        "one new pod at a time"
    );

    // Voluntary disruptions leave two replicas up; the budget can be met (below the replicas).
    let pdb = k.only("PodDisruptionBudget");
    assert_eq!(pdb["apiVersion"], "policy/v1");
    let min = pdb["spec"]["minAvailable"].as_u64().expect("minAvailable");
    assert_eq!(min, 2);
    assert!(min < replicas, "minAvailable {min} would block every drain");

    // Probes, ports, labels (the PDB selects the pods too), `serve`.
    assert_serves_on_one_port(&k);
    let readiness = &k.container()["readinessProbe"];
    assert!(
        readiness["periodSeconds"].as_u64().unwrap_or(10)
            * readiness["failureThreshold"].as_u64().unwrap_or(3)
            <= 15,
        "a replica that cannot reach the database leaves the Service within 15 s"
    );
}

#[test]
fn kubernetes_postgres_takes_the_database_url_from_a_secret_and_keeps_nothing_on_disk() {
    let k = Cluster::load_dir(POSTGRES_MANIFESTS);
    assert!(
        !k.settings().contains_key("MIRROR_DATABASE"),
        "the URL holds a password: not in the ConfigMap"
    );
    assert!(
        !k.secrets().contains_key("MIRROR_DATABASE"),
        "MIRROR_DATABASE comes from its own Secret key (env), not from envFrom"
    );
    let env = seq(&k.container()["env"], "env");
    let database: Vec<_> = env
        .iter()
        .filter(|e| e["name"] == "MIRROR_DATABASE")
        .collect();
    assert_eq!(database.len(), 1, "MIRROR_DATABASE set once");
    let from = &database[0]["valueFrom"]["secretKeyRef"];
    let secret = k.get("Secret", str_of(&from["name"], "secretKeyRef.name"));
    let url = str_of(
        &secret["stringData"][str_of(&from["key"], "secretKeyRef.key")],
        "the database URL",
    );
    assert!(
        is_postgres_url(url),
        "{url} would open SQLite, one file per pod"
    );
    url::Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));

    // No claim, no volume but the Docker config and /tmp.
    assert!(
        !k.objects
            .iter()
            .any(|(_, o)| o["kind"] == "PersistentVolumeClaim"),
        "a ReadWriteOnce claim would pin every replica to one node"
    );
    let volumes = seq(
        &k.deployment()["spec"]["template"]["spec"]["volumes"],
        "volumes",
    );
    assert!(
        volumes.iter().all(|v| v["persistentVolumeClaim"].is_null()),
        "no claim"
    );
    let mount = k.mount_of("the Docker config", |v| {
        v["secret"]["items"]
            .as_sequence()
            .is_some_and(|items| items.iter().any(|i| i["path"] == "config.json"))
    });
    assert_eq!(mount, k.settings()["DOCKER_CONFIG"]);
    assert_eq!(k.mount_of("/tmp", |v| !v["emptyDir"].is_null()), "/tmp");
    assert_eq!(
        k.get("Secret", "mirror-mirror-registry-auth")["type"],
        "kubernetes.io/dockerconfigjson"
    );
}

#[test]
fn kubernetes_postgres_drains_before_it_stops_and_is_killed_only_after_the_grace() {
    let k = Cluster::load_dir(POSTGRES_MANIFESTS);
    assert_unprivileged(&k);
    // SIGTERM closes the listener at once (axum's graceful shutdown): the preStop pause keeps the
    // pod answering while endpoints forget it.
    let command: Vec<&str> = seq(
        &k.container()["lifecycle"]["preStop"]["exec"]["command"],
        "preStop.exec.command",
    )
    .iter()
    .map(|c| str_of(c, "command"))
    .collect();
    let pause = match command.as_slice() {
        ["sleep", n] => seconds(n),
        other => panic!("preStop {other:?}: expected [\"sleep\", N]"),
    };
    assert!(
        pause >= 5,
        "a {pause}s pause is shorter than endpoint propagation"
    );
    // Then serve gives copies MIRROR_SHUTDOWN_GRACE, and up to 10 s more to put back the jobs it
    // could not finish (src/serve.rs); the kubelet's clock runs from the preStop hook.
    let needed = pause + k.shutdown_grace() + 10;
    let termination = k.deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        termination > needed,
        "killed after {termination}s, before the {pause}s pause, the {}s grace and 10 s of requeueing end",
        k.shutdown_grace()
    );
}

#[test]
fn kubernetes_postgres_settings_are_documented_and_secrets_stay_in_secrets() {
    let k = Cluster::load_dir(POSTGRES_MANIFESTS);
    for required in ["MIRROR_TARGET", "MIRROR_LISTEN"] {
        assert!(
            k.settings().contains_key(required),
            "ConfigMap lacks {required}"
        );
    }
    assert_settings_documented_and_secrets_apart(&k);
    // The same Service in both modes: switching keeps the address clients use.
    assert_eq!(
        k.get("Service", "mirror-mirror")["spec"],
        Cluster::load().get("Service", "mirror-mirror")["spec"]
    );
}

#[test]
fn kustomization_of_the_postgres_mode_lists_every_manifest_but_the_example_secrets() {
    assert_kustomization_renders(
        &Cluster::load_dir(POSTGRES_MANIFESTS),
        &["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"],
    );
}

// ---- compose ----------------------------------------------------------------------------------------

#[test]
fn compose_runs_the_service_next_to_a_local_registry() {
    let compose = &documents(&root().join("deploy/compose.yaml"))[0];
    let services = compose["services"].as_mapping().expect("services");
    let (registry_name, registry) = services
        .iter()
        .find(|(_, s)| {
            s["image"]
                .as_str()
                .is_some_and(|i| i == "registry:2" || i.starts_with("registry:2."))
        })
        .expect("a registry:2 service");
    let registry_name = str_of(registry_name, "service name");
    assert!(
        !registry["volumes"].is_null(),
        "the registry keeps its data"
    );

    let service = &compose["services"]["mirror-mirror"];
    assert!(service.is_mapping(), "a mirror-mirror service");
    // Built from the repository's Dockerfile.
    let context = root()
        .join("deploy")
        .join(str_of(&service["build"]["context"], "build.context"));
    let dockerfile = service["build"]["dockerfile"]
        .as_str()
        .unwrap_or("Dockerfile");
    assert_eq!(
        context.join(dockerfile).canonicalize().unwrap(),
        root().join("Dockerfile").canonicalize().unwrap()
    );

    let env = string_map(&service["environment"], "environment");
    assert_documented(env.keys().map(String::as_str), "deploy/compose.yaml");
    let target = &env["MIRROR_TARGET"];
    let target_host = target.split('/').next().unwrap();
    assert_eq!(
        target_host.split(':').next(),
        Some(registry_name),
        "mirrors go to the local registry"
    );
    assert!(
        env["MIRROR_INSECURE_REGISTRIES"]
            .split(',')
            .any(|h| h == target_host),
        "the local registry speaks plain HTTP and is not on loopback"
    );
    assert_eq!(port_of(&env["MIRROR_LISTEN"]), 8080);
    assert!(
        seq(&service["ports"], "ports")
            .iter()
            .any(|p| str_of(p, "port").ends_with(":8080")),
        "the API is published"
    );

    // The database is on a named volume.
    let data_dir = dir_of(&env["MIRROR_DATABASE"]);
    let volume = seq(&service["volumes"], "volumes")
        .iter()
        .map(|v| str_of(v, "volume"))
        .find_map(|v| v.strip_suffix(&format!(":{data_dir}")))
        .unwrap_or_else(|| panic!("no volume on {data_dir}"));
    assert!(
        compose["volumes"].get(volume).is_some(),
        "volume {volume} is declared"
    );

    let grace: u64 = env
        .get("MIRROR_SHUTDOWN_GRACE")
        .map_or(DEFAULT_SHUTDOWN_GRACE, |g| g.parse().unwrap());
    let stop = str_of(&service["stop_grace_period"], "stop_grace_period");
    assert!(
        seconds(stop) > grace,
        "stop_grace_period {stop} must exceed the {grace}s shutdown grace"
    );
}

#[test]
fn compose_postgres_runs_replicas_on_one_database_next_to_a_local_registry() {
    let compose = &documents(&root().join("deploy/compose.postgres.yaml"))[0];
    let services = compose["services"].as_mapping().expect("services");
    let (pg_name, pg) = services
        .iter()
        .find(|(_, s)| {
            s["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("postgres:"))
        })
        .expect("a postgres service");
    let pg_name = str_of(pg_name, "service name");
    let pg_env = string_map(&pg["environment"], "postgres environment");
    assert!(
        pg["volumes"].as_sequence().is_some_and(|v| v
            .iter()
            .any(|v| str_of(v, "volume").ends_with(":/var/lib/postgresql/data"))),
        "PostgreSQL keeps its data on a volume"
    );
    assert!(
        pg["healthcheck"]["test"].as_sequence().is_some_and(|t| t
            .iter()
            .any(|a| a.as_str().is_some_and(|a| a.contains("pg_isready")))),
        "a health check the service can wait on"
    );

    let service = &compose["services"]["mirror-mirror"];
    assert_eq!(
        service["depends_on"][pg_name]["condition"], "service_healthy",
        "the replicas start once PostgreSQL takes connections"
    );
    let context = root()
        .join("deploy")
        .join(str_of(&service["build"]["context"], "build.context"));
    assert_eq!(
        context
            .join(
                service["build"]["dockerfile"]
                    .as_str()
                    .unwrap_or("Dockerfile")
            )
            .canonicalize()
            .unwrap(),
        root().join("Dockerfile").canonicalize().unwrap()
    );
    let env = string_map(&service["environment"], "environment");
    assert_documented(
        env.keys().map(String::as_str),
        "deploy/compose.postgres.yaml",
    );

    // The URL names the postgres service, its user and its database.
    let database = &env["MIRROR_DATABASE"];
    assert!(is_postgres_url(database), "{database}");
    let url = url::Url::parse(&database.replace("${POSTGRES_PASSWORD}", "pw")).unwrap();
    assert_eq!(url.host_str(), Some(pg_name));
    assert_eq!(url.username(), pg_env["POSTGRES_USER"]);
    assert_eq!(url.path().trim_start_matches('/'), pg_env["POSTGRES_DB"]);
    assert!(
        pg_env["POSTGRES_PASSWORD"].contains("POSTGRES_PASSWORD")
            && database.contains("${POSTGRES_PASSWORD}"),
        "one password, from the environment, in both"
    );
    assert!(
        service["volumes"].is_null(),
        "nothing of the service's is on disk"
    );

    // Several replicas, each published on its own host port.
    let replicas = service["deploy"]["replicas"].as_u64().unwrap_or(1);
    assert!(replicas >= 2, "{replicas} replica(s)");
    let port = port_of(&env["MIRROR_LISTEN"]);
    let published = seq(&service["ports"], "ports")
        .iter()
        .map(|p| str_of(p, "port"))
        .find(|p| p.ends_with(&format!(":{port}")))
        .expect("the API is published");
    let host_ports = published.rsplit(':').nth(1).unwrap();
    let (low, high) = host_ports.split_once('-').expect("a host port range");
    let span = high.parse::<u64>().unwrap() - low.parse::<u64>().unwrap() + 1;
    assert_eq!(span, replicas, "one host port per replica: {published}");

    // The target registry, as in compose.yaml.
    let target_host = env["MIRROR_TARGET"].split('/').next().unwrap().to_string();
    let registry = &compose["services"][target_host.split(':').next().unwrap()];
    assert!(
        registry["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("registry:2")),
        "mirrors go to the local registry"
    );
    assert!(
        env["MIRROR_INSECURE_REGISTRIES"]
            .split(',')
            .any(|h| h == target_host)
    );

    let grace: u64 = env
        .get("MIRROR_SHUTDOWN_GRACE")
        .map_or(DEFAULT_SHUTDOWN_GRACE, |g| g.parse().unwrap());
    let drain: u64 = env
        .get("MIRROR_SHUTDOWN_DRAIN")
        .map_or(0, |d| d.parse().unwrap());
    let stop = seconds(str_of(&service["stop_grace_period"], "stop_grace_period"));
    assert!(
        stop > drain + grace + 10,
        "stop_grace_period {stop}s must exceed the {drain}s drain, the {grace}s grace and the 10 s of requeueing"
    );
}

/// `45`, `45s`, `1m30s`, `2min` → seconds.
#[track_caller]
fn seconds(text: &str) -> u64 {
    let mut total = 0;
    let mut number = String::new();
    let mut unit = String::new();
    let mut flush = |number: &mut String, unit: &mut String| {
        if number.is_empty() {
            return;
        }
        let n: u64 = number.parse().unwrap();
        total += n * match unit.as_str() {
            "" | "s" | "sec" => 1,
            "m" | "min" => 60,
            "h" => 3600,
            other => panic!("{text:?}: unit {other:?}"),
        };
        number.clear();
        unit.clear();
    };
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            if !unit.is_empty() {
                flush(&mut number, &mut unit);
            }
            number.push(c);
        } else if !c.is_whitespace() {
            unit.push(c);
        }
    }
    flush(&mut number, &mut unit);
    assert!(total > 0, "{text:?} is no duration");
    total
}

// ---- Dockerfile -------------------------------------------------------------------------------------

/// One instruction, continuation lines joined and comments dropped.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
}

/// A build stage: its `FROM` arguments and instructions.
#[derive(Debug)]
struct Stage {
    image: String,
    name: Option<String>,
    body: Vec<Instruction>,
}

impl Stage {
    fn all(&self, keyword: &'static str) -> impl Iterator<Item = &str> {
        self.body
            .iter()
            .filter(move |i| i.keyword == keyword)
            .map(|i| i.args.as_str())
    }

    #[track_caller]
    fn last(&self, keyword: &'static str) -> &str {
        self.all(keyword)
            .last()
            .unwrap_or_else(|| panic!("no {keyword} in stage {:?}", self.name))
    }

    /// `ENV` values set in this stage (`K=V` pairs, one or several per line).
    fn env(&self) -> BTreeMap<String, String> {
        self.all("ENV")
            .flat_map(|args| args.split_whitespace())
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect()
    }
}

/// `COPY`/`ADD` arguments: the flags and the paths (sources, then the destination), sources without
/// a leading `./` or trailing `/`.
fn copy_args(args: &str) -> (Vec<&str>, Vec<String>) {
    let (flags, rest): (Vec<&str>, Vec<&str>) =
        args.split_whitespace().partition(|a| a.starts_with("--"));
    let rest = rest.join(" ");
    let mut paths: Vec<String> = if rest.trim_start().starts_with('[') {
        serde_json::from_str(&rest).expect("COPY in JSON form")
    } else {
        rest.split_whitespace().map(str::to_string).collect()
    };
    let last = paths.len().saturating_sub(1);
    for source in &mut paths[..last] {
        let clean = source.trim_start_matches("./").trim_end_matches('/');
        *source = if clean.is_empty() {
            ".".into()
        } else {
            clean.into()
        };
    }
    (flags, paths)
}

/// The argv of an exec-form (JSON) `ENTRYPOINT`/`CMD`.
#[track_caller]
fn exec_form(args: &str, what: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|_| {
        panic!("{what} must be in exec form (JSON), so signals reach the binary")
    })
}

struct Dockerfile {
    stages: Vec<Stage>,
}

impl Dockerfile {
    fn load() -> Self {
        Self::parse(&read("Dockerfile"))
    }

    fn parse(text: &str) -> Self {
        let mut logical = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('#') || (trimmed.is_empty() && !current.is_empty()) {
                continue; // comments and blank lines, also inside a continued instruction
            }
            if let Some(head) = trimmed.strip_suffix('\\') {
                current.push_str(head);
                current.push(' ');
            } else {
                current.push_str(trimmed);
                if !current.trim().is_empty() {
                    logical.push(std::mem::take(&mut current));
                }
                current.clear();
            }
        }
        assert!(
            current.trim().is_empty(),
            "the Dockerfile ends mid-instruction"
        );

        let mut stages: Vec<Stage> = Vec::new();
        for line in logical {
            let (keyword, args) = line
                .trim()
                .split_once(char::is_whitespace)
                .unwrap_or((&line, ""));
            let keyword = keyword.to_ascii_uppercase();
            let args = args.trim().to_string();
            if keyword == "FROM" {
                let words: Vec<_> = args
                    .split_whitespace()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                let name = match words.as_slice() {
                    [_] => None,
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                    other => panic!("FROM {other:?}"),
                };
                stages.push(Stage {
                    image: words[0].to_string(),
                    name,
                    body: Vec::new(),
                });
            } else if keyword != "ARG" || !stages.is_empty() {
                stages
                    .last_mut()
                    .expect("an instruction before the first FROM")
                    .body
                    .push(Instruction { keyword, args });
            }
        }
        Dockerfile { stages }
    }

    fn runtime(&self) -> &Stage {
        self.stages.last().unwrap()
    }

    #[track_caller]
    fn stage(&self, name: &str) -> &Stage {
        self.stages
            .iter()
            .find(|s| s.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no stage named {name}"))
    }

    /// The numeric uid of the runtime stage's `USER`.
    #[track_caller]
    fn runtime_uid(&self) -> u32 {
        let user = self.runtime().last("USER");
        let uid = user.split(':').next().unwrap();
        uid.parse().unwrap_or_else(|_| {
            panic!("USER {user} is not numeric: runAsNonRoot cannot check a name")
        })
    }

    /// The runtime stage's `ENV` settings.
    fn runtime_env(&self) -> BTreeMap<String, String> {
        self.runtime().env()
    }
}

#[test]
fn dockerfile_builds_in_two_stages_and_ships_the_release_binary() {
    let d = Dockerfile::load();
    assert!(d.stages.len() >= 2, "a multi-stage build");
    let runtime = d.runtime();

    // The runtime stage copies the release binary from the builder stage.
    let (builder_name, source, dest) = runtime
        .all("COPY")
        .map(copy_args)
        .find_map(|(flags, paths)| {
            let from = flags.iter().find_map(|f| f.strip_prefix("--from="))?;
            Some((
                from.to_string(),
                paths[0].clone(),
                paths.last().unwrap().clone(),
            ))
        })
        .expect("COPY --from=<builder> in the runtime stage");
    let builder = d.stage(&builder_name);
    assert_ne!(
        builder.image, runtime.image,
        "the runtime stage carries no toolchain"
    );
    assert!(
        builder.image.starts_with("rust:"),
        "builder image {}",
        builder.image
    );
    let workdir = builder.last("WORKDIR");
    assert_eq!(
        source,
        format!(
            "{}/target/release/mirror-mirror",
            workdir.trim_end_matches('/')
        ),
        "the runtime stage ships the release build"
    );
    let builds: Vec<usize> = builder
        .body
        .iter()
        .enumerate()
        .filter(|(_, i)| i.keyword == "RUN" && i.args.contains("cargo build --release --locked"))
        .map(|(n, _)| n)
        .collect();
    assert!(!builds.is_empty(), "cargo build --release --locked");

    // The last build sees the real sources, and cannot keep a stub from an earlier build: COPY keeps
    // old modification times, so the crate roots must be touched after the sources come in.
    let last_build = *builds.last().unwrap();
    let sources_in = builder
        .body
        .iter()
        .rposition(|i| {
            i.keyword == "COPY" && copy_args(&i.args).1.iter().any(|p| p == "src" || p == ".")
        })
        .expect("the builder copies src");
    assert!(
        sources_in < last_build,
        "the last build comes after COPY src"
    );
    if builds.len() > 1 {
        let touched = builder.body[sources_in..=last_build]
            .iter()
            .any(|i| i.keyword == "RUN" && i.args.contains("touch src/main.rs src/lib.rs"));
        assert!(
            touched,
            "touch src/main.rs src/lib.rs before the last cargo build"
        );
    }

    // On PATH, for ENTRYPOINT ["mirror-mirror"].
    assert!(
        ["/usr/local/bin/mirror-mirror", "/usr/bin/mirror-mirror"].contains(&dest.as_str()),
        "binary copied to {dest}"
    );
    assert!(
        runtime.all("RUN").any(|r| r.contains("ca-certificates")),
        "CA certificates, for TLS to registries"
    );
}

#[test]
fn dockerfile_runs_serve_as_non_root_on_the_listen_port() {
    let d = Dockerfile::load();
    let runtime = d.runtime();
    assert_ne!(d.runtime_uid(), 0, "USER must not be root");

    let env = d.runtime_env();
    assert_documented(env.keys().map(String::as_str), "Dockerfile");
    let listen = env.get("MIRROR_LISTEN").expect("ENV MIRROR_LISTEN");
    assert!(
        listen.starts_with("0.0.0.0:"),
        "in a container listen on every interface, not {listen}"
    );
    let port = port_of(listen);
    let exposed: Vec<u16> = runtime
        .all("EXPOSE")
        .flat_map(|e| e.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    assert_eq!(exposed, vec![port], "EXPOSE the MIRROR_LISTEN port");

    // The database is on the volume.
    let database = env.get("MIRROR_DATABASE").expect("ENV MIRROR_DATABASE");
    let volume = runtime.last("VOLUME");
    let volumes: Vec<String> = if volume.starts_with('[') {
        serde_json::from_str(volume).unwrap()
    } else {
        volume.split_whitespace().map(str::to_string).collect()
    };
    assert!(
        volumes.iter().any(|v| v == dir_of(database)),
        "MIRROR_DATABASE {database} is not on a VOLUME ({volumes:?})"
    );

    // The health check asks /healthz, with a tool the runtime stage installs.
    let check = runtime.last("HEALTHCHECK");
    assert!(
        check.contains("CMD") && check.contains("/healthz"),
        "HEALTHCHECK {check}"
    );
    if check.contains("curl") {
        assert!(
            runtime
                .all("RUN")
                .any(|r| r.contains("install") && r.contains("curl")),
            "the HEALTHCHECK uses curl, which debian slim images lack"
        );
    }

    // ENTRYPOINT + CMD run `mirror-mirror serve`, and `serve` is a real subcommand of this binary.
    let mut argv = exec_form(runtime.last("ENTRYPOINT"), "ENTRYPOINT");
    argv.extend(exec_form(runtime.last("CMD"), "CMD"));
    assert_eq!(argv[0], "mirror-mirror");
    assert_eq!(argv.get(1).map(String::as_str), Some("serve"), "{argv:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_mirror-mirror"))
        .args(&argv[1..])
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{argv:?} --help failed");
    assert!(String::from_utf8_lossy(&out.stdout).contains("MIRROR_LISTEN"));
}

/// A `.dockerignore` pattern matches `path` or one of its parents (the subset of the syntax used:
/// `name`, `dir/`, `*.ext`, `**/` prefixes; no `!` exceptions).
fn ignored(patterns: &[String], path: &str) -> bool {
    fn glob(pattern: &str, name: &str) -> bool {
        match pattern.split_once('*') {
            None => pattern == name,
            Some((head, tail)) => {
                name.starts_with(head) && (head.len()..=name.len()).any(|i| glob(tail, &name[i..]))
            }
        }
    }
    fn matches(pattern: &[&str], path: &[&str]) -> bool {
        match (pattern.first(), path.first()) {
            (None, None) => true,
            (Some(&"**"), _) => (0..=path.len()).any(|skip| matches(&pattern[1..], &path[skip..])),
            (Some(p), Some(n)) => glob(p, n) && matches(&pattern[1..], &path[1..]),
            _ => false,
        }
    }
    let parts: Vec<&str> = path.split('/').collect();
    patterns.iter().any(|p| {
        assert!(!p.starts_with('!'), "exceptions are not handled here: {p}");
        let p: Vec<&str> = p.trim_matches('/').split('/').collect();
        (1..=parts.len()).any(|n| matches(&p, &parts[..n]))
    })
}

#[test]
fn dockerfile_copies_only_paths_that_exist_in_the_build_context() {
    let patterns: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    // The ignore file keeps the build output, the history and local databases out of the context...
    for out in [
        "target/release/mirror-mirror",
        ".git/HEAD",
        "mirror-mirror.db",
        "data/mirror-mirror.db-wal",
    ] {
        assert!(ignored(&patterns, out), ".dockerignore lets {out} in");
    }

    let d = Dockerfile::load();
    let mut copied = Vec::new();
    for stage in &d.stages {
        for args in stage.all("COPY").chain(stage.all("ADD")) {
            let (flags, paths) = copy_args(args);
            if flags.iter().any(|f| f.starts_with("--from=")) {
                continue;
            }
            for source in &paths[..paths.len() - 1] {
                assert!(
                    root().join(source).exists(),
                    "the Dockerfile copies {source}, which is not in the repository"
                );
                // ...but not what the build needs.
                assert!(
                    !ignored(&patterns, source),
                    "the Dockerfile copies {source}, which .dockerignore leaves out"
                );
                copied.push(source.clone());
            }
        }
    }
    // Everything cargo needs for the build, including what `sqlx::migrate!` embeds.
    let mut needed = vec!["Cargo.toml", "Cargo.lock", "src", "migrations"];
    for optional in ["build.rs", ".sqlx", ".cargo"] {
        if root().join(optional).exists() {
            needed.push(optional);
        }
    }
    for path in needed {
        assert!(
            copied.iter().any(|c| c == path || c == "."),
            "the Dockerfile does not copy {path}"
        );
    }
}

// ---- systemd ----------------------------------------------------------------------------------------

const UNIT: &str = "deploy/systemd/mirror-mirror.service";

/// `(section, key, value)` for every assignment of a unit file.
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut entries = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
        } else {
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{UNIT}: {line}"));
            entries.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
        }
    }
    entries
}

#[test]
fn systemd_unit_is_hardened_and_outlasts_the_shutdown_grace() {
    let text = read(UNIT);
    let entries = unit_entries(&text);
    let service = |key: &str| -> Vec<&str> {
        entries
            .iter()
            .filter(|(s, k, _)| s == "Service" && k == key)
            .map(|(_, _, v)| v.as_str())
            .collect()
    };
    let one = |key: &str| -> &str {
        let values = service(key);
        assert_eq!(values.len(), 1, "{UNIT}: {key}= {values:?}");
        values[0]
    };

    for (key, value) in [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("CapabilityBoundingSet", ""),
        ("StateDirectory", "mirror-mirror"),
        ("KillSignal", "SIGTERM"),
    ] {
        assert_eq!(one(key), value, "{UNIT}: {key}");
    }
    let mut families: Vec<_> = one("RestrictAddressFamilies").split_whitespace().collect();
    families.sort();
    assert_eq!(families, ["AF_INET", "AF_INET6", "AF_UNIX"]);
    assert!(
        service("SystemCallFilter")
            .iter()
            .any(|f| f.split_whitespace().any(|s| s == "@system-service")),
        "SystemCallFilter=@system-service"
    );
    // Its own user: allocated, or named and not root.
    let user = service("User");
    assert!(
        service("DynamicUser") == ["yes"]
            || (user.len() == 1 && user[0] != "root" && user[0] != "0"),
        "{UNIT}: DynamicUser=yes or a dedicated User="
    );
    assert!(
        one("EnvironmentFile")
            .trim_start_matches('-')
            .starts_with("/etc/mirror-mirror/")
    );

    // It runs the service, with the database in the state directory (the only writable place).
    let exec = one("ExecStart");
    assert!(
        exec.ends_with("/mirror-mirror serve") && exec.starts_with('/'),
        "ExecStart={exec}"
    );
    let environment: BTreeMap<&str, &str> = service("Environment")
        .iter()
        .filter_map(|e| e.trim_matches('"').split_once('='))
        .collect();
    assert_documented(environment.keys().copied(), UNIT);
    assert_eq!(
        dir_of(environment["MIRROR_DATABASE"]),
        "/var/lib/mirror-mirror",
        "MIRROR_DATABASE must be in StateDirectory"
    );

    // systemd waits longer than the service's own grace before SIGKILL.
    let env_example = read("deploy/systemd/env.example");
    let grace = env_example
        .lines()
        .find_map(|l| l.strip_prefix("MIRROR_SHUTDOWN_GRACE="))
        .map_or(DEFAULT_SHUTDOWN_GRACE, |g| g.trim().parse().unwrap());
    let stop = seconds(one("TimeoutStopSec"));
    assert!(
        stop > grace,
        "TimeoutStopSec={stop}s must exceed the {grace}s shutdown grace"
    );

    // The example env file: plain KEY=value lines (no `export`), documented settings only.
    let keys: Vec<&str> = env_example
        .lines()
        .map(|l| l.trim().trim_start_matches('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .filter(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .collect();
    assert!(keys.contains(&"MIRROR_TARGET") && keys.contains(&"MIRROR_API_TOKENS"));
    assert_documented(keys, "deploy/systemd/env.example");
    assert!(
        !env_example
            .lines()
            .any(|l| l.trim_start().starts_with("export "))
    );
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    // The unit as installed, but with ExecStart on this build's binary (verify checks it exists).
    let text = read(UNIT);
    assert!(text.contains("ExecStart=/usr/local/bin/mirror-mirror serve"));
    let text = text.replace(
        "ExecStart=/usr/local/bin/mirror-mirror",
        &format!("ExecStart={}", env!("CARGO_BIN_EXE_mirror-mirror")),
    );
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("mirror-mirror.service");
    std::fs::write(&unit, text).unwrap();
    let out = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("systemd-analyze is not installed: {UNIT} not verified");
            return;
        }
        other => other.expect("running systemd-analyze"),
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    // Unknown keys and bad values are only warnings (exit status 0): none about this unit.
    let complaints: Vec<_> = said
        .lines()
        .filter(|l| l.contains("mirror-mirror.service"))
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify: {complaints:#?}"
    );
}

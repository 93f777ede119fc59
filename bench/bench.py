#!/usr/bin/env python3
"""The mirror-mirror performance benchmark (issue 6); bench/run.sh builds the release binary and runs this.

Starts real CNCF distribution registries on loopback (access logs on; a fresh target registry for every
timed run), builds its own images and pushes them through the registry API, then measures, alternating
the contenders round by round:

  a) one image with a single big layer       mirror-mirror copy | skopeo copy | the wire floor
  b) an index of 3 platforms x 10 layers     mirror-mirror copy | skopeo copy | the wire floor
  c) a second copy of an image on the target  (requests counted in both registries' access logs)
  d) N small images sharing a base layer      the service (N POST /mirror at once) | a loop of skopeo copies
  e) GET /images/{name}                       wrk
  f) POST /mirror durable enqueues            wrk with a Lua script giving each request a new image
  +  peak RSS of each copier (/usr/bin/time -v) and the service's RSS growth while it mirrors a)'s image

Prints a markdown report (table, then details) on stdout and writes it to --out. Progress goes to stderr.
"""
import argparse
import concurrent.futures
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
UA = "mirror-bench"  # our own setup/check requests carry this User-Agent and are left out of counts

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ACCEPT = ",".join([
    OCI_INDEX, OCI_MANIFEST,
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
MIB = 1024 * 1024

STARTED = []  # every process we started, stopped at exit


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def spawn(cmd, out, err, env=None):
    p = subprocess.Popen(cmd, stdout=open(out, "ab"), stderr=open(err, "ab"), env=env,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    STARTED.append(p)
    return p


def stop(p, grace=10):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in STARTED:
        STARTED.remove(p)


def stop_all():
    for p in reversed(list(STARTED)):  # newest first: services before the database they use
        try:
            stop(p, grace=5)
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------
# HTTP helpers (our own requests to registries and the service)

def request(hostport, method, path, body=None, headers=None, timeout=60):
    """One request on a fresh connection: (status, headers dict lower-cased, body bytes)."""
    host, port = hostport.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=timeout, blocksize=MIB)
    h = {"User-Agent": UA}
    h.update(headers or {})
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    hdrs = {k.lower(): v for k, v in r.getheaders()}
    c.close()
    return r.status, hdrs, data


def wait_http(hostport, path, proc, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before answering")
        try:
            status, _, _ = request(hostport, "GET", path, timeout=2)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer {path} within {timeout}s")


# ---------------------------------------------------------------------------------------------
# Registries

class Registry:
    """A CNCF distribution registry on a loopback port, access log on (stdout), info log (stderr)."""

    def __init__(self, root):
        self.root = root
        os.makedirs(os.path.join(root, "storage"), exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.access = os.path.join(root, "access.log")
        with open(os.path.join(root, "config.yml"), "w") as f:
            f.write(f"""version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {root}/storage
  delete:
    enabled: true
http:
  addr: {self.host}
""")
        self.proc = spawn(["docker-registry", "serve", os.path.join(root, "config.yml")],
                          self.access, os.path.join(root, "registry.log"))
        wait_http(self.host, "/v2/", self.proc, f"docker-registry on {self.host} (log {root}/registry.log)")

    def mark(self):
        return os.path.getsize(self.access)

    def requests_since(self, offset):
        """Access-log entries written after `offset`, ours left out: [(method, path, status, ua)]."""
        time.sleep(0.3)  # the access log line is written just after the response
        out = []
        with open(self.access, "rb") as f:
            f.seek(offset)
            for line in f.read().decode(errors="replace").splitlines():
                m = re.search(r'"(\w+) (\S+) HTTP/[\d.]+" (\d{3}) \S+ "[^"]*" "([^"]*)"', line)
                if m and m.group(4) != UA:
                    out.append((m.group(1), m.group(2), int(m.group(3)), m.group(4)))
        return out

    def close(self, remove_storage=True):
        stop(self.proc)
        if remove_storage:
            shutil.rmtree(os.path.join(self.root, "storage"), ignore_errors=True)

    # pushing through the API -----------------------------------------------------------------
    def push_blob(self, repo, digest, data=None, path=None):
        status, h, _ = request(self.host, "POST", f"/v2/{repo}/blobs/uploads/")
        assert status == 202, f"POST upload: {status}"
        loc = urllib.parse.urlsplit(h["location"])
        q = loc.query + ("&" if loc.query else "") + "digest=" + digest
        if path is not None:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                status, _, body = request(self.host, "PUT", f"{loc.path}?{q}", body=f, timeout=600,
                                          headers={"Content-Type": "application/octet-stream",
                                                   "Content-Length": str(size)})
        else:
            status, _, body = request(self.host, "PUT", f"{loc.path}?{q}", body=data,
                                      headers={"Content-Type": "application/octet-stream"})
        assert status == 201, f"PUT blob {digest}: {status} {body[:200]!r}"

    def mount_blob(self, repo, digest, from_repo):
        status, _, _ = request(self.host, "POST", f"/v2/{repo}/blobs/uploads/?mount={digest}&from={from_repo}")
        assert status == 201, f"mount {digest} into {repo}: {status}"

    def put_manifest(self, repo, ref, data, media_type):
        status, _, body = request(self.host, "PUT", f"/v2/{repo}/manifests/{ref}", body=data,
                                  headers={"Content-Type": media_type})
        assert status == 201, f"PUT manifest {repo}:{ref}: {status} {body[:300]!r}"

    def digest_of(self, repo, ref):
        """What the registry serves for repo:ref (Docker-Content-Digest of a HEAD), or None."""
        status, h, _ = request(self.host, "HEAD", f"/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT})
        return h.get("docker-content-digest") if status == 200 else None


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Images

class Image:
    """An image on the source registry, and the plan the wire floor follows to copy it."""

    def __init__(self, repo, tag, digest, media_type, blobs, children):
        self.repo, self.tag, self.digest, self.media_type = repo, tag, digest, media_type
        self.blobs = blobs  # unique blob digests
        self.children = children  # [(digest, media_type)]

    def write_plan(self, path):
        with open(path, "w") as f:
            for b in self.blobs:
                f.write(f"blob {b}\n")
            for d, mt in self.children:
                f.write(f"child {d} {mt}\n")
            f.write(f"top {self.digest} {self.tag} {self.media_type}\n")


def manifest_bytes(config_desc, layer_descs):
    return json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **config_desc},
        "layers": [{"mediaType": OCI_LAYER, **d} for d in layer_descs],
    }, indent=2).encode()


def config_bytes(arch, layer_digests, note):
    return json.dumps({
        "architecture": arch, "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/true"], "Labels": {"bench": note}},
        "rootfs": {"type": "layers", "diff_ids": layer_digests},
    }).encode()


def push_small_blob(reg, repo, data):
    d = sha(data)
    reg.push_blob(repo, d, data=data)
    return {"digest": d, "size": len(data)}


def make_big(reg, work, mib):
    """bench/big:1, one layer of `mib` MiB of random bytes (written to a file, streamed up)."""
    path = os.path.join(work, "big-layer")
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(mib):
            chunk = os.urandom(MIB)
            h.update(chunk)
            f.write(chunk)
    layer = {"digest": "sha256:" + h.hexdigest(), "size": mib * MIB}
    repo = "bench/big"
    reg.push_blob(repo, layer["digest"], path=path)
    os.remove(path)
    config = push_small_blob(reg, repo, config_bytes("amd64", [layer["digest"]], "big"))
    m = manifest_bytes(config, [layer])
    reg.put_manifest(repo, "1", m, OCI_MANIFEST)
    return Image(repo, "1", sha(m), OCI_MANIFEST, [layer["digest"], config["digest"]], [])


def make_multi(reg, platforms=("amd64", "arm64", "ppc64le"), layers=10, shared=3, layer_mib=4):
    """bench/multi:1, an index of 3 platforms x 10 layers of 4 MiB; the first 3 layers shared by all."""
    repo = "bench/multi"
    blobs = []
    shared_descs = []
    for _ in range(shared):
        shared_descs.append(push_small_blob(reg, repo, os.urandom(layer_mib * MIB)))
    blobs += [d["digest"] for d in shared_descs]
    children = []
    entries = []
    for arch in platforms:
        descs = list(shared_descs)
        for _ in range(layers - shared):
            descs.append(push_small_blob(reg, repo, os.urandom(layer_mib * MIB)))
        config = push_small_blob(reg, repo, config_bytes(arch, [d["digest"] for d in descs], "multi"))
        blobs += [d["digest"] for d in descs[shared:]] + [config["digest"]]
        m = manifest_bytes(config, descs)
        d = sha(m)
        reg.put_manifest(repo, d, m, OCI_MANIFEST)
        children.append((d, OCI_MANIFEST))
        entries.append({"mediaType": OCI_MANIFEST, "digest": d, "size": len(m),
                        "platform": {"architecture": arch, "os": "linux"}})
    idx = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, indent=2).encode()
    reg.put_manifest(repo, "1", idx, OCI_INDEX)
    return Image(repo, "1", sha(idx), OCI_INDEX, blobs, children)


def make_smalls(reg, n, base_mib):
    """bench/small-000 … : n single-platform images, each a shared base layer + its own 64 KiB layer."""
    base = os.urandom(base_mib * MIB)
    base_desc = {"digest": sha(base), "size": len(base)}
    images = []
    for i in range(n):
        repo = f"bench/small-{i:03d}"
        if i == 0:
            reg.push_blob(repo, base_desc["digest"], data=base)
        else:
            reg.mount_blob(repo, base_desc["digest"], "bench/small-000")
        top = push_small_blob(reg, repo, os.urandom(64 * 1024))
        config = push_small_blob(reg, repo, config_bytes("amd64", [base_desc["digest"], top["digest"]], repo))
        m = manifest_bytes(config, [base_desc, top])
        reg.put_manifest(repo, "1", m, OCI_MANIFEST)
        images.append(Image(repo, "1", sha(m), OCI_MANIFEST,
                            [base_desc["digest"], top["digest"], config["digest"]], []))
    return images, base_desc["digest"]


# ---------------------------------------------------------------------------------------------
# Copiers

class Copiers:
    def __init__(self, args, work):
        self.args, self.work = args, work
        self.auth = os.path.join(work, "auth.json")  # empty: no ambient credentials for anyone
        with open(self.auth, "w") as f:
            f.write('{"auths": {}}')
        os.makedirs(os.path.join(work, "docker-config"), exist_ok=True)
        with open(os.path.join(work, "docker-config", "config.json"), "w") as f:
            f.write('{"auths": {}}')
        self.env = dict(os.environ, REGISTRY_AUTH_FILE=self.auth,
                        DOCKER_CONFIG=os.path.join(work, "docker-config"))
        self.n = 0

    def timed(self, cmd, env=None):
        """Run cmd under /usr/bin/time -v: wall seconds, peak RSS KiB, exit status, stdout, stderr tail."""
        self.n += 1
        runs = os.path.join(self.work, "runs")
        os.makedirs(runs, exist_ok=True)
        tfile = os.path.join(runs, f"{self.n}-time.txt")  # /usr/bin/time -v report
        efile = os.path.join(runs, f"{self.n}-stderr.txt")
        t0 = time.monotonic()
        with open(efile, "wb") as err:
            p = subprocess.run(["/usr/bin/time", "-v", "-o", tfile] + cmd, stdout=subprocess.PIPE,
                               stderr=err, env=env or self.env, stdin=subprocess.DEVNULL)
        wall = time.monotonic() - t0
        rss = None
        with open(tfile) as f:
            for line in f:
                if "Maximum resident set size" in line:
                    rss = int(line.split(":")[1])
        with open(efile, "rb") as f:
            tail = f.read()[-600:].decode(errors="replace").strip()
        return {"wall": wall, "rss_kib": rss, "status": p.returncode, "stdout": p.stdout.decode(errors="replace"),
                "stderr": tail}

    def mirror_mirror(self, src, dst, image):
        r = self.timed([self.args.bin, "copy", "--json", f"{src.host}/{image.repo}:{image.tag}",
                        f"{dst.host}/mirror/{image.repo}:{image.tag}"])
        try:
            j = json.loads(r["stdout"])
            r["json"] = {k: j.get(k) for k in ("bytes_total", "bytes_moved", "blobs_uploaded", "blobs_mounted",
                                               "blobs_skipped", "manifests_pushed", "manifests_skipped")
                         if k in j}
            for k, v in j.items():
                if isinstance(v, bool):
                    r["json"][k] = v
        except ValueError:
            pass
        return r

    def skopeo(self, src, dst, image):
        return self.timed(["skopeo", "copy", "--all", "--preserve-digests", "--src-tls-verify=false",
                           "--dest-tls-verify=false", f"docker://{src.host}/{image.repo}:{image.tag}",
                           f"docker://{dst.host}/mirror/{image.repo}:{image.tag}"])

    def floor(self, src, dst, image, jobs=8):
        plan = os.path.join(self.work, f"plan-{image.repo.replace('/', '_')}.txt")
        image.write_plan(plan)
        return self.timed(["bash", os.path.join(HERE, "floor.sh"), f"{src.host}/{image.repo}",
                           f"{dst.host}/mirror/{image.repo}", str(jobs), plan])


TOOLS = ("mirror-mirror", "skopeo", "floor")


def run_tool(cop, tool, src, dst, image):
    fn = {"mirror-mirror": cop.mirror_mirror, "skopeo": cop.skopeo, "floor": cop.floor}[tool]
    r = fn(src, dst, image)
    served = dst.digest_of(f"mirror/{image.repo}", image.tag)
    r["digest_ok"] = served == image.digest
    if r["status"] != 0 or not r["digest_ok"]:
        r["error"] = (f"exit {r['status']}, target serves {served} (want {image.digest}): "
                      + r["stderr"][-300:].replace("\n", " | "))
        log(f"  {tool} FAILED: {r['error']}")
    return r


# ---------------------------------------------------------------------------------------------
# Access-log arithmetic

def blob_digest_of(path):
    m = re.search(r"/blobs/(sha256:[0-9a-f]{64})", path)
    return m.group(1) if m else None


def summarise(reqs):
    """Counts of method + kind: 'HEAD manifest', 'GET blob', 'POST upload', 'PUT upload', 'GET ping'…"""
    out = {}
    for method, path, status, _ in reqs:
        p = path.split("?")[0]
        if p in ("/v2", "/v2/"):
            kind = "ping"
        elif "/blobs/uploads" in p:
            kind = "upload"
        elif "/blobs/" in p:
            kind = "blob"
        elif "/manifests/" in p:
            kind = "manifest"
        else:
            kind = "other"
        key = f"{method} {kind}"
        out[key] = out.get(key, 0) + 1
    return out


def base_crossings(src_reqs, dst_reqs, base):
    """How the base layer moved: GETs of its bytes at the source, uploads and mounts of it at the target."""
    hexd = base.split(":")[1]
    gets = sum(1 for m, p, s, _ in src_reqs if m == "GET" and blob_digest_of(p) == base and s in (200, 206, 307))
    ups = sum(1 for m, p, s, _ in dst_reqs if m == "PUT" and "/blobs/uploads/" in p and hexd in p and s == 201)
    mounts = sum(1 for m, p, s, _ in dst_reqs if m == "POST" and "mount=" in p and hexd in p and s == 201)
    return {"source_gets": gets, "uploads": ups, "mounts": mounts}


# ---------------------------------------------------------------------------------------------
# PostgreSQL (--database postgres)

def pg_bin():
    """The newest PostgreSQL under /usr/lib/postgresql (the Debian package), as the tests find it."""
    root = "/usr/lib/postgresql"
    versions = sorted((int(v), os.path.join(root, v, "bin")) for v in os.listdir(root)
                      if v.isdigit() and os.path.isfile(os.path.join(root, v, "bin", "postgres"))) \
        if os.path.isdir(root) else []
    if not versions:
        raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    return versions[-1][1]


class Postgres:
    """A throwaway PostgreSQL server, started as the tests start theirs (tests/it/support/postgres.rs):
    initdb in a temp dir owned by the postgres user (PostgreSQL refuses root), a free loopback port,
    synchronous_commit=on and fsync=on (a 202 is a durable commit), a database per service."""

    def __init__(self):
        self.bin = pg_bin()
        self.dir = tempfile.mkdtemp(prefix="mirror-bench-pg-")
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            subprocess.run(["chown", "-R", "postgres:postgres", self.dir], check=True)
        data = os.path.join(self.dir, "data")
        subprocess.run(self.as_postgres + [os.path.join(self.bin, "initdb"), "-D", data, "-U", "postgres",
                                           "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port = free_port()
        self.log = os.path.join(self.dir, "log")
        self.proc = subprocess.Popen(
            self.as_postgres + [os.path.join(self.bin, "postgres"), "-D", data, "-p", str(self.port), "-k", self.dir,
                                "-c", "listen_addresses=127.0.0.1", "-c", "synchronous_commit=on", "-c", "fsync=on",
                                "-c", "max_connections=300", "-c", "shared_buffers=64MB", "-c", "min_wal_size=512MB"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 60
        while subprocess.run([os.path.join(self.bin, "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]
                             ).returncode != 0:
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"PostgreSQL did not start: {open(self.log).read()[-2000:]}")
            time.sleep(0.1)
        self.n = 0
        log(f"PostgreSQL {os.path.basename(os.path.dirname(self.bin))} on 127.0.0.1:{self.port} "
            "(synchronous_commit=on, fsync=on)")

    def warm(self):
        """A fresh initdb has one WAL segment: every 16 MB of WAL a run writes, PostgreSQL creates,
        zero-fills and fsyncs the next (seconds of stalls on a busy disk: f) fell to 500/s with a
        p99 of 2 s on the first round, 2,000/s once warm). A server that has been running recycles
        its old segments instead. Write 256 MB of WAL and checkpoint, so the rounds meet a server
        in that state (min_wal_size keeps the segments for reuse). Done just before f): the 256 MB
        it leaves in the page cache and the checkpoint's writes cost e) a fifth of its reads/s."""
        for sql in ("create table bench_warm (x bigint)",
                    "insert into bench_warm select generate_series(1, 4000000)",
                    "drop table bench_warm", "checkpoint", "select pg_switch_wal()", "checkpoint"):
            self.psql("postgres", sql)

    def psql(self, db, sql):
        out = subprocess.run(["psql", "-X", "-q", "-A", "-t", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                              "-d", db, "-c", sql], capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def database(self, name):
        """A new, empty database; its postgres:// URL."""
        self.n += 1
        db = re.sub(r"[^a-z0-9_]", "_", f"b{self.n}_{name}".lower())
        self.psql("postgres", f"create database {db}")
        return f"postgres://postgres@127.0.0.1:{self.port}/{db}"

    def count(self, url, sql):
        return int(self.psql(url.rsplit("/", 1)[1], sql))

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


PG = []  # the server of a --database postgres run, stopped at exit
PG_VERSION = []


def database_for(args, root, name):
    """MIRROR_DATABASE for a new service: a SQLite file in its directory, or a new PostgreSQL database."""
    if getattr(args, "database", "sqlite") == "postgres":
        return PG[0].database(name)
    return os.path.join(root, "mirror.db")


# ---------------------------------------------------------------------------------------------
# The service

class Service:
    def __init__(self, args, work, name, src, dst, workers=None, allowed=None, database=None, targets=None):
        self.root = os.path.join(work, name)
        os.makedirs(self.root, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.token = secrets.token_hex(16)
        self.database = database or database_for(args, self.root, name)
        env = dict(os.environ, MIRROR_LISTEN=self.host, MIRROR_DATABASE=self.database,
                   MIRROR_TARGET=f"{dst.host}/mirror" if dst else "127.0.0.1:9/mirror",
                   MIRROR_ALLOWED_SOURCES=allowed or src.host, MIRROR_API_TOKENS=f"bench={self.token}",
                   REGISTRY_AUTH_FILE=os.path.join(work, "auth.json"),
                   DOCKER_CONFIG=os.path.join(work, "docker-config"))
        if workers:
            env["MIRROR_WORKERS"] = str(workers)
        if targets:  # named targets (MIRROR_TARGETS=name=prefix,…): one request, one job per target
            env["MIRROR_TARGET"], env["MIRROR_TARGETS"] = "", targets
        self.proc = spawn([args.bin, "serve"], os.path.join(self.root, "serve.out"),
                          os.path.join(self.root, "serve.log"), env=env)
        wait_http(self.host, "/readyz", self.proc, f"mirror-mirror serve (log {self.root}/serve.log)")

    def status(self):
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM"):
                    out[k] = int(v.split()[0])  # KiB
        return out

    def post(self, image):
        status, _, body = request(self.host, "POST", "/mirror", body=json.dumps({"image": image}).encode(),
                                  headers={"Authorization": f"Bearer {self.token}",
                                           "Content-Type": "application/json"})
        if status != 202:
            raise RuntimeError(f"POST /mirror {image}: {status} {body[:300]!r}")
        return json.loads(body)["id"]

    def jobs(self, state, limit=500):
        status, _, body = request(self.host, "GET", f"/jobs?state={state}&limit={limit}")
        assert status == 200, f"GET /jobs: {status} {body[:200]!r}"
        return json.loads(body)["jobs"]

    def wait_all(self, n, timeout):
        """Until no job is queued or running; returns (succeeded, failed jobs). `self.peak_running`:
        the most jobs seen running at once (polled every 50 ms)."""
        deadline = time.monotonic() + timeout
        self.peak_running = 0
        while time.monotonic() < deadline:
            running = self.jobs("running", 100)
            self.peak_running = max(self.peak_running, len(running))
            if not running and not self.jobs("queued", 1):
                break
            time.sleep(0.05)
        ok, bad = self.jobs("succeeded"), self.jobs("failed")
        if len(ok) + len(bad) < n:
            raise RuntimeError(f"only {len(ok) + len(bad)} of {n} jobs finished within {timeout}s")
        return ok, bad

    def close(self):
        stop(self.proc, grace=40)


# ---------------------------------------------------------------------------------------------
# wrk

def parse_wrk(out):
    def to_ms(v):
        m = re.match(r"([\d.]+)(us|ms|s)", v)
        x = float(m.group(1))
        return {"us": x / 1000, "ms": x, "s": x * 1000}[m.group(2)]
    r = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    r["rps"] = float(m.group(1)) if m else None
    m = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    r["p99_ms"] = to_ms(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: (.*)", out)
    r["socket_errors"] = m.group(1) if m else None
    m = re.search(r"ACCEPTED (\d+) OTHER (\d+) DURATION_US (\d+) FIRST_OTHER (\S+)", out)
    if m:
        r["accepted"], r["other"] = int(m.group(1)), int(m.group(2))
        r["per_s"] = r["accepted"] / (int(m.group(3)) / 1e6)
        r["first_other"] = m.group(4)
    return r


def wrk(args, url, script=None, env=None, headers=()):
    cmd = ["wrk", "-t", str(args.wrk_threads), "-c", str(args.wrk_connections), "-d", f"{args.wrk_seconds}s",
           "--latency", "--timeout", "5s"]
    for h in headers:
        cmd += ["-H", h]
    if script:
        cmd += ["-s", script]
    p = subprocess.run(cmd + [url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       env=dict(os.environ, **(env or {})), timeout=args.wrk_seconds + 60)
    out = p.stdout.decode(errors="replace")
    r = parse_wrk(out)
    r["raw"] = out
    return r


# ---------------------------------------------------------------------------------------------
# The cases

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def case_copy(args, cop, work, src, image, name):
    """Rounds of A B C on fresh target registries: wall, RSS, digest check, mirror-mirror's --json."""
    runs = {t: [] for t in TOOLS}
    for rnd in range(1, args.rounds + 1):
        for tool in TOOLS:
            dst = Registry(os.path.join(work, f"{name}-{tool}-{rnd}"))
            try:
                r = run_tool(cop, tool, src, dst, image)
            finally:
                dst.close()
            log(f"{name}) round {rnd} {tool}: {r['wall']:.2f}s, peak RSS {r['rss_kib'] / 1024:.1f} MiB"
                + (f", {r.get('json')}" if r.get("json") else ""))
            runs[tool].append(r)
    return runs


def case_noop(args, cop, work, src, image):
    """c) the image is already on the target (put there by the floor); the second copy is counted."""
    runs = {t: [] for t in TOOLS}
    for rnd in range(1, args.rounds + 1):
        for tool in TOOLS:
            dst = Registry(os.path.join(work, f"c-{tool}-{rnd}"))
            try:
                seed = cop.floor(src, dst, image)
                assert seed["status"] == 0 and dst.digest_of(f"mirror/{image.repo}", image.tag) == image.digest, \
                    f"seeding the target failed: {seed['stderr']}"
                s0, d0 = src.mark(), dst.mark()
                if tool == "floor":  # the least a no-op check needs: is the source's tag where the target's is?
                    r = cop.timed(["bash", "-c",
                                   f"curl -sSfI -H 'Accept: {ACCEPT}' http://{src.host}/v2/{image.repo}/manifests/"
                                   f"{image.tag} >/dev/null && curl -sSfI -H 'Accept: {ACCEPT}' "
                                   f"http://{dst.host}/v2/mirror/{image.repo}/manifests/{image.tag} >/dev/null"])
                    r["digest_ok"] = r["status"] == 0
                else:
                    r = run_tool(cop, tool, src, dst, image)
                r["src_reqs"] = src.requests_since(s0)
                r["dst_reqs"] = dst.requests_since(d0)
            finally:
                dst.close()
            log(f"c) round {rnd} {tool}: {r['wall']:.2f}s, source {summarise(r['src_reqs'])}, "
                f"target {summarise(r['dst_reqs'])}" + (f", {r.get('json')}" if r.get("json") else ""))
            runs[tool].append(r)
    return runs


def service_big(args, work, src, image):
    """The service's RSS before and after it mirrors the big image (one job through the API)."""
    dst = Registry(os.path.join(work, "a-service-target"))
    svc = Service(args, work, "a-service", src, dst)
    try:
        before = svc.status()
        t0 = time.monotonic()
        svc.post(f"{src.host}/{image.repo}:{image.tag}")
        peak_rss = before["VmRSS"]
        deadline = t0 + 600
        while time.monotonic() < deadline:
            peak_rss = max(peak_rss, svc.status()["VmRSS"])
            if not svc.jobs("queued", 1) and not svc.jobs("running", 1):
                break
            time.sleep(0.05)
        wall = time.monotonic() - t0
        ok = svc.jobs("succeeded")
        bad = svc.jobs("failed")
        after = svc.status()
        r = {"before": before, "after": after, "wall": wall, "succeeded": len(ok) == 1,
             "sampled_peak_rss": peak_rss,
             "error": bad[0]["last_error"] if bad else None,
             "digest_ok": dst.digest_of(f"mirror/127.0.0.1_{src.port}/{image.repo}", image.tag) == image.digest}
        r["growth_kib"] = after["VmHWM"] - before["VmRSS"]
        log(f"a) service: {wall:.2f}s, VmRSS {before['VmRSS']} KiB -> VmHWM {after['VmHWM']} KiB "
            f"(growth {r['growth_kib'] / 1024:.1f} MiB), digest ok {r['digest_ok']}")
        return r
    finally:
        svc.close()
        dst.close()


def service_fanout(args, work, src, image, n=3):
    """g) The big image through the service to `n` targets in one request: how often the source
    served the layer (its access log) and the service's peak RSS growth."""
    dsts = [Registry(os.path.join(work, f"g-target-{i}")) for i in range(n)]
    svc = Service(args, work, "g-service", src, dsts[0],
                  targets=",".join(f"t{i}={d.host}/mirror" for i, d in enumerate(dsts)))
    try:
        before = svc.status()
        s0 = src.mark()
        t0 = time.monotonic()
        status, _, body = request(svc.host, "POST", "/mirror",
                                  body=json.dumps({"image": f"{src.host}/{image.repo}:{image.tag}"}).encode(),
                                  headers={"Authorization": f"Bearer {svc.token}",
                                           "Content-Type": "application/json"})
        if status != 202:
            raise RuntimeError(f"POST /mirror: {status} {body[:300]!r}")
        jobs = len(json.loads(body)["jobs"])
        peak_rss = before["VmRSS"]
        deadline = t0 + 900
        while time.monotonic() < deadline:
            peak_rss = max(peak_rss, svc.status()["VmRSS"])
            if not svc.jobs("queued", 1) and not svc.jobs("running", 1):
                break
            time.sleep(0.05)
        wall = time.monotonic() - t0
        ok, bad = svc.jobs("succeeded"), svc.jobs("failed")
        after = svc.status()
        reqs = src.requests_since(s0)
        layer = image.blobs[0]
        r = {"before": before, "after": after, "wall": wall, "targets": n, "jobs": jobs,
             "succeeded": len(ok) == n, "sampled_peak_rss": peak_rss,
             "error": bad[0]["last_error"] if bad else None,
             "layer_gets": sum(1 for m, path, _, _ in reqs if m == "GET" and path.endswith(f"/blobs/{layer}")),
             "manifest_gets": sum(1 for m, path, _, _ in reqs if m == "GET" and "/manifests/" in path),
             "digest_ok": all(d.digest_of(f"mirror/127.0.0.1_{src.port}/{image.repo}", image.tag) == image.digest
                              for d in dsts)}
        r["growth_kib"] = after["VmHWM"] - before["VmRSS"]
        log(f"g) service, {n} targets: {wall:.2f}s, VmRSS {before['VmRSS']} KiB -> VmHWM {after['VmHWM']} KiB "
            f"(growth {r['growth_kib'] / 1024:.1f} MiB), layer read {r['layer_gets']}× from the source, "
            f"digest ok on every target {r['digest_ok']}")
        return r
    finally:
        svc.close()
        for d in dsts:
            d.close()


def case_service_many(args, cop, work, src, images, base):
    """d) N POST /mirror at once vs a loop of skopeo copies; fresh target (and database) each round.
    The last round's service stays up (returned) for e)."""
    runs = {"service": [], "skopeo-loop": []}
    keep = None
    for rnd in range(1, args.rounds + 1):
        # the service
        dst = Registry(os.path.join(work, f"d-service-{rnd}"))
        # --replicas services on one database (PostgreSQL; SQLite has one)
        svcs = [Service(args, work, f"d-service-{rnd}", src, dst)]
        for i in range(1, args.replicas):
            svcs.append(Service(args, work, f"d-service-{rnd}-{i}", src, dst, database=svcs[0].database))
        svc = svcs[0]
        s0 = src.mark()
        barrier = threading.Barrier(len(images))

        def one(i_img):
            i, img = i_img
            barrier.wait()
            return svcs[i % len(svcs)].post(f"{src.host}/{img.repo}:{img.tag}")  # round-robin

        t0 = time.monotonic()
        try:
            with concurrent.futures.ThreadPoolExecutor(len(images)) as ex:
                ids = list(ex.map(one, enumerate(images)))
            t_enq = time.monotonic() - t0
            ok, bad = svc.wait_all(len(images), timeout=600)
            wall = time.monotonic() - t0
            vms = [x.status() for x in svcs]
            r = {"wall": wall, "enqueue_s": t_enq, "succeeded": len(ok), "failed": len(bad),
                 "errors": sorted({j["last_error"] for j in bad})[:3], "ids": len(set(ids)),
                 "vm": max(vms, key=lambda v: v["VmHWM"]), "replicas": len(svcs)}
            r.update(base_crossings(src.requests_since(s0), dst.requests_since(0), base))
            r["digest_ok"] = all(dst.digest_of(f"mirror/127.0.0.1_{src.port}/{i.repo}", i.tag) == i.digest
                                 for i in images[:5] + images[-5:])
        except Exception as e:
            r = {"wall": None, "error": str(e)}
            for x in svcs:
                x.close()
            svcs = None
        log(f"d) round {rnd} service: {r}")
        runs["service"].append(r)
        if rnd == args.rounds and svcs is not None:
            keep = (svcs, dst)
        else:
            for x in svcs or []:
                x.close()
            dst.close()

        # the skopeo loop
        dst = Registry(os.path.join(work, f"d-skopeo-{rnd}"))
        s0 = src.mark()
        t0 = time.monotonic()
        fails = 0
        for img in images:
            r1 = cop.skopeo(src, dst, img)
            fails += r1["status"] != 0
        wall = time.monotonic() - t0
        r = {"wall": wall, "failed": fails, "succeeded": len(images) - fails}
        r.update(base_crossings(src.requests_since(s0), dst.requests_since(0), base))
        dst.close()
        log(f"d) round {rnd} skopeo loop: {r}")
        runs["skopeo-loop"].append(r)
    return runs, keep


def case_reads(args, svc, name):
    """e) wrk on GET /images/{name}: as clients ask (answered from the read cache while the ledger
    does not change), and with `Cache-Control: no-cache` (every request reads the database)."""
    status, _, body = request(svc.host, "GET", f"/images/{name}")
    if status != 200:
        raise RuntimeError(f"GET /images/{name}: {status} {body[:300]!r}")
    runs = {"cached": [], "fresh": []}
    for rnd in range(1, args.rounds + 1):
        for kind, headers in (("cached", ()), ("fresh", ("Cache-Control: no-cache",))):
            r = wrk(args, f"http://{svc.host}/images/{name}", headers=headers)
            log(f"e) round {rnd} {kind}: {r['rps']} req/s, p99 {r['p99_ms']} ms, non-2xx {r['non2xx']}")
            runs[kind].append(r)
    return runs


def fsync_rate(directory, seconds=1.0):
    """fdatasyncs of one 8 KiB write per second in `directory`, for one second: what a durable
    commit costs on this disk now. With every 202 waiting for its batch's flush, f) can answer at
    most (connections × this) per second, so the report gives it next to each round."""
    path = os.path.join(directory, "fsync-probe")
    n, block = 0, os.urandom(8192)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            os.pwrite(fd, block, 0)
            os.fdatasync(fd)
            n += 1
    finally:
        os.close(fd)
        os.unlink(path)
    return n / seconds


def case_enqueue(args, work):
    """f) wrk POSTing distinct images (sources that do not exist) to a fresh service with 1 worker."""
    script = os.path.join(HERE, "post.lua")
    runs = []
    if PG:
        PG[0].warm()
        log("f) PostgreSQL's WAL segments pre-allocated")
    for rnd in range(1, args.rounds + 1):
        disk = fsync_rate(PG[0].dir if PG else work)
        load = os.getloadavg()[0]
        svc = Service(args, work, f"f-service-{rnd}", None, None, workers=1, allowed="127.0.0.1:9")
        try:
            r = wrk(args, f"http://{svc.host}/mirror", script,
                    env={"BENCH_TOKEN": svc.token, "BENCH_PREFIX": f"127.0.0.1:9/bench/f{rnd}"})
        finally:
            svc.proc.kill()  # SIGKILL: nothing gets a chance to flush
            stop(svc.proc)
        # a 202 means on disk: after a SIGKILL, the database holds at least every job answered 202
        # (wrk may cut the last requests of a run after the service answered them, so a few more is normal)
        if svc.database.startswith("postgres://"):
            r["jobs_in_db"] = PG[0].count(svc.database, "select count(*) from job")
        else:
            with sqlite3.connect(svc.database) as db:
                r["jobs_in_db"] = db.execute("select count(*) from job").fetchone()[0]
        r["fsync_per_s"], r["load"] = disk, load
        log(f"f) round {rnd} (load {load:.1f}, {disk:.0f} fdatasync/s): {r.get('per_s')} jobs/s accepted ({r.get('accepted')} 202s, {r.get('other')} other "
            f"first {r.get('first_other')}), p99 {r['p99_ms']} ms, {r['jobs_in_db']} jobs in the database")
        runs.append(r)
    return runs


# ---------------------------------------------------------------------------------------------
# The report

def fmt(x, nd=2, unit=""):
    if x is None:
        return "—"
    return f"{x:.{nd}f}{unit}"


def verdict(ok):
    return "**PASS**" if ok else "**FAIL**"


def report(args, res, started, finished):
    rows = []
    details = []

    def row(case, measure, mm, sk, fl, ratio, target, ok):
        rows.append(f"| {case} | {measure} | {mm} | {sk} | {fl} | {ratio} | {target} | "
                    f"{'' if ok is None else verdict(ok)} |")

    def walls(runs, tool):
        return [r["wall"] if not r.get("error") else None for r in runs[tool]]

    def rss_mib(runs, tool):
        xs = [r["rss_kib"] / 1024 for r in runs[tool] if r.get("rss_kib")]
        return max(xs) if xs else None

    for key, label in (("a", f"a) 1 × {args.big_mib} MiB layer"), ("b", "b) 3 platforms × 10 × 4 MiB")):
        if key not in args.only:
            continue
        runs = res.get(key)
        if not runs:
            row(label, "wall s", "error (see details)", "", "", "", "", False)
            continue
        m, s, f = (med(walls(runs, t)) for t in TOOLS)
        errs = sum(1 for t in TOOLS for r in runs[t] if r.get("error"))
        rs = m / s if m and s else None
        rf = m / f if m and f else None
        if key == "a":
            row(label, "wall s (median)", fmt(m), fmt(s), fmt(f), f"{fmt(rs)}× skopeo", "≤ 0.95× skopeo",
                rs is not None and rs <= 0.95 and not errs)
            row(label, "wall vs floor", "", "", "", f"{fmt(rf)}× floor", "≤ 1.10× floor",
                rf is not None and rf <= 1.10 and not errs)
            mr = rss_mib(runs, "mirror-mirror")
            row(label, "peak RSS MiB (max)", fmt(mr, 1), fmt(rss_mib(runs, "skopeo"), 1),
                fmt(rss_mib(runs, "floor"), 1), "", "copy ≤ 32 MiB", mr is not None and mr <= 32)
            sv = res.get("a-service")
            if sv and not sv.get("exception"):
                g = sv["growth_kib"] / 1024
                row(label, "service RSS growth MiB", fmt(g, 1) + f" ({sv['before']['VmRSS'] // 1024}→"
                    f"{sv['after']['VmHWM'] // 1024} MiB, {sv['wall']:.1f} s)", "", "", "", "≤ 16 MiB",
                    g <= 16 and sv["succeeded"] and sv["digest_ok"])
            else:
                row(label, "service RSS growth MiB", "error", "", "", "", "≤ 16 MiB", False)
        else:
            row(label, "wall s (median)", fmt(m), fmt(s), fmt(f), f"{fmt(rs)}× skopeo; {fmt(rf)}× floor",
                "≤ 0.6× skopeo", rs is not None and rs <= 0.6 and not errs)
            row(label, "peak RSS MiB (max)", fmt(rss_mib(runs, "mirror-mirror"), 1),
                fmt(rss_mib(runs, "skopeo"), 1), fmt(rss_mib(runs, "floor"), 1), "", "", None)
        if errs:
            row(label, "failed runs", "", "", "", "", "0", False)
        details.append(f"**{label}** — wall seconds per round (A B C order), peak RSS MiB:\n")
        for t in TOOLS:
            details.append(f"- {t}: " + ", ".join(
                f"{r['wall']:.2f}s/{(r['rss_kib'] or 0) / 1024:.1f}MiB" + (" ERROR" if r.get("error") else "")
                for r in runs[t]) + (f" — `--json`: {runs[t][0].get('json')}" if runs[t] and runs[t][0].get("json")
                                     else ""))
            for r in runs[t]:
                if r.get("error"):
                    details.append(f"  - error: `{r['error'][:400]}`")
        details.append("")

    runs = res.get("c")
    if "c" not in args.only:
        pass
    elif runs:
        def last(t):
            return runs[t][-1] if runs[t] else None

        def src_n(t):
            return max(len(r["src_reqs"]) for r in runs[t])

        def dst_n(t):
            return max(len(r["dst_reqs"]) for r in runs[t])

        def blob_moves(t):  # per run, the most of any round
            return max(sum(1 for m, p, s, _ in r["src_reqs"] if m == "GET" and "/blobs/" in p) +
                       sum(1 for m, p, s, _ in r["dst_reqs"] if "/blobs/uploads" in p) for r in runs[t])

        def src_check(t):
            ms = {m for r in runs[t] for m, p, s, _ in r["src_reqs"] if "/manifests/" in p}
            return "HEAD" if ms == {"HEAD"} else "+".join(sorted(ms)) or "none"

        label = "c) second copy (b's index)"
        mm_err = any(r.get("error") for r in runs["mirror-mirror"])
        row(label, "requests to source (max)", src_n("mirror-mirror"), src_n("skopeo"), src_n("floor"), "", "≤ 2",
            src_n("mirror-mirror") <= 2 and not mm_err)
        row(label, "requests to target (max)", dst_n("mirror-mirror"), dst_n("skopeo"), dst_n("floor"), "", "≤ 2",
            dst_n("mirror-mirror") <= 2 and not mm_err)
        row(label, "blob GET/upload requests (max)", blob_moves("mirror-mirror"), blob_moves("skopeo"), blob_moves("floor"), "",
            "none", blob_moves("mirror-mirror") == 0)
        row(label, "source check", src_check("mirror-mirror"), src_check("skopeo"), src_check("floor"), "",
            "HEAD", src_check("mirror-mirror") == "HEAD")
        row(label, "wall s (median)", fmt(med(walls(runs, "mirror-mirror")), 3), fmt(med(walls(runs, "skopeo")), 3),
            fmt(med(walls(runs, "floor")), 3), "", "", None)
        details.append(f"**{label}** — requests in the access logs (last round):\n")
        for t in TOOLS:
            r = last(t)
            details.append(f"- {t}: source {summarise(r['src_reqs'])}; target {summarise(r['dst_reqs'])}"
                           + (f" — `--json`: {r.get('json')}" if r.get("json") else ""))
            if t == "mirror-mirror":  # every request, in order
                details.append("  - " + "; ".join(f"source {m} {p.split('?')[0]} {s}" for m, p, s, _ in r["src_reqs"])
                               + "; " + "; ".join(f"target {m} {p.split('?')[0]} {s}" for m, p, s, _ in r["dst_reqs"]))
        details.append("")
    else:
        row("c) second copy", "requests", "error (see details)", "", "", "", "", False)

    runs = res.get("d")
    n = args.images
    pg = args.database == "postgres"
    on = f", PostgreSQL, {args.replicas} replicas" if pg and args.replicas > 1 else (", PostgreSQL" if pg else "")
    label = f"d) {n} images, shared base{on}"
    if "d" not in args.only:
        pass
    elif runs:
        sv, sk = runs["service"], runs["skopeo-loop"]
        m = med([r.get("wall") for r in sv if not r.get("failed") and r.get("wall")])
        s = med([r["wall"] for r in sk])
        ratio = m / s if m and s else None
        good = all(r.get("succeeded") == n and r.get("digest_ok") for r in sv)
        row(label, "total s (median); service vs skopeo loop", fmt(m), fmt(s), "", f"{fmt(ratio)}× skopeo loop",
            "≤ 0.5× skopeo loop", ratio is not None and ratio <= 0.5 and good)
        ups = [r.get("uploads") for r in sv]
        row(label, "base layer: uploads / mounts / source GETs (max)",
            f"{max(u for u in ups if u is not None) if any(u is not None for u in ups) else '—'} / "
            f"{max((r.get('mounts') or 0) for r in sv)} / {max((r.get('source_gets') or 0) for r in sv)}",
            f"{max(r['uploads'] for r in sk)} / {max(r['mounts'] for r in sk)} / {max(r['source_gets'] for r in sk)}",
            "", "", "1 upload per target registry", all(u == 1 for u in ups))
        hwm = [r["vm"]["VmHWM"] / 1024 for r in sv if r.get("vm")]
        row(label, "service peak RSS MiB (VmHWM)", fmt(max(hwm) if hwm else None, 1), "", "", "", "", None)
        details.append(f"**{label}** — {n} × POST /mirror at once (threads"
                       + (f", round-robin over {args.replicas} replicas on one database" if args.replicas > 1 else "")
                       + "), MIRROR_WORKERS default; per round:\n")
        for r in sv:
            if r.get("error"):
                details.append(f"- service: error `{r['error'][:400]}`")
                continue
            details.append(f"- service: {r['wall']:.2f} s ({n} POSTs answered in {r['enqueue_s']:.2f} s), "
                           f"{r['succeeded']} succeeded, {r['failed']} failed{' ' + str(r['errors']) if r['errors'] else ''}; base layer "
                           f"{r['uploads']} uploads, {r['mounts']} mounts, {r['source_gets']} source GETs; "
                           f"VmHWM {r['vm']['VmHWM'] // 1024} MiB; target digests checked: {r['digest_ok']}")
        for r in sk:
            details.append(f"- skopeo loop: {r['wall']:.2f} s, {r['succeeded']} succeeded, {r['failed']} failed; "
                           f"base layer {r['uploads']} uploads, {r['mounts']} mounts, {r['source_gets']} source GETs")
        details.append("")
    else:
        row(label, "total s", "error (see details)", "", "", "", "", False)

    g = res.get("g")
    label = f"g) 1 × {args.big_mib} MiB layer to 3 targets, one request (service)"
    if "g" not in args.only:
        pass
    elif g:
        gm = g["growth_kib"] / 1024
        row(label, "service RSS growth MiB", fmt(gm, 1) + f" ({g['before']['VmRSS'] // 1024}→"
            f"{g['after']['VmHWM'] // 1024} MiB, {g['wall']:.1f} s)", "", "", "", "≤ 16 MiB",
            gm <= 16 and g["succeeded"] and g["digest_ok"])
        row(label, "source GETs of the layer", str(g["layer_gets"]), "", "", "", "1 (3 without the fan-out)",
            g["layer_gets"] == 1)
        details.append(f"**{label}** — one POST /mirror, {g['jobs']} jobs ({g['targets']} MIRROR_TARGETS), "
                       f"{g['wall']:.2f} s; the source served the layer {g['layer_gets']}× and "
                       f"{g['manifest_gets']} manifest GET(s); VmRSS before {g['before']['VmRSS']} KiB, VmHWM after "
                       f"{g['after']['VmHWM']} KiB; every target serves the digest: {g['digest_ok']}"
                       + (f"; error: {g['error']}" if g.get("error") else "") + "\n")
    else:
        row(label, "service RSS growth MiB", "error (see details)", "", "", "", "≤ 16 MiB", False)

    runs = res.get("e")
    label = "e) GET /images/{name}" + (", PostgreSQL, one replica" if pg else "")
    e_target = 8000 if pg else 10000
    if "e" not in args.only:
        pass
    elif runs:
        cached, fresh = runs["cached"], runs["fresh"]
        rps, p99 = med([r["rps"] for r in cached]), med([r["p99_ms"] for r in cached])
        non = sum(r["non2xx"] for r in cached + fresh)
        row(label, "req/s (median)", fmt(rps, 0), "", "", "", f"≥ {e_target:,}",
            rps is not None and rps >= e_target and not non)
        row(label, "p99 ms (median)", fmt(p99, 2), "", "", "", "≤ 10 ms", p99 is not None and p99 <= 10)
        row(label, "req/s; p99 ms, each reading the database (no-cache)",
            f"{fmt(med([r['rps'] for r in fresh]), 0)}; {fmt(med([r['p99_ms'] for r in fresh]), 2)}",
            "", "", "", "", None)
        for kind, rs in (("as clients ask (read cache)", cached), ("Cache-Control: no-cache", fresh)):
            details.append(f"**{label}, {kind}** — wrk -t{args.wrk_threads} -c{args.wrk_connections} "
                           f"-d{args.wrk_seconds}s --latency, per round: " + ", ".join(
                               f"{r['rps']} req/s p99 {r['p99_ms']} ms non-2xx {r['non2xx']}" for r in rs) + "\n")
    else:
        row(label, "req/s", "error (see details)", "", "", "", f"≥ {e_target:,}", False)

    runs = res.get("f")
    label = "f) POST /mirror enqueue" + (", PostgreSQL (synchronous_commit=on)" if pg else "")
    f_target = 2000 if pg else 500
    if "f" not in args.only:
        pass
    elif runs:
        ps = med([r.get("per_s") for r in runs])
        other = sum(r.get("other") or 0 for r in runs)
        durable = all(r["jobs_in_db"] >= (r.get("accepted") or 0) for r in runs)
        row(label, "202s per second (median)", fmt(ps, 0), "", "", "", f"≥ {f_target:,}, every 202 in the database",
            ps is not None and ps >= f_target and durable)
        row(label, "p99 ms (median)", fmt(med([r["p99_ms"] for r in runs]), 2), "", "", "", "", None)
        details.append(f"**{label}** — wrk -t{args.wrk_threads} -c{args.wrk_connections} -d{args.wrk_seconds}s, "
                       "MIRROR_WORKERS=1, per round: " + ", ".join(
                           f"{fmt(r.get('per_s'), 0)} jobs/s ({r.get('accepted')} × 202, {r.get('other')} other, "
                           f"first other {r.get('first_other')}, p99 {r['p99_ms']} ms, {r['jobs_in_db']} jobs in the database after SIGKILL; "
                           f"load {r.get('load', 0):.1f}, disk {r.get('fsync_per_s', 0):.0f} fdatasync/s before the round)"
                           for r in runs) + (f" — {other} non-202 answers" if other else "") + "\n")
    else:
        row(label, "jobs/s", "error (see details)", "", "", "", f"≥ {f_target:,}", False)

    for k, v in res.items():
        if k.endswith("-exception"):
            details.append(f"**{k}**: `{v[:600]}`\n")

    commit = subprocess.run(["git", "-C", os.path.dirname(HERE), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", os.path.dirname(HERE), "status", "--porcelain", "--", "src", "Cargo.toml"],
                           capture_output=True, text=True).stdout.strip()
    head = [
        "# mirror-mirror benchmark results",
        "",
        f"`{' '.join(['bench/run.sh'] + args.argv)}` — {time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC, "
        f"{finished - started:.0f} s; commit {commit}{' + uncommitted changes in src/' if dirty else ''}; "
        f"{os.cpu_count()} cores, Linux {os.uname().release}, load average {args.load:.1f} at start; "
        f"{args.rounds} round(s), contenders alternating; "
        f"`{subprocess.run(['skopeo', '--version'], capture_output=True, text=True).stdout.strip()}`, "
        "docker-registry (CNCF distribution) on loopback, fresh target registry for every timed run"
        + (f"; the service on PostgreSQL ({PG_VERSION[0] if PG_VERSION else '?'}, synchronous_commit=on, a fresh "
           f"database per service), d) on {args.replicas} replica(s)." if args.database == "postgres" else "."),
        "",
        "| case | measure | mirror-mirror | skopeo | wire floor | ratio | target | result |",
        "|---|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(head + rows) + "\n\n## Details\n\n" + "\n".join(details) + "\n"
    return text


# ---------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True, help="the mirror-mirror binary (release build)")
    p.add_argument("--rounds", type=int, help="rounds of each comparison (A B C A B C …); default 3")
    p.add_argument("--big-mib", type=int, help="size of a)'s single layer; default 1024")
    p.add_argument("--images", type=int, help="d)'s number of small images; default 100")
    p.add_argument("--base-mib", type=int, default=2, help="d)'s shared base layer size")
    p.add_argument("--wrk-seconds", type=int, help="default 10")
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--wrk-connections", type=int, default=32)
    p.add_argument("--smoke", action="store_true", help="defaults for CI: 16 MiB layer, 1 round, 20 images, 3 s of wrk")
    p.add_argument("--only", default="abcdefg", help="cases to run, e.g. 'ab' (default: all)")
    p.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite",
                   help="the service's database for d), e) and f): a SQLite file (default), or a throwaway "
                        "PostgreSQL server started here, a fresh database per service")
    p.add_argument("--replicas", type=int, help="d)'s services on one database (default 3 with postgres, else 1)")
    p.add_argument("--out", default=None, help="default bench/results.md (bench/results-postgres.md with postgres)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs) for inspection")
    p.add_argument("--workdir", default=None, help="where registries store blobs (default: a new temp dir)")
    args = p.parse_args()
    args.argv, skip = [], False
    for a in sys.argv[1:]:  # the command line as the user gave it to run.sh (which adds --bin)
        if skip or a.startswith("--bin="):
            skip = False
        elif a == "--bin":
            skip = True
        else:
            args.argv.append(a)
    defaults = {"big_mib": 1024, "rounds": 3, "images": 100, "wrk_seconds": 10}
    if args.smoke:
        defaults = {"big_mib": 16, "rounds": 1, "images": 20, "wrk_seconds": 3}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.replicas is None:
        args.replicas = 3 if args.database == "postgres" else 1
    if args.replicas > 1 and args.database != "postgres":
        p.error("--replicas above 1 needs --database postgres (SQLite has one writer)")
    if args.out is None:
        args.out = os.path.join(HERE, "results-postgres.md" if args.database == "postgres" else "results.md")
    started = time.time()
    args.load = os.getloadavg()[0]  # other work on the machine makes the numbers noisy
    work = tempfile.mkdtemp(prefix="mirror-bench-", dir=args.workdir)
    log(f"work directory {work}")

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    res = {}
    try:
        if args.database == "postgres":
            PG.append(Postgres())
            PG_VERSION.append(PG[0].psql("postgres", "show server_version"))
        src = Registry(os.path.join(work, "source"))
        log(f"source registry {src.host}; building images")
        big = make_big(src, work, args.big_mib) if set("ag") & set(args.only) else None
        multi = make_multi(src) if set("bc") & set(args.only) else None
        smalls, base = make_smalls(src, args.images, args.base_mib) if set("de") & set(args.only) else (None, None)
        log("images pushed")
        cop = Copiers(args, work)

        def guard(key, fn, *a):
            try:
                res[key] = fn(*a)
            except Exception as e:  # one broken case must not hide the others
                import traceback
                traceback.print_exc()
                res[f"{key}-exception"] = f"{type(e).__name__}: {e}"
                log(f"{key}) FAILED: {e}")

        if "a" in args.only:
            guard("a", case_copy, args, cop, work, src, big, "a")
            guard("a-service", service_big, args, work, src, big)
        if "g" in args.only:
            guard("g", service_fanout, args, work, src, big)
        if "b" in args.only:
            guard("b", case_copy, args, cop, work, src, multi, "b")
        if "c" in args.only:
            guard("c", case_noop, args, cop, work, src, multi)
        keep = None
        if set("de") & set(args.only):
            def d():
                nonlocal keep
                runs, keep = case_service_many(args, cop, work, src, smalls, base)
                return runs
            guard("d", d)
        if "e" in args.only:
            if keep:
                guard("e", case_reads, args, keep[0][0], f"{src.host}/{smalls[0].repo}")
                for x in keep[0]:
                    x.close()
                keep[1].close()
            else:
                res["e-exception"] = "no service with a mirrored image (d failed)"
        if "f" in args.only:
            guard("f", case_enqueue, args, work)
    finally:
        stop_all()
        for pg in PG:
            pg.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"kept {work}")
    text = report(args, res, started, time.time())
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    finally:
        stop_all()
        for pg in PG:
            pg.close()

#!/usr/bin/env python3
"""The WAN cases of the benchmark (issue 16); `bench/run.sh --wan` runs this.

A delay front (bench/delay.py: a TCP proxy adding RTT/2 each way, in order, keeping throughput, plus one
RTT before a new connection's first bytes for the TCP handshake) stands before the source and before
every target registry. Each case runs at RTT 0 (through the same fronts: the byte term of the floor,
proxy cost included) and at each --rtts value, mirror-mirror and skopeo alternating, fresh target (and
fresh fronts, so connections are counted per copy) every run:

  b) an index of 3 platforms x 10 layers of 4 MiB (bench.py's b)
  r) a realistic image: an index of 2 platforms x 12 layers from 2 KiB to 60 MiB
  c) a no-op re-copy of b)'s image (the target is seeded first, directly)
  d) 20 images sharing a base through the service (20 POST /mirror at once) vs a loop of skopeo copies

The floor is computed from the critical path: the longest chain of dependent requests a verified copy
needs, times the RTT, plus the bytes' time (the best contender's median at RTT 0 through the fronts).
For an index that chain is 9: connect, resolve (HEAD tag), GET index, GET children, POST upload, PUT
blob (its GET starts with the POST), PUT children, PUT index by tag, read back; 7 for one image.
"Round trips" of a copy are measured as (median wall at RTT − median wall at RTT 0) / RTT.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench as B  # noqa: E402  the registries, images, copiers and service of the main benchmark

TOOLS = ("mirror-mirror", "skopeo")
CHAIN_INDEX = 9
CHAIN_IMAGE = 7


class Front:
    """bench/delay.py before `reg` on a new loopback port; .host and .port as a registry's."""

    def __init__(self, reg, rtt_ms, root, mbit=0):
        self.reg = reg
        self.port = B.free_port()
        self.host = f"127.0.0.1:{self.port}"
        os.makedirs(root, exist_ok=True)
        self.log = os.path.join(root, f"front-{self.port}.jsonl")
        cmd = [sys.executable, os.path.join(HERE, "delay.py"), "--listen", str(self.port), "--to", reg.host,
               "--rtt-ms", str(rtt_ms), "--log", self.log]
        if mbit:
            cmd += ["--mbit", str(mbit)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(self.log + ".err", "wb"),
                                     stdin=subprocess.DEVNULL)
        B.STARTED.append(self.proc)
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"delay front on {self.host} did not start: {open(self.log + '.err').read()}")

    def conns(self):
        """Connections closed so far: [{id, open, close, up_bytes, down_bytes}]."""
        time.sleep(0.2)
        try:
            with open(self.log) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def close(self):
        B.stop(self.proc)


def make_realistic(reg, max_bytes):
    """bench/real:1, an index of 2 platforms x 12 layers, sizes from 2 KiB to max_bytes (geometric)."""
    repo = "bench/real"
    n = 12
    sizes = [int(2048 * (max_bytes / 2048) ** (i / (n - 1))) for i in range(n)]
    blobs, children, entries = [], [], []
    for arch in ("amd64", "arm64"):
        descs = [B.push_small_blob(reg, repo, os.urandom(s)) for s in sizes]
        config = B.push_small_blob(reg, repo, B.config_bytes(arch, [d["digest"] for d in descs], "real"))
        blobs += [d["digest"] for d in descs] + [config["digest"]]
        m = B.manifest_bytes(config, descs)
        d = B.sha(m)
        reg.put_manifest(repo, d, m, B.OCI_MANIFEST)
        children.append((d, B.OCI_MANIFEST))
        entries.append({"mediaType": B.OCI_MANIFEST, "digest": d, "size": len(m),
                        "platform": {"architecture": arch, "os": "linux"}})
    idx = json.dumps({"schemaVersion": 2, "mediaType": B.OCI_INDEX, "manifests": entries}, indent=2).encode()
    reg.put_manifest(repo, "1", idx, B.OCI_INDEX)
    img = B.Image(repo, "1", B.sha(idx), B.OCI_INDEX, blobs, children)
    img.bytes = 2 * sum(sizes)
    return img


def count_reqs(src, s0, dst, d0):
    s, d = src.requests_since(s0), dst.requests_since(d0)
    return {"src_reqs": len(s), "dst_reqs": len(d), "src_kinds": B.summarise(s), "dst_kinds": B.summarise(d)}


def one_copy(args, cop, work, src, sfront_rtt, image, tool, rtt, tag, seed=False, env=None):
    """One copy through fresh fronts (before the source and a fresh target): wall, requests, connections."""
    dst = B.Registry(os.path.join(work, tag))
    sf = df = None
    try:
        if seed:
            s = cop.floor(src, dst, image)
            assert s["status"] == 0, f"seeding the target failed: {s['stderr']}"
        sf = Front(src, rtt, os.path.join(work, tag), args.mbit)
        df = Front(dst, rtt, os.path.join(work, tag), args.mbit)
        s0, d0 = src.mark(), dst.mark()
        if tool == "mirror-mirror":
            r = cop.timed([args.bin, "copy", "--json", *args.mm_args, f"{sf.host}/{image.repo}:{image.tag}",
                           f"{df.host}/mirror/{image.repo}:{image.tag}"], env=env)
        else:
            r = cop.skopeo(sf, df, image)
        served = dst.digest_of(f"mirror/{image.repo}", image.tag)
        r["digest_ok"] = served == image.digest
        if r["status"] != 0 or not r["digest_ok"]:
            r["error"] = f"exit {r['status']}, target serves {served}: " + r["stderr"][-300:].replace("\n", " | ")
            B.log(f"  {tool} FAILED: {r['error']}")
        r.update(count_reqs(src, s0, dst, d0))
        r["src_conns"], r["dst_conns"] = len(sf.conns()), len(df.conns())
        r.pop("stdout", None)
        return r
    finally:
        for f in (sf, df):
            if f:
                f.close()
        dst.close()


def case_copies(args, cop, work, src, image, name, seed=False):
    """{rtt: {tool: [runs]}} for RTT 0 and each --rtts, tools alternating within each round."""
    out = {}
    for rtt in [0] + args.rtts:
        out[rtt] = {t: [] for t in TOOLS}
        for rnd in range(1, args.rounds + 1):
            for tool in TOOLS:
                r = one_copy(args, cop, work, src, None, image, tool, rtt, f"{name}-{rtt}-{tool}-{rnd}", seed=seed)
                B.log(f"w{name}) {rtt} ms round {rnd} {tool}: {r['wall']:.2f}s, requests {r['src_reqs']}+"
                      f"{r['dst_reqs']}, connections {r['src_conns']}+{r['dst_conns']}")
                out[rtt][tool].append(r)
    return out


def case_service(args, cop, work, src, images, base, rtt):
    """d) through the fronts: the service gets every image at once; then a loop of skopeo copies."""
    runs = {"service": [], "skopeo-loop": []}
    for rnd in range(1, args.rounds + 1):
        dst = B.Registry(os.path.join(work, f"wd-service-{rnd}"))
        sf, df = Front(src, rtt, os.path.join(work, "wd"), args.mbit), Front(dst, rtt, os.path.join(work, "wd"), args.mbit)
        svc = B.Service(args, work, f"wd-service-{rnd}", sf, df, allowed=sf.host)
        s0 = src.mark()
        r = None
        try:
            t0 = time.monotonic()
            for img in images:
                svc.post(f"{sf.host}/{img.repo}:{img.tag}")
            ok, bad = svc.wait_all(len(images), timeout=600)
            wall = time.monotonic() - t0
            r = {"wall": wall, "succeeded": len(ok), "failed": len(bad),
                 "errors": sorted({j["last_error"] for j in bad})[:3], "peak_running": svc.peak_running}
            sr, dr = src.requests_since(s0), dst.requests_since(0)
            r.update(B.base_crossings(sr, dr, base))
            r["src_reqs"], r["dst_reqs"] = len(sr), len(dr)
            r["digest_ok"] = all(dst.digest_of(f"mirror/127.0.0.1_{sf.port}/{i.repo}", i.tag) == i.digest
                                 for i in images)
        finally:
            svc.close()  # the service's connections are logged when they close
            if r is not None:
                r["src_conns"], r["dst_conns"] = len(sf.conns()), len(df.conns())
            sf.close()
            df.close()
            dst.close()
        B.log(f"wd) {rtt} ms round {rnd} service: {r}")
        runs["service"].append(r)
        if args.no_d_loop:
            continue

        dst = B.Registry(os.path.join(work, f"wd-skopeo-{rnd}"))
        sf, df = Front(src, rtt, os.path.join(work, "wd"), args.mbit), Front(dst, rtt, os.path.join(work, "wd"), args.mbit)
        s0 = src.mark()
        try:
            t0 = time.monotonic()
            fails = sum(cop.skopeo(sf, df, img)["status"] != 0 for img in images)
            wall = time.monotonic() - t0
            r = {"wall": wall, "failed": fails, "succeeded": len(images) - fails}
            sr, dr = src.requests_since(s0), dst.requests_since(0)
            r.update(B.base_crossings(sr, dr, base))
            r["src_reqs"], r["dst_reqs"] = len(sr), len(dr)
            r["src_conns"], r["dst_conns"] = len(sf.conns()), len(df.conns())
        finally:
            sf.close()
            df.close()
            dst.close()
        B.log(f"wd) {rtt} ms round {rnd} skopeo loop: {r}")
        runs["skopeo-loop"].append(r)
    return runs


def timeline(args, cop, work, src, image, rtt):
    """One mirror-mirror copy with the request timeline on: [(start_ms, duration_ms, status, 'METHOD path')]."""
    env = dict(cop.env, MIRROR_LOG="warn,mirror_mirror::timeline=trace", MIRROR_LOG_FORMAT="json")
    dst = B.Registry(os.path.join(work, "timeline"))
    sf, df = Front(src, rtt, os.path.join(work, "timeline")), Front(dst, rtt, os.path.join(work, "timeline"))
    try:
        errf = os.path.join(work, "timeline.stderr")
        t0 = time.monotonic()
        with open(errf, "wb") as err:
            p = subprocess.run([args.bin, "copy", f"{sf.host}/{image.repo}:{image.tag}",
                                f"{df.host}/mirror/{image.repo}:{image.tag}"], stdout=subprocess.DEVNULL,
                               stderr=err, env=env)
        wall = time.monotonic() - t0
        lines = []
        for line in open(errf, errors="replace"):
            try:
                j = json.loads(line)
            except ValueError:
                continue
            f = j.get("fields", {})
            if "start_ms" in f:
                host = "src" if sf.host in f["message"] else "dst"
                lines.append((f["start_ms"], f["duration_ms"], f["status"], host, f["message"]))
        return {"wall": wall, "status": p.returncode, "lines": sorted(lines)}
    finally:
        sf.close()
        df.close()
        dst.close()


def med(xs):
    return B.med([x for x in xs if x is not None])


def fmt(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def report(args, res, started):
    L = [f"# WAN benchmark (issue 16) — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}", "",
         f"`bench/run.sh {' '.join(args.argv)}` on {os.cpu_count()} cores, load average {args.load:.1f} at start; "
         f"{args.rounds} round(s), RTTs {', '.join(map(str, args.rtts))} ms"
         + (f", {args.mbit} Mbit/s each way" if args.mbit else ", no bandwidth cap")
         + f"; {time.time() - started:.0f} s.", "",
         "| case | RTT ms | mirror-mirror s | skopeo s | floor s | mm / floor | mm / skopeo | requests src+dst (mm / skopeo) "
         "| round trips (mm / skopeo / floor) | connections src+dst (mm / skopeo) | target | result |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, label, chain in (("b", f"b) 3 × 10 × {args.layer_mib} MiB", CHAIN_INDEX), ("r", "realistic 2 × 12, 2 KiB–60 MiB", CHAIN_INDEX),
                              ("c", "c) no-op re-copy", None)):
        runs = res.get(key)
        if not runs:
            continue
        base = {t: med([r["wall"] for r in runs[0][t] if not r.get("error")]) for t in TOOLS}
        byte_time = min(v for v in base.values() if v is not None) if any(base.values()) else None
        for rtt in [0] + args.rtts:
            m = {t: med([r["wall"] for r in runs[rtt][t] if not r.get("error")]) for t in TOOLS}
            mm, sk = m["mirror-mirror"], m["skopeo"]
            if key == "c":
                floor = 3 * rtt / 1000 + (byte_time or 0)  # HEAD source ∥ connect; HEAD target; read-back
                floor_rt = 3
            else:
                floor = chain * rtt / 1000 + (byte_time or 0)
                floor_rt = chain
            rts = {t: (m[t] - base[t]) / (rtt / 1000) if rtt and m[t] is not None and base[t] is not None else None
                   for t in TOOLS}

            def last(t, k):
                xs = [r.get(k) for r in runs[rtt][t]]
                return max(xs) if xs and None not in xs else None

            reqs = " / ".join(f"{last(t, 'src_reqs')}+{last(t, 'dst_reqs')}" for t in TOOLS)
            conns = " / ".join(f"{last(t, 'src_conns')}+{last(t, 'dst_conns')}" for t in TOOLS)
            target, ok = "", None
            if rtt and key == "b":
                target = "≤ 1.3× floor, ≤ 0.4× skopeo"
                ok = mm is not None and sk is not None and mm <= 1.3 * floor and mm <= 0.4 * sk
            elif rtt == 150 and key == "r":
                target = "≤ 1.3× floor"
                ok = mm is not None and mm <= 1.3 * floor
            elif rtt and key == "c":
                target = "≤ 3 round trips"
                ok = rts["mirror-mirror"] is not None and rts["mirror-mirror"] <= 3.5
            errors = sum(1 for t in TOOLS for r in runs[rtt][t] if r.get("error"))
            L.append(f"| {label} | {rtt} | {fmt(mm)} | {fmt(sk)} | {fmt(floor) if rtt else fmt(byte_time)} | "
                     f"{fmt(mm / floor if mm and floor else None)}× | {fmt(mm / sk if mm and sk else None)}× | {reqs} | "
                     f"{fmt(rts['mirror-mirror'], 1)} / {fmt(rts['skopeo'], 1)} / {floor_rt if rtt else '—'} | {conns} | "
                     f"{target} | {'' if ok is None else ('**PASS**' if ok else '**FAIL**')}"
                     f"{f' ({errors} failed runs)' if errors else ''} |")
    d = res.get("d")
    if d:
        rtt = args.d_rtt
        sv = med([r["wall"] for r in d["service"] if r.get("failed") == 0])
        sk = med([r["wall"] for r in d["skopeo-loop"] if r.get("failed") == 0])
        one = res.get("d-one")
        floor = None
        if one is not None:
            floor = 1.5 * (CHAIN_IMAGE * rtt / 1000 + one) + args.images * 3 * (rtt / 1000) / args.workers
        ups = max((r.get("uploads", 0) for r in d["service"]), default=None)
        mounts = max((r.get("mounts", 0) for r in d["service"]), default=None)
        sconn = max((r.get("src_conns", 0) + r.get("dst_conns", 0) for r in d["service"]), default=None)
        peak = max((r.get("peak_running", 0) for r in d["service"]), default=None)
        ok = ups == 1 and sv is not None and floor is not None and sv <= floor
        L.append(f"| d) {args.images} images, shared base (service) | {rtt} | {fmt(sv)} | {fmt(sk)} (loop) | {fmt(floor)} | "
                 f"{fmt(sv / floor if sv and floor else None)}× | {fmt(sv / sk if sv and sk else None)}× | "
                 f"{max(r.get('src_reqs', 0) for r in d['service'])}+{max(r.get('dst_reqs', 0) for r in d['service'])} / "
                 f"{max((r.get('src_reqs', 0) for r in d['skopeo-loop']), default='—')}+"
                 f"{max((r.get('dst_reqs', 0) for r in d['skopeo-loop']), default='—')} | "
                 f"base: {ups} upload(s), {mounts} mounts; at most {peak} jobs running | {sconn} | base uploaded once; ≤ 1.5 × one image's floor + "
                 f"{args.images} × 3 RTT / {args.workers} | {'**PASS**' if ok else '**FAIL**'} |")
    L += ["", "floor = round trips on the critical path × RTT + the bytes' time (best median at RTT 0 through the "
          "fronts); round trips of a copy = (median at RTT − median at RTT 0) / RTT. Requests and connections: "
          "the most of any round. d)'s floor: 1.5 × (7 RTT + one image's time at RTT 0) + images × 3 RTT / workers.", ""]
    tl = res.get("timeline")
    if tl:
        L += [f"## Request timeline: one mirror-mirror copy of b) at {args.timeline_rtt} ms RTT "
              f"({tl['wall']:.2f} s, {len(tl['lines'])} requests)", "", "```", "start_ms  dur_ms status host request"]
        L += [f"{s:8d} {d:7d} {st:6d} {h:4s} {w.split('/', 1)[0]} /{w.split('/', 1)[1] if '/' in w else ''}" for s, d, st, h, w in tl["lines"]]
        L += ["```", ""]
    L += ["## Every run", "", "```"]
    for key in ("b", "r", "c"):
        for rtt, per in (res.get(key) or {}).items():
            for t, rs in per.items():
                for r in rs:
                    L.append(f"{key} {rtt:3d} ms {t:13s} {r['wall']:6.2f}s reqs {r['src_reqs']}+{r['dst_reqs']} "
                             f"conns {r['src_conns']}+{r['dst_conns']} {r.get('error', '')}")
    for k, rs in (res.get("d") or {}).items():
        for r in rs:
            L.append(f"d {k}: {r}")
    for k, v in res.items():
        if k.endswith("-exception"):
            L.append(f"{k}: {v}")
    L += ["```", ""]
    return "\n".join(L)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True)
    p.add_argument("--wan", action="store_true", help="(what run.sh passes; ignored)")
    p.add_argument("--smoke", action="store_true", help="small: 1 round, 50 ms only, b) with 1 MiB layers, no d)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--rtts", default=None, help="comma-separated RTTs in ms (default 50,150; smoke 50)")
    p.add_argument("--mbit", type=float, default=0, help="bandwidth cap per direction, Mbit/s (default none)")
    p.add_argument("--only", default=None, help="WAN cases: b r c d t (t = the request timeline); default all")
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--workers", type=int, default=4, help="the service's MIRROR_WORKERS in d)")
    p.add_argument("--d-rtt", type=int, default=150)
    p.add_argument("--no-d-loop", action="store_true", help="d) without the loop of skopeo copies (~2 min a round)")
    p.add_argument("--timeline-rtt", type=int, default=50)
    p.add_argument("--mm", dest="mm_args", action="append", default=[],
                   help="an extra argument for mirror-mirror copy (repeat: --mm=--jobs --mm=16)")
    p.add_argument("--out", default=os.path.join(HERE, "results-wan.md"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    args.argv = [a for a in sys.argv[1:] if not a.startswith("--bin")]
    if "--bin" in sys.argv:
        i = sys.argv.index("--bin")
        args.argv = [a for j, a in enumerate(sys.argv[1:], 1) if j not in (i, i + 1)]
    args.rounds = args.rounds or (1 if args.smoke else 3)
    args.rtts = [int(x) for x in (args.rtts or ("50" if args.smoke else "50,150")).split(",") if x]
    args.only = args.only or ("bct" if args.smoke else "brcdt")
    args.load = os.getloadavg()[0]
    os.environ["MIRROR_WORKERS"] = str(args.workers)
    started = time.time()
    work = tempfile.mkdtemp(prefix="mirror-wan-", dir=args.workdir)
    B.log(f"work directory {work}")
    signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(SystemExit(128 + s)))
    res = {}
    try:
        src = B.Registry(os.path.join(work, "source"))
        args.layer_mib = 1 if args.smoke else 4
        multi = B.make_multi(src, layer_mib=args.layer_mib) if set("bct") & set(args.only) else None
        real = make_realistic(src, (4 if args.smoke else 60) * B.MIB) if "r" in args.only else None
        smalls, base = B.make_smalls(src, args.images, 2) if "d" in args.only else (None, None)
        B.log("images pushed")
        cop = B.Copiers(args, work)

        def guard(key, fn, *a):
            try:
                res[key] = fn(*a)
            except Exception as e:
                import traceback
                traceback.print_exc()
                res[f"{key}-exception"] = f"{type(e).__name__}: {e}"

        if "t" in args.only:
            guard("timeline", timeline, args, cop, work, src, multi, args.timeline_rtt)
        if "b" in args.only:
            guard("b", case_copies, args, cop, work, src, multi, "b")
        if "r" in args.only:
            guard("r", case_copies, args, cop, work, src, real, "r")
        if "c" in args.only:
            guard("c", case_copies, args, cop, work, src, multi, "c", True)
        if "d" in args.only:
            def one_image():  # one small image's time at RTT 0 through the fronts (the byte term)
                walls = [one_copy(args, cop, work, src, None, smalls[0], "mirror-mirror", 0, f"d-one-{i}")["wall"]
                         for i in range(args.rounds)]
                return med(walls)
            guard("d-one", one_image)
            guard("d", case_service, args, cop, work, src, smalls, base, args.d_rtt)
    finally:
        B.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            B.log(f"kept {work}")
    text = report(args, res, started)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    B.log(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    finally:
        B.stop_all()

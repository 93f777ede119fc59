#!/usr/bin/env python3
"""Peak memory of `copy` for one big layer: one streamed PUT straight to a registry, and PATCH chunks
to a registry behind nginx with `client_max_body_size 64m` (the first PUT answered 413).

usage: python3 bench/chunked.py [--bin target/release/mirror-mirror] [--mib 1024] [--chunk-size 8MiB]
Prints a markdown table (wall time, peak RSS from /usr/bin/time -v, requests by kind at the target).
Needs docker-registry, nginx (Debian nginx-light) and /usr/bin/time; everything on loopback.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the benchmark's registry and image helpers)

NGINX = """daemon off;
master_process off;
worker_processes 1;
error_log {d}/error.log;
pid {d}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    client_max_body_size 64m;
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_http_version 1.1;
    server {{
        listen {host};
        location / {{
            proxy_pass http://{upstream};
            proxy_set_header Host $http_host;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def nginx_front(work, upstream):
    d = os.path.join(work, "nginx")
    os.makedirs(d, exist_ok=True)
    host = f"127.0.0.1:{bench.free_port()}"
    with open(os.path.join(d, "nginx.conf"), "w") as f:
        f.write(NGINX.format(d=d, host=host, upstream=upstream))
    p = bench.spawn(["nginx", "-c", os.path.join(d, "nginx.conf"), "-p", d],
                    os.path.join(d, "stdout.log"), os.path.join(d, "stderr.log"))
    bench.wait_http(host, "/v2/", p, f"nginx on {host}")
    return p, host, os.path.join(d, "access.log")


def timed_copy(binary, src, dst, extra):
    cmd = ["/usr/bin/time", "-v", binary, "copy", "--json", src, dst, *extra]
    env = dict(os.environ, DOCKER_CONFIG=tempfile.mkdtemp(), MIRROR_LOG="warn")
    started = time.time()
    p = subprocess.run(cmd, capture_output=True, env=env)
    wall = time.time() - started
    err = p.stderr.decode(errors="replace")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    if p.returncode != 0:
        raise RuntimeError(f"copy failed: {err[-2000:]}")
    return wall, int(m.group(1)) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(bench.HERE, "..", "target", "release", "mirror-mirror"))
    ap.add_argument("--mib", type=int, default=1024)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="mirror-chunked-")
    try:
        src = bench.Registry(os.path.join(work, "src"))
        bench.log(f"pushing a {args.mib} MiB layer")
        image = bench.make_big(src, work, args.mib)
        rows = []
        for name in ("one PUT", "chunks behind nginx 64m"):
            dst = bench.Registry(os.path.join(work, f"dst-{len(rows)}"))
            target = dst.host
            front = None
            if name.startswith("chunks"):
                front, target, access = nginx_front(work, dst.host)
            wall, rss = timed_copy(args.bin, f"{src.host}/{image.repo}:{image.tag}",
                                   f"{target}/mirror/{image.repo}:{image.tag}", [])
            served = dst.digest_of(f"mirror/{image.repo}", image.tag)
            assert served == image.digest, f"target serves {served}, want {image.digest}"
            kinds = {}
            if front:
                with open(access) as f:
                    for line in f:
                        m = re.search(r'"(\w+) \S+ HTTP/[\d.]+" (\d{3})', line)
                        if m:
                            kinds[f"{m.group(1)} {m.group(2)}"] = kinds.get(f"{m.group(1)} {m.group(2)}", 0) + 1
                bench.stop(front)
            dst.close()
            bench.log(f"{name}: {wall:.1f}s, peak RSS {rss:.1f} MiB {kinds}")
            rows.append((name, wall, rss, kinds))
        print(f"| {args.mib} MiB layer | wall | peak RSS | requests at the front |")
        print("|---|---|---|---|")
        for name, wall, rss, kinds in rows:
            k = ", ".join(f"{v}× {k}" for k, v in sorted(kinds.items())) or "–"
            print(f"| {name} | {wall:.1f} s | {rss:.1f} MiB | {k} |")
    finally:
        bench.stop_all()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()

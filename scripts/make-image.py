#!/usr/bin/env python3
"""Writes a small, real multi-platform OCI image layout (gzip tar layers, configs with diff_ids,
an index with one manifest per platform) for the demo and benchmarks.

usage: make-image.py DIR [--tag TAG] [--platforms linux/amd64,linux/arm64] [--layer-bytes N]
Push it with: skopeo copy --all --dest-tls-verify=false oci:DIR:TAG docker://HOST/REPO:TAG
"""
import argparse, gzip, hashlib, io, json, os, tarfile, time


def write_blob(root, data):
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(root, "blobs", "sha256", digest)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def layer(files):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(content))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, mtime=0), "sha256:" + hashlib.sha256(tar_bytes).hexdigest()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--tag", default="1.0")
    p.add_argument("--platforms", default="linux/amd64,linux/arm64")
    p.add_argument("--layer-bytes", type=int, default=64 * 1024)
    a = p.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    with open(os.path.join(a.dir, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    base, base_diff = layer({"etc/mirror-mirror-demo": b"shared base layer\n"})
    base_desc = write_blob(a.dir, base)
    manifests = []
    for plat in a.platforms.split(","):
        os_, arch = plat.split("/")[:2]
        payload = os.urandom(a.layer_bytes)
        top, top_diff = layer({f"opt/{arch}.bin": payload})
        top_desc = write_blob(a.dir, top)
        config = {
            "architecture": arch,
            "os": os_,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": [base_diff, top_diff]},
        }
        config_desc = write_blob(a.dir, json.dumps(config).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **base_desc},
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **top_desc},
            ],
        }
        m_desc = write_blob(a.dir, json.dumps(manifest, indent=2).encode())
        manifests.append({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            **m_desc,
            "platform": {"architecture": arch, "os": os_},
        })
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}
    idx_desc = write_blob(a.dir, json.dumps(index, indent=2).encode())
    layout = {
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            **idx_desc,
            "annotations": {"org.opencontainers.image.ref.name": a.tag},
        }],
    }
    with open(os.path.join(a.dir, "index.json"), "w") as f:
        json.dump(layout, f)
    print(idx_desc["digest"])


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Example receiver for mirror-mirror completion notices: checks X-Mirror-Signature-256 before trusting
anything, then prints the notice. usage: MIRROR_NOTIFY_SECRET=... receiver.py [PORT]"""
import hashlib, hmac, json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

SECRET = os.environ["MIRROR_NOTIFY_SECRET"].encode()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, self.headers.get("X-Mirror-Signature-256", "")):
            self.send_response(401)
            self.end_headers()
            return
        notice = json.loads(body)
        print(f"job {notice['job_id']} {notice['state']}: {notice['source']} -> {(notice.get('pull') or {}).get('by_digest')}", flush=True)
        self.send_response(204)
        self.end_headers()


if __name__ == "__main__":
    HTTPServer(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 9000), Handler).serve_forever()

"""Real servers on 127.0.0.1 for slides by URL: an HTTP server that honours Range requests (and
asks for a token in the query string, as a presigned URL does) and moto's S3 API server."""

from __future__ import annotations

import hashlib
import re
import threading
from contextlib import contextmanager
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "s3cr3t-t0ken"


class RangeServer:
    """Serves ``files`` (URL path -> bytes) at ``url(path)``; counts the bytes it sends.
    Requests without ``?token=TOKEN`` get 403 (the token stands for a credential)."""

    def __init__(self, files: dict[str, bytes], ranges: bool = True, port: int = 0,
                 die_after_bytes: int | None = None):
        self.files = dict(files)
        self.ranges = ranges
        self.sent = 0
        self.requests = 0
        self.die_after_bytes = die_after_bytes  # then it stops answering, as a crashed server
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):  # noqa: N802 (http.server's names)
                server._serve(self, body=False)

            def do_GET(self):  # noqa: N802
                server._serve(self, body=True)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, token: str = TOKEN) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}{path}?token={token}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def _serve(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        path, _, query = req.path.partition("?")
        self.requests += 1
        if self.die_after_bytes is not None and self.sent >= self.die_after_bytes:
            req.close_connection = True  # dead: no answer, and no more connections
            threading.Thread(target=self.stop, daemon=True).start()
            return
        if f"token={TOKEN}" not in query.split("&"):
            return self._reply(req, 403, b"forbidden", body)
        data = self.files.get(path)
        if data is None:
            return self._reply(req, 404, b"not found", body)
        headers = {"ETag": f'"{hashlib.sha1(data).hexdigest()[:16]}"',
                   "Last-Modified": formatdate(1_700_000_000, usegmt=True)}
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("Range", ""))
        if self.ranges:
            headers["Accept-Ranges"] = "bytes"
        if match and self.ranges and int(match[1]) < len(data):
            start = int(match[1])
            end = min(int(match[2]) + 1 if match[2] else len(data), len(data))
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            return self._reply(req, 206, data[start:end], body, headers)
        return self._reply(req, 200, data, body, headers)

    def _reply(self, req, status: int, payload: bytes, body: bool, headers: dict | None = None):
        req.send_response(status)
        for key, value in (headers or {}).items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(payload)))
        req.end_headers()
        if body:
            try:
                req.wfile.write(payload)
                self.sent += len(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass


@contextmanager
def range_server(files: dict[str, bytes], ranges: bool = True, **kw):
    server = RangeServer(files, ranges, **kw)
    try:
        yield server
    finally:
        server.stop()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_SESSION_TOKEN": "testing"}


@contextmanager
def s3_server(objects: dict[str, bytes], bucket: str = "slides"):
    """moto's S3 API server on 127.0.0.1 holding ``objects`` (key -> bytes) in ``bucket``;
    yields its endpoint URL. Credentials are moto's dummies (set ``S3_ENV``)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=bucket)
        for key, data in objects.items():
            client.put_object(Bucket=bucket, Key=key, Body=data)
        yield endpoint
    finally:
        server.stop()

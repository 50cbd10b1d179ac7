"""An HTTPS front for moto: TLS with HTTP/1.1 keep-alive, as AWS endpoints serve it.

Why: what a client costs over TLS -- OpenSSL holding the CA bundle, a session per
connection, the CPU of record encryption -- is part of what the agent costs in
production, and plain HTTP to moto hides it. moto_server can serve TLS itself,
but its server (werkzeug's) closes the connection after every response, so each
request would pay a full handshake and urllib3 would parse the CA bundle again
for every connection: ten times the CPU and more memory than a client of S3, which
keeps connections alive, ever pays. This front keeps client connections alive and
forwards each request to moto over plain HTTP on loopback.

The certificate is self-signed for 127.0.0.1; ``ca_bundle`` is certifi's bundle
(what botocore trusts by default) plus that certificate, so a client verifying
against it loads as many CA certificates as it would talking to AWS.
"""

from __future__ import annotations

import http.client
import shutil
import ssl
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from agent.sim.netutil import LOOPBACK

HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer",
                        "upgrade", "proxy-connection", "content-length"})


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A self-signed certificate for 127.0.0.1, its key, and a CA bundle that trusts it."""
    import datetime
    import ipaddress

    import certifi
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec2-agent sim")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path, bundle = (directory / "front.crt", directory / "front.key",
                                   directory / "ca-bundle.pem")
    cert_path.write_bytes(pem)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    bundle.write_bytes(Path(certifi.where()).read_bytes().rstrip(b"\n") + b"\n" + pem)
    return cert_path, key_path, bundle


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; "Expect: 100-continue" is answered for us
    disable_nagle_algorithm = True
    server: _Server

    def _read_chunked(self) -> bytes:
        """The body of a chunked request (botocore streams S3 uploads with checksums so)."""
        out = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # HTTP trailers: none are sent (checksums ride in aws-chunked)
                return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline()

    def _forward(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = self._read_chunked()
        else:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
        up = http.client.HTTPConnection(self.server.target_host, self.server.target_port,
                                        timeout=120)
        try:
            up.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():  # Host included: it is signed
                if k.lower() not in HOP_BY_HOP:
                    up.putheader(k, v)
            up.putheader("Content-Length", str(len(body)))
            up.endheaders(body or None)
            resp = up.getresponse()
            data = resp.read()
        except OSError as exc:
            self.send_error(502, f"moto: {exc}")
            return
        finally:
            up.close()
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():  # moto's Date too: the agent reads the store clock
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        if self.command == "HEAD":
            self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
        elif not (100 <= resp.status < 200 or resp.status in (204, 304)):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD" and data:
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _forward

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    target_host: str
    target_port: int


class HttpsFront:
    """``HttpsFront(moto.url).start()``: ``url`` and ``ca_bundle`` for clients; ``stop()``."""

    def __init__(self, target_url: str) -> None:
        t = urllib.parse.urlsplit(target_url)
        self.target = (t.hostname or LOOPBACK, t.port or 80)
        self._dir: Path | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.ca_bundle = ""
        self.url = ""

    def start(self) -> HttpsFront:
        self._dir = Path(tempfile.mkdtemp(prefix="ec2-agent-https-"))
        cert, key, bundle = make_tls_files(self._dir)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        srv = _Server((LOOPBACK, 0), _Forward, bind_and_activate=True)
        srv.target_host, srv.target_port = self.target
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        self._server = srv
        self._thread = threading.Thread(target=srv.serve_forever, name="https-front",
                                        daemon=True)
        self._thread.start()
        self.ca_bundle = str(bundle)
        self.url = f"https://{LOOPBACK}:{srv.server_address[1]}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> HttpsFront:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

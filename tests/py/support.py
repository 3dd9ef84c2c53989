"""Shared by the Python tests: where things are, free loopback ports, brokers started as real
processes (always stopped, even when a test fails), and a small HTTP client.

Every network call here goes to 127.0.0.1 and is bounded in time.
"""

import http.client
import json
import os
import pathlib
import socket
import subprocess
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
DEPLOY = ROOT / "deploy"

# Requests and waits are bounded: nothing here may hang a CI run.
TIMEOUT = 20.0


def binary() -> pathlib.Path:
    """The debug binary that `cargo test` has just built (or TOKEN_BROKER_BIN)."""
    if os.environ.get("TOKEN_BROKER_BIN"):
        path = pathlib.Path(os.environ["TOKEN_BROKER_BIN"])
    else:
        target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
        if not target.is_absolute():
            target = ROOT / target
        path = target / "debug" / "token-broker"
    if not path.is_file():
        raise AssertionError(f"{path} is not built: run `cargo build` first (make test does)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """The environment for a broker process: none of the caller's broker or Truora settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("TRUORA_API_KEY", "TOKEN_BROKER_CONFIG", "TOKEN_BROKER_LOG_FORMAT")
    }
    env["RUST_LOG"] = "warn"
    env.update(extra)
    return env


class Process:
    """A long-running process whose output is collected; killed on close, whatever happened."""

    def __init__(self, args, env=None):
        self.args = [str(a) for a in args]
        self._out = []
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env if env is not None else clean_env(),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self._out.append(line.decode("utf-8", "replace"))

    def _until_healthy(self):
        """For brokers: waits for /healthz on `self.admin_port`, sets `url` and `admin`, and
        kills the process when it never gets healthy."""
        try:
            wait_healthy(self, self.admin_port)
        except BaseException:
            self.close()
            raise
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"

    def output(self) -> str:
        return "".join(self._out)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=TIMEOUT)
        finally:
            self._reader.join(timeout=5)
            self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def wait_healthy(proc: Process, admin_port: int):
    """Waits until /healthz answers 200 on the admin port, or fails naming the output."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.proc.returncode}:\n{proc.output()}")
        try:
            if request("GET", f"http://127.0.0.1:{admin_port}/healthz").status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{proc.args} not healthy in {TIMEOUT} s:\n{proc.output()}")


class Demo(Process):
    """`token-broker demo` on free loopback ports."""

    def __init__(self):
        self.port, self.admin_port = free_port(), free_port()
        self.sandbox_port, self.webhook_port = free_port(), free_port()
        super().__init__(
            [
                binary(),
                "demo",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--admin-listen",
                f"127.0.0.1:{self.admin_port}",
                "--sandbox-listen",
                f"127.0.0.1:{self.sandbox_port}",
                "--webhook-listen",
                f"127.0.0.1:{self.webhook_port}",
            ]
        )
        self._until_healthy()


class Serve(Process):
    """`token-broker serve` with a config written from `text` ({listen} and {admin} filled in)."""

    def __init__(self, text: str, env=None):
        self.port, self.admin_port = free_port(), free_port()
        self._dir = tempfile.TemporaryDirectory()
        self.config_path = pathlib.Path(self._dir.name) / "config.toml"
        self.rewrite(text)
        super().__init__([binary(), "serve", "--config", self.config_path], env=env)
        self._until_healthy()

    def rewrite(self, text: str):
        """Replaces the config file (ports filled in as at start); a reload reads it."""
        self.config_path.write_text(text.format(listen=self.port, admin=self.admin_port))

    def close(self):
        try:
            super().close()
        finally:
            self._dir.cleanup()


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # lower-case name -> value
        self.body = body

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"{self.status} {self.headers} {self.text()[:300]}"


def request(method, url, headers=None, body=b"", timeout=TIMEOUT) -> Response:
    """One request on a fresh connection to a loopback URL; never raises on an HTTP status."""
    assert url.startswith("http://127.0.0.1:"), url
    rest = url[len("http://") :]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    if isinstance(body, str):
        body = body.encode()
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, "/" + path, body=body or None, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    finally:
        conn.close()


def raw_request(port: int, data: bytes, timeout=TIMEOUT) -> Response:
    """Sends `data` as it is on a fresh loopback connection and reads one answer: for framings
    and heads that http.client will not send."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        r = http.client.HTTPResponse(sock)
        r.begin()
        body = r.read()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, body)
    finally:
        sock.close()


def run(args, timeout=TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
    """Runs a command to completion, bounded in time, capturing its output."""
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def load_yaml_all(path):
    import yaml

    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]

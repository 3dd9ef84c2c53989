"""docs/openapi.yaml against the running broker's real answers.

Real brokers are started as processes on free loopback ports:

- `token-broker demo`: its embedded sandbox Truora mints, and errors on demand through flow ids
  `IPFsandbox<status>`;
- `serve` "hang", in front of a loopback Truora that never answers (504), with
  `upstream.max_concurrent = 1`: while one miss waits there, another user's miss gets 503
  `upstream_saturated`. A flow id `IPFreset` makes that Truora close the connection once it has
  read the request (502 `upstream_connection_lost`);
- `serve` "closed", in front of a closed port with `upstream.breaker_threshold = 1`: the first
  miss gets 502 `upstream_unreachable` and opens the breaker, the next ones 503
  `upstream_circuit_open`;
- `serve` "strict", in front of a loopback Truora that mints, with `upstream.mint_rate = 1` (a
  second user's miss within the second gets 429), a caller whose policy limits its flows,
  countries, redirect hosts and the drop-in (403), `server.body_read_timeout` of 300 ms (408),
  and a config file that is rewritten for `POST /admin/reload` (200 revoking that caller, then
  422 for a bad file; the demo, started from no file, answers 409).

Raw sockets send what http.client will not: a chunked body (411), a body that stops short
(408), a head over the header limit (431).

Each case sends a real request and checks the answer against the document's response for that
path, method and status: the status is documented, every required header is there and matches
its schema (`X-Request-Id` on every answer of the caller API among them), the content type is a
documented one and the body validates against its schema (or is empty where the document gives
no content). Requests meant to be accepted are checked against the request schema, and some
that the broker refuses are checked to be refused by the schema too. Last, every response the
document lists must have been seen, except the 500 that no request can cause.
"""

import copy
import hashlib
import json
import re
import socket
import threading
import time
import unittest
import urllib.parse

import jsonschema
import openapi_spec_validator
import yaml

from support import DOCS, TIMEOUT, Demo, Serve, clean_env, free_port, raw_request, request

SPEC = yaml.safe_load((DOCS / "openapi.yaml").read_text(encoding="utf-8"))

SECRET = "openapi-test-secret-0123456789"
LIMITED_SECRET = "openapi-limited-secret-0123456789"
AUTH = {"Authorization": f"Bearer {SECRET}"}
LIMITED_AUTH = {"Authorization": f"Bearer {LIMITED_SECRET}"}
DEMO_AUTH = {"Authorization": "Bearer demo-secret"}
FORM_CT = {"Content-Type": "application/x-www-form-urlencoded"}
JSON_CT = {"Content-Type": "application/json"}
FORM = "country=CO&flow_id=IPF0123456789abcdef&redirect_url=https%3A%2F%2Fexample.com%2Fdone&account_id=openapi-user-1"
GENERATED_ID = re.compile(r"^[0-9a-f]{12}-[0-9]+$")

# Documented responses that no request can cause; each must say why.
NOT_PROVOKED = {
    ("/v1/tokens", "post", "500"): "a fault inside the broker (a lost single flight); no request causes it",
    ("/v1/api-keys", "post", "500"): "a fault inside the broker (a lost single flight); no request causes it",
}


def resolve(node):
    """Follows a local $ref (one level at a time, until none is left)."""
    while isinstance(node, dict) and "$ref" in node and len(node) == 1:
        pointer = node["$ref"]
        assert pointer.startswith("#/"), pointer
        node = SPEC
        for part in pointer[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def validator(schema):
    """A JSON Schema 2020-12 validator (OpenAPI 3.1's dialect) whose local $refs resolve in the
    document."""
    root = copy.deepcopy(schema)
    root["components"] = SPEC["components"]
    return jsonschema.Draft202012Validator(
        root, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def schema_errors(schema, instance):
    return [e.message for e in validator(schema).iter_errors(instance)]


def form_to_object(body: str) -> dict:
    """A form body as the request schema sees it: one value as a string, repeated ones as a list."""
    fields = {}
    for name, value in urllib.parse.parse_qsl(body, keep_blank_values=True):
        if name in fields:
            prev = fields[name]
            fields[name] = (prev if isinstance(prev, list) else [prev]) + [value]
        else:
            fields[name] = value
    return fields


def read_request(conn) -> bytes:
    """One HTTP/1.1 request with a Content-Length body, as the broker's client sends it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise OSError("closed before the head was complete")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    length = int(m.group(1)) if m else 0
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            raise OSError("closed before the body was complete")
        body += chunk
    return head + b"\r\n\r\n" + body


class FakeTruora:
    """A loopback 'Truora'. With `mints` it answers every call with a token, else it reads the
    call and never answers. A flow id `IPFreset` makes it close the connection once it has read
    the request, without an answer. `calls` counts the requests it read."""

    def __init__(self, mints: bool):
        self.mints = mints
        self.calls = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.held = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        conn.settimeout(TIMEOUT)
        try:
            call = read_request(conn)
        except OSError:
            conn.close()
            return
        with self.lock:
            self.calls += 1
            n = self.calls
            if not self.mints and b"flow_id=IPFreset" not in call:
                self.held.append(conn)
                return
        if self.mints and b"flow_id=IPFreset" not in call:
            body = json.dumps({"api_key": f"fake-token-{n}", "message": "API key created successfully"}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        conn.close()

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)
        with self.lock:
            for c in self.held:
                c.close()
        self.sock.close()


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def serve_config(upstream_port: int, server: str = "", upstream: str = "", clients: str = "",
                 timeout: str = "1s") -> str:
    """A `serve` config (Serve fills in {listen} and {admin}) with one unrestricted caller."""
    return f"""
[server]
listen = "127.0.0.1:{{listen}}"
admin_listen = "127.0.0.1:{{admin}}"
shutdown_timeout = "1s"
{server}
[upstream]
account_url = "http://127.0.0.1:{upstream_port}"
timeout = "{timeout}"
{upstream}
[[clients]]
id = "openapi"
token_sha256 = "{digest(SECRET)}"
{clients}
"""


LIMITED_CALLER = f"""
[[clients]]
id = "limited"
token_sha256 = "{digest(LIMITED_SECRET)}"
allowed_flows = ["IPF0123456789abcdef"]
allowed_countries = ["CO"]
allowed_redirect_hosts = ["example.com"]
drop_in = false
"""


def strict_config(upstream_port: int, limited: bool = True) -> str:
    return serve_config(upstream_port, server='body_read_timeout = "300ms"', upstream="mint_rate = 1",
                        clients=LIMITED_CALLER if limited else "")


def wait_for(what, predicate):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"waited {TIMEOUT} s for {what}")


class Brokers:
    """The running brokers and fake Truoras, by the names the cases use."""

    def url(self, server: str) -> str:
        name, _, listener = server.partition("-")
        broker = getattr(self, name)
        return broker.admin if listener == "admin" else broker.url

    def port(self, server: str) -> int:
        return getattr(self, server).port


class Case:
    def __init__(self, name, server, method, path, status, headers=None, body="",
                 doc=None, request_valid=None, check=None, raw=None, send=None, before=None):
        self.name = name
        # "demo", "hang", "closed" or "strict" (caller API); "demo-admin", ... (admin listener)
        self.server = server
        self.method = method
        self.path = path
        self.status = status
        self.headers = headers or {}
        self.body = body
        self.doc = doc  # (path, method) in the document, or a components/responses name
        self.request_valid = request_valid  # True/False: the request schema must agree
        self.check = check  # extra assertion on the response
        self.raw = raw  # bytes sent as they are on a socket, instead of the request above
        self.send = send  # or a function of the Brokers that makes the request itself
        self.before = before  # a function of the Brokers run first

    def answer(self, brokers: Brokers):
        if self.before:
            self.before(brokers)
        if self.send:
            return self.send(brokers)
        if self.raw is not None:
            return raw_request(brokers.port(self.server), self.raw)
        return request(self.method, brokers.url(self.server) + self.path, self.headers, self.body)


def expecting(what, predicate):
    """An extra check on a response."""

    def check(r):
        assert predicate(r), f"expected {what}: {r}"

    return check


def error_is(code, **more):
    """Checks the broker's `error` code, and any other body fields given."""
    return expecting(f"{code} {more}", lambda r: r.json()["error"] == code
                     and all(r.json().get(k) == v for k, v in more.items()))


def nothing_upstream(r):
    assert r.upstream_calls == 0, f"{r.upstream_calls} call(s) reached Truora: {r}"


def both(*checks):
    def check(r):
        for c in checks:
            c(r)

    return check


def op_doc(path, method):
    return (path, method.lower())


def raw_head(method, path, headers, extra="", body=""):
    """A request as bytes: its head from `headers` and the literal header lines `extra`."""
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}{extra}\r\n{body}".encode()


def saturate(brokers):
    """One miss holds the hang broker's only upstream slot (its Truora never answers); another
    user's miss meanwhile is refused at once. The held one ends in 504 after upstream.timeout."""
    held = {}

    def hold():
        held["answer"] = request("POST", brokers.hang.url + "/v1/tokens", {**AUTH, **FORM_CT},
                                 FORM.replace("openapi-user-1", "held-user"))

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        wait_for("a call in flight to the hanging Truora", lambda: request(
            "GET", brokers.hang.admin + "/readyz").json()["upstream"]["in_flight"] == 1)
        r = request("POST", brokers.hang.url + "/v1/tokens", {**AUTH, **FORM_CT},
                    FORM.replace("openapi-user-1", "saturating-user"))
    finally:
        holder.join(TIMEOUT)
    r.held = held.get("answer")
    return r


def flood_deletes(brokers):
    """More DELETEs than cache.invalidate_rate (10 a second) allows: the first refused is kept."""
    for _ in range(40):
        r = request("DELETE", brokers.hang.url + "/v1/tokens?account_id=flood-user", AUTH, "")
        if r.status != 200:
            return r
    return r


def cases():
    big = FORM + "&start_variables.metadata.x=" + "a" * 20000
    sandbox = lambda status: FORM.replace("IPF0123456789abcdef", f"IPFsandbox{status}")  # noqa: E731
    user = lambda name: FORM.replace("openapi-user-1", name)  # noqa: E731
    json_body = json.dumps({
        "country": "CO", "flow_id": "IPF0123456789abcdef",
        "redirect_url": "https://example.com/done", "account_id": "openapi.user_2",
        "emails": ["a@example.com", "b@example.org"], "api_key_version": 1,
        "start_variables": {"metadata": {"order": "42"}},
    })
    tokens, api_keys = op_doc("/v1/tokens", "post"), op_doc("/v1/api-keys", "post")
    delete = op_doc("/v1/tokens", "delete")
    readyz, reload = op_doc("/readyz", "get"), op_doc("/admin/reload", "post")
    same_key = {}
    chunked = f"{len(FORM):x}\r\n{FORM}\r\n0\r\n\r\n"
    filler = "".join(f"X-Filler-{i}: x\r\n" for i in range(80))  # server.max_headers is 64

    def remember(r):
        same_key["first"] = r.json()["api_key"]

    def is_hit(r):
        assert r.headers["x-cache"] == "HIT" and r.json()["cache"] == "hit", r
        assert r.json()["api_key"] == same_key["first"], "a hit hands back the same token"

    def generated_id(r):
        assert GENERATED_ID.match(r.headers["x-request-id"]), f"not an id the broker made: {r}"

    def denied(rule, field=None):
        return both(error_is("forbidden_by_policy", rule=rule, field=field), nothing_upstream)

    def saturated(r):
        assert r.json()["error"] == "upstream_saturated" and r.headers["retry-after"] == "1", r
        assert r.held is not None and r.held.status == 504, f"the held call: {r.held}"

    def unrestricted(brokers):
        brokers.strict.rewrite(strict_config(brokers.truora.port, limited=False))

    def broken(brokers):
        brokers.strict.rewrite("[server\nlisten = ")

    def reload_counted(r):
        assert 'token_broker_config_reloads_total{result="ok"} 1' in r.text(), "one reload ok"
        assert 'token_broker_config_reloads_total{result="error"} 1' in r.text(), "one refused"

    return [
        # POST /v1/tokens
        Case("tokens miss", "demo", "POST", "/v1/tokens", 200, {**DEMO_AUTH, **FORM_CT}, FORM, tokens, True, remember),
        Case("tokens hit", "demo", "POST", "/v1/tokens", 200, {**DEMO_AUTH, **FORM_CT}, FORM, tokens, True, is_hit),
        Case("tokens json", "demo", "POST", "/v1/tokens", 200, {**DEMO_AUTH, **JSON_CT}, json_body, tokens, True),
        Case("tokens repeated emails", "demo", "POST", "/v1/tokens", 200, {**DEMO_AUTH, **FORM_CT},
             FORM + "&emails=a%40example.com&emails=b%40example.org&phone=%2B573100000000", tokens, True),
        Case("tokens backend key refused", "demo", "POST", "/v1/tokens", 400, {**DEMO_AUTH, **FORM_CT},
             FORM + "&key_type=backend", tokens, False),
        Case("tokens unknown field", "demo", "POST", "/v1/tokens", 400, {**DEMO_AUTH, **FORM_CT},
             FORM + "&surprise=1", tokens, False),
        Case("tokens bad country", "demo", "POST", "/v1/tokens", 400, {**DEMO_AUTH, **FORM_CT},
             FORM.replace("CO", "US"), tokens, False),
        Case("tokens http redirect", "demo", "POST", "/v1/tokens", 400, {**DEMO_AUTH, **FORM_CT},
             FORM.replace("https%3A", "http%3A"), tokens, False),
        Case("tokens missing flow", "demo", "POST", "/v1/tokens", 400, {**DEMO_AUTH, **FORM_CT},
             "country=CO&redirect_url=https%3A%2F%2Fexample.com%2Fdone", tokens, False),
        Case("tokens malformed json", "demo", "POST", "/v1/tokens", 400, {**DEMO_AUTH, **JSON_CT}, "{", tokens),
        Case("tokens master key header", "demo", "POST", "/v1/tokens", 400,
             {**DEMO_AUTH, **FORM_CT, "Truora-API-Key": "not-a-real-key"}, FORM, tokens),
        Case("tokens no credentials", "demo", "POST", "/v1/tokens", 401, FORM_CT, FORM, tokens),
        Case("tokens unknown secret", "demo", "POST", "/v1/tokens", 401,
             {"Authorization": "Bearer not-a-client-secret", **FORM_CT}, FORM, tokens),
        Case("tokens too large", "demo", "POST", "/v1/tokens", 413, {**DEMO_AUTH, **FORM_CT}, big, tokens),
        Case("tokens text/plain", "demo", "POST", "/v1/tokens", 415,
             {**DEMO_AUTH, "Content-Type": "text/plain"}, FORM, tokens),
        Case("tokens upstream 500", "demo", "POST", "/v1/tokens", 502, {**DEMO_AUTH, **FORM_CT}, sandbox(500), tokens, True),
        Case("tokens key rejected", "demo", "POST", "/v1/tokens", 502, {**DEMO_AUTH, **FORM_CT}, sandbox(401), tokens, True),
        Case("tokens upstream 400", "demo", "POST", "/v1/tokens", 502, {**DEMO_AUTH, **FORM_CT}, sandbox(400), tokens, True),
        Case("tokens timeout", "hang", "POST", "/v1/tokens", 504, {**AUTH, **FORM_CT}, FORM, tokens, True),
        Case("tokens connection lost", "hang", "POST", "/v1/tokens", 502, {**AUTH, **FORM_CT},
             FORM.replace("IPF0123456789abcdef", "IPFreset"), tokens, True, error_is("upstream_connection_lost")),
        Case("tokens saturated", "hang", "POST", "/v1/tokens", 503, {**AUTH, **FORM_CT}, user("saturating-user"),
             tokens, True, saturated, send=saturate),
        # The closed port: the first miss opens the breaker (threshold 1), the next are refused.
        Case("tokens unreachable", "closed", "POST", "/v1/tokens", 502, {**AUTH, **FORM_CT}, FORM, tokens, True,
             error_is("upstream_unreachable")),
        Case("tokens circuit open", "closed", "POST", "/v1/tokens", 503, {**AUTH, **FORM_CT}, user("another-user"),
             tokens, True, error_is("upstream_circuit_open")),
        Case("drop-in circuit open", "closed", "POST", "/v1/api-keys", 503, {**AUTH, **FORM_CT}, FORM, api_keys, True),
        Case("readyz with the breaker open", "closed-admin", "GET", "/readyz", 200, {}, "", readyz,
             check=expecting("breaker open", lambda r: r.json()["upstream"]["breaker"] == "open")),
        # The strict broker's budget first: one mint a second, for all callers together.
        Case("tokens within the mint budget", "strict", "POST", "/v1/tokens", 200, {**AUTH, **FORM_CT},
             user("budget-user-1"), tokens, True,
             expecting("one mint", lambda r: r.upstream_calls == 1 and r.headers["x-cache"] == "MISS")),
        Case("tokens mint budget spent", "strict", "POST", "/v1/tokens", 429, {**AUTH, **FORM_CT},
             user("budget-user-2"), tokens, True, both(error_is("mint_budget_exceeded"), nothing_upstream)),
        Case("drop-in mint budget spent", "strict", "POST", "/v1/api-keys", 429, {**AUTH, **FORM_CT},
             user("budget-user-3"), api_keys, True, nothing_upstream),
        # A caller's policy.
        Case("tokens flow not allowed", "strict", "POST", "/v1/tokens", 403, {**LIMITED_AUTH, **FORM_CT},
             FORM.replace("IPF0123456789abcdef", "IPF9"), tokens, True, denied("allowed_flows", "flow_id")),
        Case("tokens country not allowed", "strict", "POST", "/v1/tokens", 403, {**LIMITED_AUTH, **FORM_CT},
             FORM.replace("CO", "MX"), tokens, True, denied("allowed_countries", "country")),
        Case("tokens redirect host not allowed", "strict", "POST", "/v1/tokens", 403, {**LIMITED_AUTH, **FORM_CT},
             FORM.replace("example.com", "evil.example.net"), tokens, True,
             denied("allowed_redirect_hosts", "redirect_url")),
        Case("drop-in not allowed", "strict", "POST", "/v1/api-keys", 403, {**LIMITED_AUTH, **FORM_CT}, FORM,
             api_keys, True, nothing_upstream),
        # Framing and slow clients, on raw sockets.
        Case("tokens body too slow", "strict", "POST", "/v1/tokens", 408, doc=tokens, check=nothing_upstream,
             raw=raw_head("POST", "/v1/tokens", {**AUTH, **FORM_CT}, "Content-Length: 200\r\n", "country=CO")),
        Case("drop-in body too slow", "strict", "POST", "/v1/api-keys", 408, doc=api_keys,
             raw=raw_head("POST", "/v1/api-keys", {**AUTH, **FORM_CT}, "Content-Length: 200\r\n", "country=CO")),
        Case("tokens chunked", "strict", "POST", "/v1/tokens", 411, doc=tokens, check=nothing_upstream,
             raw=raw_head("POST", "/v1/tokens", {**AUTH, **FORM_CT}, "Transfer-Encoding: chunked\r\n", chunked)),
        Case("drop-in chunked", "strict", "POST", "/v1/api-keys", 411, doc=api_keys,
             raw=raw_head("POST", "/v1/api-keys", {**AUTH, **FORM_CT}, "Transfer-Encoding: chunked\r\n", chunked)),
        Case("delete rate exceeded", "hang", "DELETE", "/v1/tokens", 429, doc=delete, send=flood_deletes,
             check=both(error_is("invalidation_rate_exceeded"),
                        expecting("Retry-After", lambda r: int(r.headers["retry-after"]) >= 1))),
        Case("delete chunked", "strict", "DELETE", "/v1/tokens", 411, doc=delete,
             raw=raw_head("DELETE", "/v1/tokens?account_id=x", AUTH, "Transfer-Encoding: chunked\r\n", "0\r\n\r\n")),
        Case("tokens head too large", "strict", "POST", "/v1/tokens", 431, doc=tokens,
             raw=raw_head("POST", "/v1/tokens", {**AUTH, **FORM_CT}, filler + f"Content-Length: {len(FORM)}\r\n", FORM)),
        Case("drop-in head too large", "strict", "POST", "/v1/api-keys", 431, doc=api_keys,
             raw=raw_head("POST", "/v1/api-keys", {**AUTH, **FORM_CT}, filler + f"Content-Length: {len(FORM)}\r\n", FORM)),
        Case("delete head too large", "strict", "DELETE", "/v1/tokens", 431, doc=delete,
             raw=raw_head("DELETE", "/v1/tokens?account_id=x", AUTH, filler)),
        # Reloads: the limited caller removed, then a file that does not parse.
        Case("reload", "strict-admin", "POST", "/admin/reload", 200, {}, "", reload, before=unrestricted,
             check=expecting("limited revoked", lambda r: {
                 k: v for k, v in r.json().items() if k != "key_fingerprint"} == {
                 "reloaded": True, "callers": 1, "revoked": ["limited"], "restart_required": []})),
        Case("revoked caller refused", "strict", "POST", "/v1/tokens", 401, {**LIMITED_AUTH, **FORM_CT}, FORM,
             tokens, True, nothing_upstream),
        Case("reload of a bad file", "strict-admin", "POST", "/admin/reload", 422, {}, "", reload, before=broken,
             check=expecting("the parse error", lambda r: "config file" in r.json()["message"])),
        Case("the running config kept", "strict", "DELETE", "/v1/tokens?account_id=budget-user-1", 200, AUTH, "",
             delete, check=expecting("budget-user-1's token still cached", lambda r: r.json()["invalidated"] == 1)),
        Case("reloads counted", "strict-admin", "GET", "/metrics", 200, {}, "", op_doc("/metrics", "get"),
             check=reload_counted),
        Case("reload without a file", "demo-admin", "POST", "/admin/reload", 409, {}, "", reload),
        # POST /v1/api-keys
        Case("drop-in hit", "demo", "POST", "/v1/api-keys", 200, {**DEMO_AUTH, **FORM_CT},
             "key_type=web&grant=digital-identity&" + FORM, api_keys, True,
             expecting("a hit shared with /v1/tokens", lambda r: r.headers["x-cache"] == "HIT")),
        Case("drop-in json miss", "demo", "POST", "/v1/api-keys", 200, {**DEMO_AUTH, **JSON_CT},
             json.dumps({"country": "MX", "flow_id": "IPF1", "redirect_url": "https://example.com/x"}), api_keys, True),
        Case("drop-in signals grant", "demo", "POST", "/v1/api-keys", 400, {**DEMO_AUTH, **FORM_CT},
             FORM + "&grant=signals", api_keys, False),
        Case("drop-in no credentials", "demo", "POST", "/v1/api-keys", 401, FORM_CT, FORM, api_keys),
        Case("drop-in too large", "demo", "POST", "/v1/api-keys", 413, {**DEMO_AUTH, **FORM_CT}, big, api_keys),
        Case("drop-in no content type", "demo", "POST", "/v1/api-keys", 415, DEMO_AUTH, FORM, api_keys),
        Case("drop-in upstream 500", "demo", "POST", "/v1/api-keys", 502, {**DEMO_AUTH, **FORM_CT}, sandbox(500), api_keys, True),
        Case("drop-in timeout", "hang", "POST", "/v1/api-keys", 504, {**AUTH, **FORM_CT}, FORM, api_keys, True),
        # X-Request-Id: an acceptable one comes back, anything else is replaced.
        Case("request id kept", "demo", "POST", "/v1/tokens", 200,
             {**DEMO_AUTH, **FORM_CT, "X-Request-Id": "openapi.case-1:a_B"}, FORM, tokens, True,
             expecting("the caller's id", lambda r: r.headers["x-request-id"] == "openapi.case-1:a_B")),
        Case("request id with an email replaced", "demo", "POST", "/v1/tokens", 401,
             {**FORM_CT, "X-Request-Id": "user@example.com"}, FORM, tokens, check=generated_id),
        Case("request id too long replaced", "demo", "GET", "/v1/nothing", 404,
             {**DEMO_AUTH, "X-Request-Id": "a" * 65}, "", "NotFound", check=generated_id),
        # DELETE /v1/tokens
        Case("delete", "demo", "DELETE", "/v1/tokens?account_id=openapi-user-1", 200, DEMO_AUTH, "", delete,
             check=expecting("the cached token dropped", lambda r: r.json()["invalidated"] >= 1)),
        Case("delete without filter", "demo", "DELETE", "/v1/tokens", 400, DEMO_AUTH, "", delete),
        Case("delete unknown parameter", "demo", "DELETE", "/v1/tokens?user=1", 400, DEMO_AUTH, "", delete),
        Case("delete no credentials", "demo", "DELETE", "/v1/tokens?account_id=x", 401, {}, "", delete),
        # Outside the listed operations of the caller API
        Case("unknown path", "demo", "GET", "/v1/nothing", 404, DEMO_AUTH, "", "NotFound"),
        Case("GET tokens", "demo", "GET", "/v1/tokens", 405, DEMO_AUTH, "", "MethodNotAllowed",
             check=expecting("Allow: POST, DELETE", lambda r: r.headers["allow"] == "POST, DELETE")),
        Case("PUT api-keys", "demo", "PUT", "/v1/api-keys", 405, DEMO_AUTH, "", "MethodNotAllowed",
             check=expecting("Allow: POST", lambda r: r.headers["allow"] == "POST")),
        # Admin listener
        Case("status page", "demo-admin", "GET", "/", 200, {}, "", op_doc("/", "get"),
             check=expecting("the broker's page", lambda r: "token-broker" in r.text())),
        Case("metrics", "demo-admin", "GET", "/metrics", 200, {}, "", op_doc("/metrics", "get")),
        Case("healthz", "demo-admin", "GET", "/healthz", 200, {}, "", op_doc("/healthz", "get")),
        Case("readyz", "demo-admin", "GET", "/readyz", 200, {}, "", readyz,
             check=expecting("a closed breaker", lambda r: r.json()["upstream"]["breaker"] == "closed")),
        Case("POST status page", "demo-admin", "POST", "/", 405, {}, "", op_doc("/", "get")),
        Case("POST metrics", "demo-admin", "POST", "/metrics", 405, {}, "", op_doc("/metrics", "get")),
        Case("POST healthz", "demo-admin", "POST", "/healthz", 405, {}, "", op_doc("/healthz", "get")),
        Case("DELETE readyz", "demo-admin", "DELETE", "/readyz", 405, {}, "", readyz),
        Case("GET reload", "demo-admin", "GET", "/admin/reload", 405, {}, "", op_doc("/admin/reload", "post")),
        Case("admin never serves tokens", "demo-admin", "POST", "/v1/tokens", 404, {**DEMO_AUTH, **FORM_CT}, FORM,
             "AdminNotFound"),
        # Throttling last: a broker may hold back further mints for a while after a 429.
        Case("tokens throttled", "demo", "POST", "/v1/tokens", 503, {**DEMO_AUTH, **FORM_CT}, sandbox(429), tokens, True),
        Case("drop-in throttled", "demo", "POST", "/v1/api-keys", 503, {**DEMO_AUTH, **FORM_CT}, sandbox(429), api_keys, True),
    ]


def documented_response(case, status):
    """The document's response object for this case and status, or an assertion error."""
    if isinstance(case.doc, str):
        return resolve(SPEC["components"]["responses"][case.doc])
    path, method = case.doc
    responses = SPEC["paths"][path][method]["responses"]
    assert str(status) in responses, f"{case.name}: {method.upper()} {path} answered {status}, not documented"
    return resolve(responses[str(status)])


class TheDocument(unittest.TestCase):
    def test_is_a_valid_openapi_3_1_document(self):
        openapi_spec_validator.validate(SPEC)
        self.assertTrue(SPEC["openapi"].startswith("3.1"))

    def test_lists_exactly_the_routes_the_broker_serves(self):
        self.assertEqual(
            {(p, m) for p, item in SPEC["paths"].items() for m in item if m in ("get", "post", "delete", "put", "patch")},
            {("/v1/tokens", "post"), ("/v1/tokens", "delete"), ("/v1/api-keys", "post"),
             ("/", "get"), ("/metrics", "get"), ("/healthz", "get"), ("/readyz", "get"),
             ("/admin/reload", "post")},
        )


class LiveAnswers(unittest.TestCase):
    """Each case against a real broker process."""

    @classmethod
    def setUpClass(cls):
        cls.closing = []
        try:
            b = cls.brokers = Brokers()
            b.demo = Demo()
            cls.closing.append(b.demo)
            b.hanging_truora = FakeTruora(mints=False)
            cls.closing.append(b.hanging_truora)
            b.truora = FakeTruora(mints=True)
            cls.closing.append(b.truora)
            env = clean_env(TRUORA_API_KEY="openapi-test-master-key")
            # 2 s of upstream.timeout: the saturation case's second request must arrive while the
            # first still holds the only upstream slot, even on a loaded machine.
            b.hang = Serve(serve_config(b.hanging_truora.port, upstream="max_concurrent = 1\nbreaker_threshold = 10",
                                        timeout="2s"), env=env)
            cls.closing.append(b.hang)
            b.closed = Serve(serve_config(free_port(), upstream="breaker_threshold = 1"), env=env)
            cls.closing.append(b.closed)
            b.strict = Serve(strict_config(b.truora.port), env=env)
            cls.closing.append(b.strict)
            cls.results = []
            for case in cases():
                before = b.truora.calls
                r = case.answer(b)
                r.upstream_calls = b.truora.calls - before
                cls.results.append((case, r))
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for c in reversed(cls.closing):
            c.close()
        cls.closing = []

    def test_each_answer_matches_the_document(self):
        for case, r in self.results:
            with self.subTest(case.name):
                self.assertEqual(r.status, case.status, f"{case.name}: {r}")
                doc = documented_response(case, r.status)
                for name, header in doc.get("headers", {}).items():
                    header = resolve(header)
                    value = r.headers.get(name.lower())
                    if header.get("required"):
                        self.assertIsNotNone(value, f"{case.name}: header {name} missing: {r}")
                    if value is not None:
                        self.assertEqual(schema_errors(header["schema"], value), [], f"{case.name}: {name}")
                content = doc.get("content")
                if content is None:
                    self.assertEqual(r.body, b"", f"{case.name}: the document gives no body")
                else:
                    essence = r.headers.get("content-type", "").split(";")[0].strip()
                    media = {k.split(";")[0].strip(): v for k, v in content.items()}
                    self.assertIn(essence, media, f"{case.name}: content type {r.headers.get('content-type')}")
                    schema = media[essence]["schema"]
                    body = r.json() if essence == "application/json" else r.text()
                    self.assertEqual(schema_errors(schema, body), [], f"{case.name}: {r}")
                if case.check:
                    case.check(r)

    def test_requests_agree_with_the_request_schema(self):
        body_doc = resolve(SPEC["components"]["requestBodies"]["TokenRequest"])["content"]
        for case, _ in self.results:
            if case.request_valid is None:
                continue
            with self.subTest(case.name):
                ct = case.headers.get("Content-Type", "")
                instance = json.loads(case.body) if ct == "application/json" else form_to_object(case.body)
                errors = schema_errors(body_doc[ct]["schema"], instance)
                if case.request_valid:
                    self.assertEqual(errors, [], case.name)
                else:
                    self.assertNotEqual(errors, [], f"{case.name}: the broker refuses it, the schema accepts it")

    def test_every_documented_response_was_seen(self):
        seen = {(c.doc[0], c.doc[1], str(r.status)) for c, r in self.results if isinstance(c.doc, tuple)}
        documented = {
            (path, method, status)
            for path, item in SPEC["paths"].items()
            for method, op in item.items()
            if method in ("get", "post", "delete")
            for status in op["responses"]
        }
        missing = documented - seen - set(NOT_PROVOKED)
        self.assertEqual(missing, set(), "documented but never provoked by a case")
        used = {c.doc for c, _ in self.results if isinstance(c.doc, str)}
        self.assertEqual(used, {"NotFound", "MethodNotAllowed", "AdminNotFound"})

    def test_no_answer_leaks_the_master_key(self):
        for case, r in self.results:
            self.assertNotIn("openapi-test-master-key", r.text() + json.dumps(r.headers), case.name)


if __name__ == "__main__":
    unittest.main()

"""docs/openapi.yaml against the running broker's real answers.

Real brokers are started as processes on free loopback ports: `token-broker demo` (its embedded
sandbox Truora answers tokens, and errors on demand through flow ids `IPFsandbox<status>`), and
two `token-broker serve` instances, one in front of a loopback upstream that never answers (504)
and one in front of a closed port (502 upstream_unreachable). Each case sends a real request and
checks the answer against the document's response for that path, method and status: the status
is documented, every required header is there and matches its schema, the content type is a
documented one and the body validates against its schema. Requests meant to be accepted are
checked against the request schema, and some that the broker refuses are checked to be refused
by the schema too. Last, every response the document lists must have been seen, except the
500 that no request can cause.
"""

import copy
import hashlib
import json
import socket
import threading
import unittest
import urllib.parse

import jsonschema
import openapi_spec_validator
import yaml

from support import DOCS, Demo, Serve, clean_env, free_port, request

SPEC = yaml.safe_load((DOCS / "openapi.yaml").read_text(encoding="utf-8"))

SECRET = "openapi-test-secret-0123456789"
AUTH = {"Authorization": f"Bearer {SECRET}"}
DEMO_AUTH = {"Authorization": "Bearer demo-secret"}
FORM_CT = {"Content-Type": "application/x-www-form-urlencoded"}
JSON_CT = {"Content-Type": "application/json"}
FORM = "country=CO&flow_id=IPF0123456789abcdef&redirect_url=https%3A%2F%2Fexample.com%2Fdone&account_id=openapi-user-1"

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


class Hang:
    """A loopback 'Truora' that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
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
                self.held.append(conn)
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)
        for c in self.held:
            c.close()
        self.sock.close()


def serve_config(upstream_port: int) -> str:
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    return f"""
[server]
listen = "127.0.0.1:{{listen}}"
admin_listen = "127.0.0.1:{{admin}}"
shutdown_timeout = "1s"
[upstream]
account_url = "http://127.0.0.1:{upstream_port}"
timeout = "1s"
[[clients]]
id = "openapi"
token_sha256 = "{digest}"
"""


class Case:
    def __init__(self, name, server, method, path, status, headers=None, body="",
                 doc=None, request_valid=None, check=None):
        self.name = name
        self.server = server  # "demo", "admin", "hang" or "closed"
        self.method = method
        self.path = path
        self.status = status
        self.headers = headers or {}
        self.body = body
        self.doc = doc  # (path, method) in the document, or a components/responses name
        self.request_valid = request_valid  # True/False: the request schema must agree
        self.check = check  # extra assertion on the response


def expecting(what, predicate):
    """An extra check on a response."""

    def check(r):
        assert predicate(r), f"expected {what}: {r}"

    return check


def op_doc(path, method):
    return (path, method.lower())


def cases():
    big = FORM + "&start_variables.metadata.x=" + "a" * 20000
    sandbox = lambda status: FORM.replace("IPF0123456789abcdef", f"IPFsandbox{status}")  # noqa: E731
    json_body = json.dumps({
        "country": "CO", "flow_id": "IPF0123456789abcdef",
        "redirect_url": "https://example.com/done", "account_id": "openapi.user_2",
        "emails": ["a@example.com", "b@example.org"], "api_key_version": 1,
        "start_variables": {"metadata": {"order": "42"}},
    })
    tokens, api_keys = op_doc("/v1/tokens", "post"), op_doc("/v1/api-keys", "post")
    delete = op_doc("/v1/tokens", "delete")
    same_key = {}

    def remember(r):
        same_key["first"] = r.json()["api_key"]

    def is_hit(r):
        assert r.headers["x-cache"] == "HIT" and r.json()["cache"] == "hit", r
        assert r.json()["api_key"] == same_key["first"], "a hit hands back the same token"

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
        Case("tokens unreachable", "closed", "POST", "/v1/tokens", 502, {**AUTH, **FORM_CT}, FORM, tokens, True,
             expecting("upstream_unreachable", lambda r: r.json()["error"] == "upstream_unreachable")),
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
        Case("metrics", "admin", "GET", "/metrics", 200, {}, "", op_doc("/metrics", "get")),
        Case("healthz", "admin", "GET", "/healthz", 200, {}, "", op_doc("/healthz", "get")),
        Case("readyz", "admin", "GET", "/readyz", 200, {}, "", op_doc("/readyz", "get")),
        Case("POST metrics", "admin", "POST", "/metrics", 405, {}, "", op_doc("/metrics", "get")),
        Case("POST healthz", "admin", "POST", "/healthz", 405, {}, "", op_doc("/healthz", "get")),
        Case("DELETE readyz", "admin", "DELETE", "/readyz", 405, {}, "", op_doc("/readyz", "get")),
        Case("admin never serves tokens", "admin", "POST", "/v1/tokens", 404, {**DEMO_AUTH, **FORM_CT}, FORM,
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
             ("/metrics", "get"), ("/healthz", "get"), ("/readyz", "get")},
        )


class LiveAnswers(unittest.TestCase):
    """Each case against a real broker process."""

    @classmethod
    def setUpClass(cls):
        cls.closing = []
        try:
            cls.demo = Demo()
            cls.closing.append(cls.demo)
            cls.hang = Hang()
            cls.closing.append(cls.hang)
            env = clean_env(TRUORA_API_KEY="openapi-test-master-key")
            cls.hung = Serve(serve_config(cls.hang.port), env=env)
            cls.closing.append(cls.hung)
            cls.closed = Serve(serve_config(free_port()), env=env)
            cls.closing.append(cls.closed)
            cls.results = []
            bases = {"demo": cls.demo.url, "admin": cls.demo.admin,
                     "hang": cls.hung.url, "closed": cls.closed.url}
            for case in cases():
                r = request(case.method, bases[case.server] + case.path, case.headers, case.body)
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
                content = doc.get("content", {})
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

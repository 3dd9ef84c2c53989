"""The documentation as a reader uses it: the README's and docs/clients.md's shell snippets run
against a real demo, the client examples run against it too, and every relative link resolves.

Snippets: every ```sh block, in order, against a fresh `token-broker demo` on free loopback
ports (the snippets' 127.0.0.1:8080, :9090, :8081 (sandbox) and :8082 (webhooks) are rewritten
to them), each with bash
-e -o pipefail and a timeout, with the debug `token-broker` first on the PATH. Each must exit 0.
When the block right after one is a ```text block showing an answer, the real answer must agree
with it: the same status line, the same JSON fields with the same stable values (`error`,
`cache`, `message`, ...; shortened tokens and times are not compared), and every metrics line
shown appears as shown.

Skipped, on purpose: blocks that run `make run` (it builds and runs the demo on the fixed ports
8080 and 9090 until Ctrl-C: the demo started here stands in for it) and `make test` (it would
run this very suite again, recursively).
"""

import html.parser
import json
import os
import re
import shutil
import unittest

from support import DOCS, ROOT, Demo, binary, clean_env, request, run

SKIP = ("make run", "make test")
RECORDING_RULE = re.compile(r"\b[a-z_]+:token_broker_[a-z0-9_]+:[a-z0-9_]+")
STABLE = {"error", "field", "cache", "message", "invalidated", "code", "http_code", "ready"}


def blocks(markdown):
    """[(language, text)] of the fenced blocks, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", markdown, re.M | re.S)]


def runnable(markdown):
    """[(snippet, expected text or None)] for every sh block."""
    found = blocks(markdown)
    out = []
    for i, (lang, text) in enumerate(found):
        if lang != "sh" or any(s in text for s in SKIP):
            continue
        following = found[i + 1] if i + 1 < len(found) else None
        out.append((text, following[1] if following and following[0] == "text" else None))
    return out


def split_answer(text):
    """(status line or None, header lines, body) of an answer as curl -i prints it."""
    text = text.replace("\r\n", "\n")
    if text.startswith("HTTP/"):
        head, _, body = text.partition("\n\n")
        lines = head.split("\n")
        return lines[0].strip(), lines[1:], body.strip()
    return None, [], text.strip()


class SnippetRunner:
    """Mixin: runs the sh blocks of `document` against a fresh demo, in order."""

    document = None

    def test_every_snippet_runs_and_answers_as_shown(self):
        snippets = runnable((ROOT / self.document).read_text(encoding="utf-8"))
        self.assertTrue(snippets, f"{self.document} has no sh block")
        env = clean_env(PATH=f"{binary().parent}{os.pathsep}{os.environ['PATH']}")
        with Demo() as demo:
            for snippet, expected in snippets:
                script = snippet.replace("127.0.0.1:8080", f"127.0.0.1:{demo.port}")
                script = script.replace("127.0.0.1:9090", f"127.0.0.1:{demo.admin_port}")
                script = script.replace("127.0.0.1:8081", f"127.0.0.1:{demo.sandbox_port}")
                script = script.replace("127.0.0.1:8082", f"127.0.0.1:{demo.webhook_port}")
                with self.subTest(snippet.splitlines()[0]):
                    result = run(["bash", "-e", "-o", "pipefail", "-c", script], env=env, timeout=30)
                    self.assertEqual(result.returncode, 0, f"{snippet}\n{result.stdout}\n{result.stderr}")
                    if expected is not None:
                        self.agrees(result.stdout, expected, snippet)

    def agrees(self, actual, expected, snippet):
        exp_status, exp_headers, exp_body = split_answer(expected)
        act_status, act_headers, act_body = split_answer(actual)
        self.assertEqual(act_status, exp_status, snippet)
        act_header_names = {h.split(":")[0].lower() for h in act_headers}
        for header in exp_headers:
            name, _, value = header.partition(":")
            self.assertIn(name.lower(), act_header_names, f"{snippet}: no {name}")
            if name.lower() != "date" and "..." not in value:
                self.assertIn(header.strip().lower(), [h.strip().lower() for h in act_headers], snippet)
        if exp_body.startswith("{"):
            want, got = json.loads(exp_body), json.loads(act_body)
            self.assertEqual(set(got), set(want), snippet)
            for key in STABLE & set(want):
                self.assertEqual(got[key], want[key], f"{snippet}: {key}")
        else:
            for line in exp_body.splitlines():
                self.assertIn(line, act_body.splitlines(), f"{snippet}: line not in the answer")


class Readme(SnippetRunner, unittest.TestCase):
    document = "README.md"


class ClientsPage(SnippetRunner, unittest.TestCase):
    document = "docs/clients.md"


class FormParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.forms, self.inputs = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "form":
            self.forms.append(dict(attrs))
        if tag == "input":
            self.inputs.append(dict(attrs))


class ClientExamples(unittest.TestCase):
    """docs/examples against a real demo; their browser side parsed as a browser would."""

    def check_form(self, page, api_key):
        parser = FormParser()
        parser.feed(page)
        self.assertEqual(parser.forms, [{"method": "POST", "action": "https://identity.truora.com/"}])
        self.assertEqual(parser.inputs, [{"type": "hidden", "name": "token", "value": api_key}])

    def test_python_example(self):
        example = DOCS / "examples" / "token_client.py"
        with Demo() as demo:
            env = clean_env(TOKEN_BROKER_URL=demo.url, TOKEN_BROKER_SECRET="demo-secret")
            first = run(["python3", example], env=env)
            self.assertEqual(first.returncode, 0, first.stderr)
            self.assertEqual(json.loads(first.stdout)["cache"], "miss")
            again = run(["python3", example], env=env)
            self.assertEqual(json.loads(again.stdout), {**json.loads(again.stdout), "cache": "hit", "redirect": 303})
            self.assertNotIn("eyJ", first.stdout + again.stdout, "the example should not log tokens")

            import importlib.util

            spec = importlib.util.spec_from_file_location("token_client", example)
            client = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(client)
            answer = client.get_token(demo.url, "demo-secret", country="CO", flow_id="IPF1",
                                      redirect_url="https://example.com/done", account_id="u-1")
            self.assertEqual(client.redirect_to_identity_page(answer)[1]["Location"], answer["identity_url"])
            self.check_form(client.identity_form(answer["api_key"]), answer["api_key"])
            self.check_form(client.identity_form('a"b<c>&d'), 'a"b<c>&d')
            with self.assertRaises(client.BrokerError) as refused:
                client.get_token(demo.url, "demo-secret", country="US", flow_id="IPF1",
                                 redirect_url="https://example.com/done", account_id="u-1")
            self.assertEqual((refused.exception.status, refused.exception.code), (400, "invalid_field"))
            with self.assertRaises(client.BrokerError) as throttled:
                client.get_token(demo.url, "demo-secret", country="CO", flow_id="IPFsandbox429",
                                 redirect_url="https://example.com/done", account_id="u-1")
            self.assertEqual((throttled.exception.status, throttled.exception.retry_after), (503, 2))

    def test_node_example(self):
        node = shutil.which("node")
        self.assertIsNotNone(node, "node is not installed: apt-get install nodejs (.ci/run does)")
        example = DOCS / "examples" / "token-client.mjs"
        with Demo() as demo:
            env = clean_env(TOKEN_BROKER_URL=demo.url, TOKEN_BROKER_SECRET="demo-secret")
            first = run([node, example], env=env)
            self.assertEqual(first.returncode, 0, first.stderr)
            self.assertEqual(json.loads(first.stdout)["cache"], "miss")
            self.assertEqual(json.loads(run([node, example], env=env).stdout)["cache"], "hit")
            script = f"""
                import {{ getToken, identityForm, redirectToIdentityPage, BrokerError }} from {json.dumps(str(example))};
                const answer = await getToken({json.dumps(demo.url)}, "demo-secret",
                    {{ country: "CO", flowId: "IPF1", redirectUrl: "https://example.com/done", accountId: "u-2" }});
                const res = {{ writeHead(s, h) {{ this.s = s; this.h = h; }}, end() {{}} }};
                redirectToIdentityPage(res, answer);
                let refused;
                try {{
                    await getToken({json.dumps(demo.url)}, "demo-secret",
                        {{ country: "CO", flowId: "IPFsandbox429", redirectUrl: "https://example.com/done", accountId: "u-2" }});
                }} catch (e) {{ refused = e instanceof BrokerError && [e.status, e.code, e.retryAfter]; }}
                console.log(JSON.stringify({{ answer, status: res.s, location: res.h.Location,
                    form: identityForm(answer.api_key), escaped: identityForm('a"b<c>&d'), refused }}));
            """
            out = run([node, "--input-type=module", "-e", script], env=env)
            self.assertEqual(out.returncode, 0, out.stderr)
            got = json.loads(out.stdout)
            self.assertEqual((got["status"], got["location"]), (303, got["answer"]["identity_url"]))
            self.check_form(got["form"], got["answer"]["api_key"])
            self.check_form(got["escaped"], 'a"b<c>&d')
            self.assertEqual(got["refused"], [503, "upstream_throttled", 2])


class NamesInTheDocs(unittest.TestCase):
    """Names the docs give operators exist in the broker: metrics, recording rules, and every
    error code."""

    def pages(self):
        return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

    def test_every_metric_named_exists(self):
        named = set()
        for page in self.pages():
            # A recording rule's name (level:metric:operations) holds a metric-like middle part
            # that is no series of the broker: those names are checked against the rule file.
            text = RECORDING_RULE.sub(" ", page.read_text(encoding="utf-8"))
            named |= set(re.findall(r"\btoken_broker_[a-z_]+[a-z]", text))
        self.assertIn("token_broker_upstream_requests_total", named)
        with Demo() as demo:
            # requests_total gets its first series with the first answer.
            request("GET", f"{demo.url}/v1/tokens", {"Authorization": "Bearer demo-secret"})
            exposed = set(re.findall(r"^# TYPE (\S+)", request("GET", f"{demo.admin}/metrics").text(), re.M))
        # The shared tier's series and the fleet limits' exist only with [cache.shared] and a
        # Redis: tests/shared_cache.rs checks those names against a live scrape. The JWKS series
        # exist only with [auth.kubernetes]: tests/workload_identity.rs checks them the same way.
        only_with = ("token_broker_shared_cache_", "token_broker_fleet_", "token_broker_jwks_")
        for name in sorted(n for n in named if not n.startswith(only_with)):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            self.assertTrue(name in exposed or base in exposed, f"{name} is not a metric of the broker")

    def test_every_recording_rule_named_exists(self):
        import yaml

        named = set()
        for page in self.pages():
            named |= set(RECORDING_RULE.findall(page.read_text(encoding="utf-8")))
        self.assertIn("job:token_broker_cache_hit:ratio_rate5m", named)
        rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "recording.rules.yml").read_text(encoding="utf-8"))
        recorded = {r["record"] for group in rules["groups"] for r in group["rules"] if "record" in r}
        for name in sorted(named):
            self.assertIn(name, recorded, "a recording rule the docs name is not in deploy/prometheus")

    def test_the_runbook_covers_every_error_code(self):
        import yaml

        spec = yaml.safe_load((DOCS / "openapi.yaml").read_text(encoding="utf-8"))
        runbook = (DOCS / "operations.md").read_text(encoding="utf-8")
        codes = spec["components"]["schemas"]["Error"]["properties"]["error"]["enum"]
        self.assertGreater(len(codes), 15)
        for code in codes:
            if code in ("not_found", "method_not_allowed"):
                continue  # listed by status (404, 405)
            self.assertIn(f"`{code}`", runbook)


class MakeTargets(unittest.TestCase):
    def test_the_readme_lists_every_make_target(self):
        makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
        phony = set(re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split())
        self.assertIn("status-screenshot", phony)
        for target in phony:
            self.assertRegex(makefile, rf"(?m)^{re.escape(target)}:", f"{target} is .PHONY but not defined")
        table = (ROOT / "README.md").read_text(encoding="utf-8").split("## Make targets", 1)[1].split("\n## ", 1)[0]
        listed = set(re.findall(r"`make ([a-z0-9-]+)`", table))
        self.assertEqual(listed, phony, "the README's Make targets table and the Makefile disagree")


class Links(unittest.TestCase):
    def test_every_relative_link_resolves(self):
        pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
        checked = 0
        for page in pages:
            for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
                if re.match(r"^[a-z]+:", target):
                    continue
                checked += 1
                self.assertTrue((page.parent / target).exists(), f"{page.name}: {target}")
        self.assertGreater(checked, 5)


if __name__ == "__main__":
    unittest.main()

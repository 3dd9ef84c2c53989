"""docs/openapi.yaml against the running demo, by Schemathesis, the standard tool.

Schemathesis reads the document, generates requests from it (valid ones, and ones that break a
rule of it on purpose), sends them to `token-broker demo` and checks every answer with all its
checks: no 5xx, a documented status, content type, headers and body schema, valid requests
accepted and invalid ones refused, undeclared methods answered 405 with `Allow`, and a missing or
wrong credential answered 401. Both listeners: the caller API (authenticated as the demo client,
`Bearer demo-secret`) and the admin listener.

The run is bounded (a fixed number of examples per operation, a time limit on the process) and
reproducible: a fixed seed and no example database, so `make test` sends the same requests every
time. TOKEN_BROKER_SCHEMATHESIS_SEED picks another seed and TOKEN_BROKER_SCHEMATHESIS_EXAMPLES
another count, to explore further by hand; a failure prints Schemathesis' own report, with a
curl command that reproduces each case.
"""

import json
import os
import pathlib
import sys
import tempfile
import unittest

from support import DOCS, TIMEOUT, Demo, request, run

CONFIG = pathlib.Path(__file__).with_name("schemathesis.toml")

SEED = int(os.environ.get("TOKEN_BROKER_SCHEMATHESIS_SEED", "19"))
EXAMPLES = int(os.environ.get("TOKEN_BROKER_SCHEMATHESIS_EXAMPLES", "100"))
# A run takes well under a minute on two cores; this only stops one that hangs.
RUN_LIMIT = 600


class Schemathesis(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.demo = Demo()

    @classmethod
    def tearDownClass(cls):
        cls.demo.close()

    def schemathesis(self, url, *args):
        with tempfile.TemporaryDirectory() as cwd:
            done = run(
                [
                    sys.executable,
                    "-m",
                    "schemathesis.cli",
                    "--config-file",
                    CONFIG,
                    "run",
                    DOCS / "openapi.yaml",
                    "--url",
                    url,
                    "--checks",
                    "all",
                    "--max-examples",
                    EXAMPLES,
                    "--seed",
                    SEED,
                    "--generation-database",
                    "none",
                    "--workers",
                    "1",
                    "--request-timeout",
                    TIMEOUT,
                    "--continue-on-failure",
                    "--no-color",
                    *args,
                ],
                timeout=RUN_LIMIT,
                cwd=cwd,
            )
        report = done.stdout + done.stderr
        self.assertEqual(done.returncode, 0, f"Schemathesis found problems (seed {SEED}):\n{report[-20000:]}")
        self.assertIn("No issues found", report, report[-5000:])
        return report

    def test_the_caller_api_answers_as_documented(self):
        report = self.schemathesis(
            self.demo.url,
            "--include-path-regex",
            "^/v1/",
            "--header",
            "Authorization: Bearer demo-secret",
        )
        self.assertIn("Tested: 3", report)

    def test_the_admin_listener_answers_as_documented(self):
        report = self.schemathesis(self.demo.admin, "--exclude-path-regex", "^/v1/")
        self.assertIn("Tested: 5", report)

    def test_a_json_value_of_another_type_is_refused_naming_its_field(self):
        # What Schemathesis found first: `"account_id": 0` minted a token.
        base = {
            "country": "CO",
            "flow_id": "IPF0123456789abcdef",
            "redirect_url": "https://example.com/done",
        }
        for field, value in [("account_id", 0), ("phone", 573100000000), ("emails", ["a@x.com", 1])]:
            body = json.dumps({**base, field: value})
            r = request(
                "POST",
                f"{self.demo.url}/v1/tokens",
                {"Authorization": "Bearer demo-secret", "Content-Type": "application/json"},
                body,
            )
            self.assertEqual(r.status, 400, r)
            self.assertEqual(r.json()["field"], field, r)
        # The one number the document allows: api_key_version, a whole number.
        body = json.dumps({**base, "account_id": "u-1", "api_key_version": 1})
        r = request(
            "POST",
            f"{self.demo.url}/v1/tokens",
            {"Authorization": "Bearer demo-secret", "Content-Type": "application/json"},
            body,
        )
        self.assertEqual(r.status, 200, r)


if __name__ == "__main__":
    unittest.main()

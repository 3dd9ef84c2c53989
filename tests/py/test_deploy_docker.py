"""deploy/docker: the Dockerfile's conventions, checked here since no Docker engine (and no
hadolint) is available to build or lint it, and the HEALTHCHECK probe, built and run against a
real broker.
"""

import os
import re
import shlex
import unittest

from support import DEPLOY, ROOT, Demo, free_port, run

DOCKER = DEPLOY / "docker"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
EXACT_TAG = re.compile(r":[0-9]+\.[0-9]+\.[0-9]+[^:@/]*$")
SECRETISH = re.compile(r"(SECRET|PASSWORD|PASSWD|API_KEY|APIKEY|PRIVATE|CREDENTIAL)", re.I)


def instructions(text):
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        word, _, rest = current.partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    assert not current, f"unterminated instruction: {current}"
    return out


def stages(instrs):
    """The instructions split by FROM: [(from_args, [instructions])]."""
    result = []
    for word, args in instrs:
        if word == "FROM":
            result.append((args, []))
        elif word != "ARG" or result:
            assert result, f"{word} before any FROM"
            result[-1][1].append((word, args))
    return result


def exec_form(args):
    """The JSON array of an exec-form instruction, or None for the shell form."""
    import json

    try:
        value = json.loads(args)
    except ValueError:
        return None
    return value if isinstance(value, list) else None


TEXT = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
INSTRS = instructions(TEXT)
STAGES = stages(INSTRS)
FINAL = STAGES[-1][1]


class DockerfileConventions(unittest.TestCase):
    def test_is_multi_stage(self):
        self.assertGreaterEqual(len(STAGES), 2)
        self.assertTrue(all(" AS " in f.upper() for f, _ in STAGES[:-1]), "name the build stages")

    def test_every_base_image_is_pinned(self):
        for from_args, _ in STAGES:
            image = from_args.split()[0]
            with self.subTest(image):
                if image.startswith("--platform"):
                    image = from_args.split()[1]
                self.assertNotIn("$", image, "an ARG in FROM hides the pin from review")
                self.assertNotRegex(image, r":latest(@|$)")
                self.assertTrue(
                    DIGEST.search(image) or EXACT_TAG.search(image),
                    f"{image}: pin by digest or by an exact version tag",
                )

    def test_the_build_is_a_locked_release_build_with_cached_dependencies(self):
        runs = [a for w, a in STAGES[0][1] if w == "RUN"]
        cargo = [r for r in runs if "cargo build" in r]
        self.assertTrue(cargo, "no cargo build")
        self.assertTrue(any("--release" in r and "--locked" in r for r in cargo))
        self.assertTrue(
            any("--mount=type=cache" in r and "/usr/local/cargo/registry" in r for r in cargo),
            "the crates should be cached across builds",
        )
        self.assertTrue(TEXT.startswith("# syntax=docker/dockerfile:1"), "cache mounts need BuildKit's syntax")

    def test_runs_as_a_numeric_non_root_user(self):
        users = [a for w, a in FINAL if w == "USER"]
        self.assertTrue(users, "the final stage sets no USER: it would run as root")
        user = users[-1].split(":")[0]
        self.assertRegex(user, r"^[0-9]+$", "numeric, so Kubernetes' runAsNonRoot can verify it")
        self.assertNotEqual(int(user), 0)
        # Nothing after USER switches back.
        last_user = max(i for i, (w, _) in enumerate(FINAL) if w == "USER")
        self.assertFalse([a for w, a in FINAL[last_user:] if w == "RUN"], "RUN after USER")

    def test_no_add_of_remote_files(self):
        for word, args in INSTRS:
            if word == "ADD":
                self.assertNotRegex(args, r"(https?://|git@|\.git\b)", "fetch in a RUN you can pin, or COPY")
        self.assertFalse([a for w, a in INSTRS if w == "ADD"], "use COPY: ADD unpacks and fetches implicitly")

    def test_no_secret_in_env_arg_or_label(self):
        for word, args in INSTRS:
            if word in ("ENV", "ARG", "LABEL"):
                names = re.findall(r"([A-Za-z_][A-Za-z0-9_.-]*)=", args) or [args.split()[0]]
                for name in names:
                    self.assertNotRegex(name, SECRETISH, f"{word} {name}")
                    self.assertNotEqual(name, "TRUORA_API_KEY", "the master key is never baked in")
        self.assertNotIn("TRUORA_API_KEY=", TEXT)

    def test_has_a_healthcheck_that_the_image_can_run(self):
        checks = [a for w, a in FINAL if w == "HEALTHCHECK"]
        self.assertEqual(len(checks), 1)
        self.assertNotEqual(checks[0].strip().upper(), "NONE")
        cmd = exec_form(checks[0].split("CMD", 1)[1].strip())
        self.assertIsNotNone(cmd, "exec form: the runtime image has no shell")
        copied = [shlex.split(a)[-1] for w, a in FINAL if w == "COPY"]
        self.assertIn(cmd[0], copied, "the HEALTHCHECK program must be copied into the final stage")
        self.assertIn("/healthz", cmd[-1])

    def test_entrypoint_is_the_broker_in_exec_form(self):
        entry = [exec_form(a) for w, a in FINAL if w == "ENTRYPOINT"]
        self.assertEqual(entry, [["/usr/local/bin/token-broker"]])
        self.assertEqual(exec_form([a for w, a in FINAL if w == "CMD"][-1])[0], "serve")

    def test_the_context_leaves_out_git_target_and_secrets(self):
        ignore = (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
        for pattern in (".git", "**/target", "**/*.key", "**/.env"):
            self.assertIn(pattern, ignore)

    def test_every_path_the_build_names_exists(self):
        for word, args in STAGES[0][1]:
            for path in re.findall(r"--manifest-path (\S+)", args):
                self.assertTrue((ROOT / path).is_file(), path)


class HealthcheckProbe(unittest.TestCase):
    """The probe the HEALTHCHECK runs, built as the Dockerfile builds it, against a real broker."""

    @classmethod
    def setUpClass(cls):
        target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
        built = run(
            ["cargo", "build", "--locked", "--quiet", "--manifest-path",
             DOCKER / "healthcheck" / "Cargo.toml", "--target-dir", os.path.join(target, "healthcheck")],
            timeout=300,
        )
        assert built.returncode == 0, built.stderr
        cls.probe = os.path.join(target, "healthcheck", "debug", "healthcheck")

    def test_healthy_broker_passes_and_anything_else_fails(self):
        with Demo() as demo:
            ok = run([self.probe, f"{demo.admin}/healthz"])
            self.assertEqual(ok.returncode, 0, ok.stderr)
            not_found = run([self.probe, f"{demo.admin}/nothing"])
            self.assertEqual(not_found.returncode, 1)
            self.assertIn("404", not_found.stderr)
        closed = run([self.probe, f"http://127.0.0.1:{free_port()}/healthz"])
        self.assertEqual(closed.returncode, 1)
        self.assertEqual(run([self.probe, "https://127.0.0.1:1/healthz"]).returncode, 1)


if __name__ == "__main__":
    unittest.main()

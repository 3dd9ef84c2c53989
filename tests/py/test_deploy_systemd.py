"""deploy/systemd: the unit's hardening and credential handling, its config, and
`systemd-analyze verify` and `security` on it (offline: nothing is started)."""

import os
import re
import shutil
import tempfile
import time
import tomllib
import unittest

from support import DEPLOY, TIMEOUT, Serve, binary, clean_env, request, run

UNIT_PATH = DEPLOY / "systemd" / "token-broker.service"
CONFIG_PATH = DEPLOY / "systemd" / "config.toml"
UNIT_TEXT = UNIT_PATH.read_text(encoding="utf-8")
CONFIG = tomllib.loads(CONFIG_PATH.read_text(encoding="utf-8"))


def directives(text):
    """{(section, key): [values]}: systemd allows a key more than once."""
    out, section = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


UNIT = directives(UNIT_TEXT)

# A broker to send the unit's reload signal to: one caller, loopback, the key from the environment.
SERVE_CONFIG = """
[server]
listen = "127.0.0.1:{listen}"
admin_listen = "127.0.0.1:{admin}"
shutdown_timeout = "1s"
[[clients]]
id = "checkout"
token_sha256 = "6f9875170b98f62cce7eb623bcd6af012ddc74941c8b782b00cd1bc80e2b18bb"
"""


def service(key):
    values = UNIT.get(("Service", key))
    assert values, f"[Service] {key}= is not set"
    return values[-1]


def seconds(text):
    m = re.fullmatch(r"(\d+)\s*(s|min|m)?", text)
    assert m, text
    return int(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)


def systemd_analyze():
    path = shutil.which("systemd-analyze")
    if path is None:
        raise AssertionError("systemd-analyze is not installed: apt-get install systemd (.ci/run does)")
    return path


class TheUnit(unittest.TestCase):
    def test_hardening_options(self):
        self.assertEqual(service("DynamicUser"), "yes")
        self.assertEqual(service("ProtectSystem"), "strict")
        self.assertEqual(service("NoNewPrivileges"), "yes")
        self.assertEqual(service("ProtectHome"), "yes")
        self.assertEqual(service("CapabilityBoundingSet"), "")
        self.assertEqual(service("PrivateTmp"), "yes")
        # A filtered system call must fail, not kill the broker (SIGSYS is the default).
        self.assertEqual(service("SystemCallErrorNumber"), "EPERM")

    def test_the_key_comes_from_a_credential_the_config_names(self):
        name, _, source = service("LoadCredential").partition(":")
        self.assertTrue(source.startswith("/"), "LoadCredential=<name>:<absolute path>")
        unit_name = UNIT_PATH.name
        self.assertEqual(CONFIG["upstream"]["api_key_file"], f"/run/credentials/{unit_name}/{name}")
        # Never through the environment, where it would show in /proc and `systemctl show`.
        self.assertNotIn("TRUORA_API_KEY", UNIT_TEXT)
        self.assertNotIn(("Service", "EnvironmentFile"), UNIT)

    def test_it_serves_the_installed_config(self):
        args = service("ExecStart").split()
        self.assertEqual(args[1:3], ["serve", "--config"])
        self.assertEqual(args[3], "/etc/token-broker/config.toml")

    def test_stopping_leaves_time_for_the_drain(self):
        self.assertEqual(service("KillSignal"), "SIGTERM")
        drain = seconds(CONFIG["server"]["shutdown_timeout"])
        self.assertGreater(seconds(service("TimeoutStopSec")), drain)

    def test_reload_sends_the_signal_the_broker_reloads_on(self):
        # systemd runs ExecReload= with $MAINPID set to the service's main process: run the
        # unit's own command line against a real broker and see the reload counted.
        command = service("ExecReload")
        self.assertIn("$MAINPID", command)
        with Serve(SERVE_CONFIG, env=clean_env(TRUORA_API_KEY="systemd-reload-test-key")) as broker:
            args = command.replace("$MAINPID", str(broker.proc.pid)).split()
            self.assertTrue(os.access(args[0], os.X_OK), f"{args[0]} is not an executable here")
            result = run(args)
            self.assertEqual(result.returncode, 0, result.stderr)
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                time.sleep(0.05)
                if broker.proc.poll() is not None:
                    self.fail(f"the broker exited on `{command}`:\n{broker.output()}")
                metrics = request("GET", f"{broker.admin}/metrics").text()
                if 'token_broker_config_reloads_total{result="ok"} 1' in metrics:
                    break
            else:
                self.fail(f"no reload counted after `{command}`:\n{broker.output()}")

    def test_a_bad_config_is_not_restarted_in_a_loop(self):
        self.assertEqual(service("Restart"), "on-failure")
        self.assertIn("64", service("RestartPreventExitStatus").split())

    def test_systemd_analyze_verify_finds_nothing(self):
        # verify checks that ExecStart's program exists: point it at the binary just built, in a
        # copy of the unit named as the real one. It exits 0 even on unknown or misspelt
        # directives and only prints them, so its output must be empty.
        with tempfile.TemporaryDirectory() as tmp:
            unit = os.path.join(tmp, UNIT_PATH.name)
            with open(unit, "w") as f:
                f.write(UNIT_TEXT.replace("/usr/local/bin/token-broker", str(binary())))
            result = run([systemd_analyze(), "verify", unit], env={**clean_env(), "SYSTEMD_LOG_COLOR": "0"})
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual((result.stdout + result.stderr).strip(), "")

    def test_systemd_analyze_rates_the_exposure_ok(self):
        result = run([systemd_analyze(), "security", "--offline=yes", "--no-pager", str(UNIT_PATH)])
        self.assertEqual(result.returncode, 0, result.stderr)
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
        self.assertIsNotNone(m, result.stdout)
        self.assertLessEqual(float(m.group(1)), 2.0, result.stdout)


class TheConfig(unittest.TestCase):
    def test_passes_check_config(self):
        with tempfile.TemporaryDirectory() as tmp:
            key = os.path.join(tmp, "truora-api-key")
            with open(key, "w") as f:
                f.write("systemd-test-key\n")
            config = os.path.join(tmp, "config.toml")
            text = CONFIG_PATH.read_text(encoding="utf-8")
            with open(config, "w") as f:
                f.write(text.replace(CONFIG["upstream"]["api_key_file"], key))
            result = run([binary(), "check-config", "--config", config], env=clean_env())
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertNotIn("systemd-test-key", result.stdout + result.stderr)


if __name__ == "__main__":
    unittest.main()

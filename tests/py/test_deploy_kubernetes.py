"""deploy/kubernetes: the base and the example overlay, validated offline.

- Every base manifest on its own, and every resource of the rendered base and overlay, against
  the Kubernetes 1.37 OpenAPI schemas that kubernetes-validate ships, strictly (unknown fields
  are errors). The overlay's patches are partial resources, so they are validated once merged.
- The ServiceMonitor is a Prometheus Operator CRD that kubernetes-validate has no schema for:
  it is checked structurally here (fields, and that it selects the metrics Service's port).
- kustomize cannot be installed here; tests/py/kustomize.py renders what these files use and
  refuses anything else.
- Then what the schemas cannot see: ports, probes, paths and timings agree between the
  manifests and the config.toml they ship, and every config.toml passes `token-broker
  check-config`.
"""

import os
import re
import tempfile
import unittest

import kubernetes_validate

import kustomize
from support import DEPLOY, binary, clean_env, run

K8S = DEPLOY / "kubernetes"
BASE = K8S / "base"
OVERLAY = K8S / "overlays" / "example"
# The newest Kubernetes schema the pinned kubernetes-validate ships.
KUBERNETES_VERSION = "1.37.0"
LABELS = {"app.kubernetes.io/name": "token-broker", "app.kubernetes.io/component": "broker"}


def parse_duration(text):
    """Seconds in a humantime duration of the simple kinds these configs use ("10s", "1m 30s")."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)\s*(ms|s|m|h)", text)
    assert parts and re.fullmatch(r"(\s*\d+\s*(ms|s|m|h))+\s*", text), text
    return sum(int(n) * units[u] for n, u in parts)


def toml_value(text, section, key):
    """A value of a config.toml (tomllib is Python 3.11's)."""
    import tomllib

    return tomllib.loads(text)[section][key]


def one(resources, kind, name=None):
    found = [r for r in resources if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def named(items, name):
    """The one item of a list (containers, volume mounts...) with this name."""
    found = [i for i in items if i["name"] == name]
    assert len(found) == 1, f"{len(found)} items named {name}"
    return found[0]


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


class Rendered:
    """What the checks need of one rendering."""

    def __init__(self, directory):
        self.directory = directory
        self.resources = kustomize.render(directory)
        self.deployment = one(self.resources, "Deployment", "token-broker")
        self.pod = self.deployment["spec"]["template"]["spec"]
        self.container = named(self.pod["containers"], "token-broker")
        self.ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        cm_name = next(v["configMap"]["name"] for v in self.pod["volumes"] if "configMap" in v)
        self.config = one(self.resources, "ConfigMap", cm_name)["data"]["config.toml"]


class ManifestsValidate(unittest.TestCase):
    def test_the_schema_version_is_one_the_package_ships(self):
        self.assertEqual(kubernetes_validate.utils.latest_version(), KUBERNETES_VERSION)

    def test_every_base_file_on_its_own(self):
        files = sorted(BASE.glob("*.yaml"))
        self.assertGreater(len(files), 7)
        for path in files:
            if path.name == "kustomization.yaml":
                continue
            for resource in kustomize.load(path):
                with self.subTest(path.name):
                    if resource["kind"] == "ServiceMonitor":
                        continue  # a CRD: see test_the_service_monitor_scrapes_the_admin_port
                    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)

    def test_every_rendered_resource(self):
        for directory in (BASE, OVERLAY):
            for resource in kustomize.render(directory):
                if resource["kind"] == "ServiceMonitor":
                    continue
                with self.subTest(f"{directory.name} {resource['kind']}"):
                    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)

    def test_strict_validation_rejects_a_misspelt_field(self):
        # Guards the checks above: a typo must not pass as an unknown, ignored field.
        deployment = one(kustomize.load(BASE / "deployment.yaml"), "Deployment")
        deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
        with self.assertRaises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)

    def test_every_file_a_kustomization_names_exists(self):
        for directory in (BASE, OVERLAY):
            for ref in kustomize.references(directory):
                self.assertTrue(ref.exists(), f"{directory}: {ref} does not exist")

    def test_every_file_of_the_directories_is_used(self):
        for directory in (BASE, OVERLAY):
            used = {p.resolve() for p in kustomize.references(directory)}
            for path in directory.iterdir():
                if path.name != "kustomization.yaml":
                    self.assertIn(path.resolve(), used, f"{path} is not referenced by its kustomization")

    def test_no_secret_is_committed(self):
        for directory in (BASE, OVERLAY):
            kinds = {r["kind"] for r in kustomize.render(directory)}
            self.assertNotIn("Secret", kinds)


class WhatTheIssueAsks:
    """Deployment, Services, ServiceMonitor, PDB, NetworkPolicy, HPA: run on the rendered base
    and on the rendered overlay (the two classes below)."""

    directory = None
    # What a rendering holds beyond the base's resources, and where it may go beyond DNS and
    # Truora (the overlay reads the cluster's signing keys from the API server).
    extra_kinds = []
    extra_egress = set()

    @classmethod
    def setUpClass(cls):
        cls.r = Rendered(cls.directory)

    def test_the_expected_resources_exist(self):
        r = self.r
        kinds = sorted(x["kind"] for x in r.resources)
        self.assertEqual(kinds, sorted([
            "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
            "PodDisruptionBudget", "Service", "Service", "ServiceAccount", "ServiceMonitor",
            *self.extra_kinds,
        ]))

    def test_replicas_and_autoscaling(self):
        r = self.r
        self.assertGreaterEqual(r.deployment["spec"]["replicas"], 2)
        hpa = one(r.resources, "HorizontalPodAutoscaler")
        self.assertEqual(hpa["spec"]["scaleTargetRef"], {"apiVersion": "apps/v1", "kind": "Deployment", "name": "token-broker"})
        self.assertEqual(hpa["spec"]["minReplicas"], r.deployment["spec"]["replicas"],
                         "an apply sets replicas back; the HPA must not then scale below it")
        self.assertGreater(hpa["spec"]["maxReplicas"], hpa["spec"]["minReplicas"])
        pdb = one(r.resources, "PodDisruptionBudget")
        pod_labels = r.deployment["spec"]["template"]["metadata"]["labels"]
        self.assertTrue(selects(pdb["spec"]["selector"]["matchLabels"], pod_labels))

    def test_hardening(self):
        r = self.r
        pod_sc, sc = r.pod["securityContext"], r.container["securityContext"]
        self.assertTrue(pod_sc["runAsNonRoot"] and sc["runAsNonRoot"])
        self.assertNotEqual(pod_sc["runAsUser"], 0)
        self.assertTrue(sc["readOnlyRootFilesystem"])
        self.assertFalse(sc["allowPrivilegeEscalation"])
        self.assertEqual(sc["capabilities"]["drop"], ["ALL"])
        self.assertEqual(pod_sc["seccompProfile"]["type"], "RuntimeDefault")
        self.assertFalse(r.pod["automountServiceAccountToken"])
        for kind in ("requests", "limits"):
            self.assertEqual(set(r.container["resources"][kind]), {"cpu", "memory"}, kind)

    def test_probes_are_on_the_admin_port(self):
        r = self.r
        self.assertEqual(r.container["readinessProbe"]["httpGet"], {"path": "/readyz", "port": "admin"})
        self.assertEqual(r.container["livenessProbe"]["httpGet"], {"path": "/healthz", "port": "admin"})

    def test_ports_agree_with_the_config(self):
        r = self.r
        listen = toml_value(r.config, "server", "listen")
        admin = toml_value(r.config, "server", "admin_listen")
        self.assertEqual(listen, f"0.0.0.0:{r.ports['http']}", "the pod must listen on its own address")
        self.assertEqual(admin, f"0.0.0.0:{r.ports['admin']}")
        self.assertEqual(set(r.ports), {"http", "admin"})

    def test_the_caller_service_exposes_the_caller_port_only(self):
        r = self.r
        svc = one(r.resources, "Service", "token-broker")
        self.assertEqual([p["targetPort"] for p in svc["spec"]["ports"]], ["http"])
        self.assertEqual(svc["spec"]["selector"], LABELS)
        metrics = one(r.resources, "Service", "token-broker-metrics")
        self.assertEqual([p["targetPort"] for p in metrics["spec"]["ports"]], ["admin"])
        self.assertEqual(metrics["spec"]["selector"], LABELS)
        self.assertEqual(r.deployment["spec"]["template"]["metadata"]["labels"], LABELS)

    def test_the_service_monitor_scrapes_the_admin_port(self):
        # kubernetes-validate has no schema for this CRD (monitoring.coreos.com/v1): the fields
        # are checked against the Prometheus Operator's documented ServiceMonitor spec here.
        endpoint_fields = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout",
                           "honorLabels", "honorTimestamps", "relabelings", "metricRelabelings", "params"}
        r = self.r
        sm = one(r.resources, "ServiceMonitor")
        self.assertEqual(sm["apiVersion"], "monitoring.coreos.com/v1")
        self.assertLessEqual(set(sm), {"apiVersion", "kind", "metadata", "spec"})
        self.assertLessEqual(set(sm["spec"]), {"selector", "endpoints", "namespaceSelector", "jobLabel"})
        selected = [s for s in r.resources if s["kind"] == "Service"
                    and selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        self.assertEqual([s["metadata"]["name"] for s in selected], ["token-broker-metrics"])
        port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            self.assertLessEqual(set(ep), endpoint_fields)
            self.assertIn(ep["port"], port_names)
            self.assertEqual(ep["path"], "/metrics")
            self.assertLess(parse_duration(ep["scrapeTimeout"]), parse_duration(ep["interval"]))

    def test_the_network_policy(self):
        r = self.r
        np = one(r.resources, "NetworkPolicy")
        self.assertEqual(np["spec"]["podSelector"]["matchLabels"], LABELS)
        self.assertEqual(sorted(np["spec"]["policyTypes"]), ["Egress", "Ingress"])
        ingress_ports = [p["port"] for rule in np["spec"]["ingress"] for p in rule["ports"]]
        self.assertEqual(sorted(ingress_ports), ["admin", "http"], "callers on http, Prometheus on admin, nothing else")
        for rule in np["spec"]["ingress"]:
            self.assertTrue(rule.get("from"), "an ingress rule without `from` admits everyone")
        egress = {(p["port"], p["protocol"]) for rule in np["spec"]["egress"] for p in rule["ports"]}
        self.assertEqual(egress, {(53, "UDP"), (53, "TCP"), (443, "TCP")} | self.extra_egress)

    def test_the_master_key_is_the_mounted_secret_file(self):
        r = self.r
        key_file = toml_value(r.config, "upstream", "api_key_file")
        secret_volumes = [v for v in r.pod["volumes"] if "secret" in v]
        self.assertEqual(len(secret_volumes), 1)
        volume = secret_volumes[0]
        mount = named(r.container["volumeMounts"], volume["name"])
        self.assertTrue(mount["readOnly"])
        item = volume["secret"]["items"][0]
        self.assertEqual(key_file, f"{mount['mountPath']}/{item['path']}")
        # Readable by the non-root user through its group, by no one else.
        self.assertEqual(volume["secret"]["defaultMode"], 0o440)
        self.assertEqual(r.pod["securityContext"]["fsGroup"], r.pod["securityContext"]["runAsGroup"])
        self.assertNotIn("TRUORA_API_KEY", {e["name"] for e in r.container.get("env", [])})

    def test_mounted_files_follow_their_source(self):
        # The kubelet updates a mounted Secret's or ConfigMap's files in place, which a reload
        # then reads (a rotated master key), but never files mounted with subPath.
        r = self.r
        for mount in r.container["volumeMounts"]:
            self.assertNotIn("subPath", mount, mount["name"])
            self.assertNotIn("subPathExpr", mount, mount["name"])

    def test_the_config_is_mounted_where_the_command_reads_it(self):
        r = self.r
        config_mount = named(r.container["volumeMounts"], "config")
        self.assertEqual(r.container["args"], ["serve", "--config", f"{config_mount['mountPath']}/config.toml"])

    def test_shutdown_fits_in_the_grace_period(self):
        r = self.r
        pre_stop = r.container["lifecycle"]["preStop"]["sleep"]["seconds"]
        drain = parse_duration(toml_value(r.config, "server", "shutdown_timeout"))
        grace = r.pod["terminationGracePeriodSeconds"]
        self.assertGreater(pre_stop, 0)
        self.assertGreater(grace, pre_stop + drain, "the kubelet would kill the broker mid-drain")



class TheBase(WhatTheIssueAsks, unittest.TestCase):
    directory = BASE


class TheOverlay(WhatTheIssueAsks, unittest.TestCase):
    directory = OVERLAY
    extra_kinds = ["ClusterRoleBinding"]
    extra_egress = {(6443, "TCP")}

    def test_callers_authenticate_with_projected_service_account_tokens(self):
        import tomllib

        r = self.r
        config = tomllib.loads(r.config)
        clients = config["clients"]
        self.assertTrue(clients)
        for client in clients:
            self.assertIn("service_account", client, client["id"])
            self.assertNotIn("token_sha256", client, f"{client['id']}: a static secret")
        k8s = config["auth"]["kubernetes"]
        self.assertTrue(k8s["audiences"])
        self.assertTrue(k8s["jwks_url"].startswith("https://kubernetes.default.svc"))
        # The broker's own token and the cluster CA come from one projected volume, mounted where
        # the config reads them; the pod's automatic token stays off (test_hardening).
        volume = named(r.pod["volumes"], "kube-api")
        mount = named(r.container["volumeMounts"], "kube-api")
        self.assertTrue(mount["readOnly"])
        sources = volume["projected"]["sources"]
        token = next(s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s)
        ca = next(s["configMap"] for s in sources if "configMap" in s)
        self.assertEqual(k8s["jwks_token_file"], f"{mount['mountPath']}/{token['path']}")
        self.assertLessEqual(token["expirationSeconds"], 3600)
        self.assertEqual(ca["name"], "kube-root-ca.crt")
        self.assertEqual(k8s["ca_file"], f"{mount['mountPath']}/{ca['items'][0]['path']}")
        # RBAC for the JWKS endpoint: the discovery role, to the broker's account only.
        binding = one(r.resources, "ClusterRoleBinding")
        self.assertEqual(binding["roleRef"]["name"], "system:service-account-issuer-discovery")
        account = one(r.resources, "ServiceAccount")
        self.assertEqual(binding["subjects"], [{
            "kind": "ServiceAccount", "name": r.pod["serviceAccountName"],
            "namespace": account["metadata"]["namespace"],
        }])
        # The API server is reachable, and only on its ports.
        np = one(r.resources, "NetworkPolicy")
        api = [rule for rule in np["spec"]["egress"]
               if {p["port"] for p in rule["ports"]} == {443, 6443}]
        self.assertEqual(len(api), 1)
        for peer in api[0]["to"]:
            self.assertEqual(set(peer), {"ipBlock"})
            self.assertNotIn("except", peer["ipBlock"])
            self.assertTrue(peer["ipBlock"]["cidr"].endswith("/32"), "the API server's addresses only")

    def test_the_overlay_pins_its_image_and_namespace(self):
        r = self.r
        self.assertRegex(r.container["image"], r"^[a-z0-9.-]+/.+(:[0-9]+\.[0-9]+\.[0-9]+|@sha256:[0-9a-f]{64})$")
        namespaced = [x for x in r.resources if x["kind"] not in kustomize.CLUSTER_SCOPED]
        self.assertEqual({x["metadata"].get("namespace") for x in namespaced}, {"identity"})
        self.assertEqual(r.deployment["spec"]["replicas"], 3)


class ShippedConfigs(unittest.TestCase):
    def test_every_config_passes_check_config(self):
        configs = [BASE / "config.toml", OVERLAY / "config.toml"]
        with tempfile.TemporaryDirectory() as tmp:
            key = os.path.join(tmp, "api-key")
            with open(key, "w") as f:
                f.write("check-config-test-key\n")
            # What the overlay's pod has mounted at /var/run/secrets/kube-api: a token and the
            # cluster CA (a certificate made here; check-config reads it but fetches nothing).
            kube_api = os.path.join(tmp, "kube-api")
            os.mkdir(kube_api)
            with open(os.path.join(kube_api, "token"), "w") as f:
                f.write("not-a-real-token\n")
            made = run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-subj", "/CN=cluster-ca", "-days", "1",
                        "-keyout", os.path.join(kube_api, "ca.key"), "-out", os.path.join(kube_api, "ca.crt")])
            self.assertEqual(made.returncode, 0, made.stderr)
            for path in configs:
                with self.subTest(str(path.relative_to(DEPLOY))):
                    text = path.read_text(encoding="utf-8")
                    self.assertIn('api_key_file = "/var/run/secrets/truora/api-key"', text)
                    local = os.path.join(tmp, "config.toml")
                    with open(local, "w") as f:
                        f.write(text.replace("/var/run/secrets/truora/api-key", key)
                                .replace("/var/run/secrets/kube-api", kube_api))
                    result = run([binary(), "check-config", "--config", local], env=clean_env())
                    self.assertEqual(result.returncode, 0, result.stderr)
                    self.assertIn(": ok (", result.stdout)
                    self.assertNotIn("check-config-test-key", result.stdout + result.stderr)


if __name__ == "__main__":
    unittest.main()

"""A small kustomize renderer, for checking deploy/kubernetes without the kustomize binary
(which cannot be installed here).

It supports exactly what deploy/kubernetes uses, and refuses any other kustomization field so
that nothing is silently ignored: `resources` (files and directories), `namespace`, `images`
(newName, newTag, digest), `configMapGenerator` (files; behavior create or replace) and
`patches` (strategic-merge patch files, matched on kind and name).

Differences from kustomize, none of which changes what the checks look at: generated
ConfigMaps keep their plain name (kustomize adds a content hash and rewrites references to it),
and strategic merge knows only the merge keys of the lists that these manifests hold
(containers, env, volumes and volumeMounts, ports); every other list is replaced whole, as
kustomize does for lists without a merge key (NetworkPolicy rules, for one).
"""

import copy
import pathlib

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "configMapGenerator", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass"}
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def references(directory):
    """Every file or directory a kustomization names, as paths (they may not exist)."""
    k = load(pathlib.Path(directory) / "kustomization.yaml")[0]
    refs = [pathlib.Path(directory) / r for r in k.get("resources", [])]
    refs += [pathlib.Path(directory) / p["path"] for p in k.get("patches", [])]
    for gen in k.get("configMapGenerator", []):
        refs += [pathlib.Path(directory) / f.split("=")[-1] for f in gen.get("files", [])]
    return refs


def merge(base, patch, field=None):
    """Strategic merge of `patch` into `base` (both plain YAML values)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        key = MERGE_KEYS.get(field)
        if field == "ports" and all(isinstance(p, dict) and "containerPort" in p for p in base + patch):
            key = "containerPort"
        if key and all(isinstance(i, dict) and key in i for i in base + patch):
            out = [copy.deepcopy(i) for i in base]
            for item in patch:
                match = [n for n, b in enumerate(out) if b[key] == item[key]]
                if match:
                    out[match[0]] = merge(out[match[0]], item, None)
                else:
                    out.append(copy.deepcopy(item))
            return out
    return copy.deepcopy(patch)


def set_image(container, images):
    name, sep, tag = container["image"].partition(":")
    for image in images:
        if image["name"] == name:
            name = image.get("newName", name)
            if "digest" in image:
                container["image"] = f"{name}@{image['digest']}"
            else:
                container["image"] = f"{name}:{image.get('newTag', tag)}" if (sep or "newTag" in image) else name


def render(directory):
    """The resources a kustomization produces, as dicts; ConfigMaps from generators carry their
    files under `data`."""
    directory = pathlib.Path(directory)
    k = load(directory / "kustomization.yaml")[0]
    unknown = set(k) - SUPPORTED
    if unknown:
        raise ValueError(f"{directory}: this renderer does not support {sorted(unknown)}")
    resources = []
    for ref in k.get("resources", []):
        path = directory / ref
        resources += render(path) if path.is_dir() else load(path)
    for gen in k.get("configMapGenerator", []):
        data = {}
        for f in gen.get("files", []):
            key, _, source = f.rpartition("=")
            source_path = directory / source
            data[key or source_path.name] = source_path.read_text(encoding="utf-8")
        behavior = gen.get("behavior", "create")
        existing = [r for r in resources if r["kind"] == "ConfigMap" and r["metadata"]["name"] == gen["name"]]
        if behavior == "create":
            if existing:
                raise ValueError(f"ConfigMap {gen['name']} already exists")
            resources.append({"apiVersion": "v1", "kind": "ConfigMap",
                              "metadata": {"name": gen["name"]}, "data": data})
        elif behavior == "replace":
            if not existing:
                raise ValueError(f"ConfigMap {gen['name']} to replace does not exist")
            existing[0]["data"] = data
        else:
            raise ValueError(f"configMapGenerator behavior {behavior} not supported")
    for p in k.get("patches", []):
        if set(p) != {"path"}:
            raise ValueError(f"only patches with a path are supported: {p}")
        for patch in load(directory / p["path"]):
            targets = [
                n for n, r in enumerate(resources)
                if r["kind"] == patch["kind"] and r["metadata"]["name"] == patch["metadata"]["name"]
            ]
            if len(targets) != 1:
                raise ValueError(f"{p['path']}: no single {patch['kind']} {patch['metadata']['name']} to patch")
            resources[targets[0]] = merge(resources[targets[0]], patch)
    for image in k.get("images", []):
        assert "name" in image, image
    for r in resources:
        if "namespace" in k and r["kind"] not in CLUSTER_SCOPED:
            r.setdefault("metadata", {})["namespace"] = k["namespace"]
        if k.get("images") and r["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            for c in r["spec"]["template"]["spec"]["containers"]:
                set_image(c, k["images"])
    return resources

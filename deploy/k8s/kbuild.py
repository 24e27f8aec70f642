"""A small kustomize: builds deploy/k8s's overlays without kubectl, for the tests (and for a look).

It handles the subset of kustomize this bundle uses (resources, components, Secret and ConfigMap
generators with fixed names, JSON 6902 patches, images, namespace) and fails on anything else, so a
new feature in a kustomization cannot be silently ignored. tests/unit/test_deploy_k8s.py checks that
`kubectl kustomize` gives the same objects wherever kubectl is installed.

    python deploy/k8s/kbuild.py deploy/k8s/overlays/dev    # the objects, as YAML
"""
from __future__ import annotations

import base64
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

KNOWN_KEYS = {"apiVersion", "kind", "namespace", "resources", "components", "patches", "images",
              "secretGenerator", "configMapGenerator", "generatorOptions"}


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> None:
    """RFC 6902 add / replace / remove, in place."""
    for op in ops:
        *parents, last = [_unescape(t) for t in op["path"].lstrip("/").split("/")]
        node = doc
        for token in parents:
            node = node[int(token)] if isinstance(node, list) else node[token]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                node[index] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[index]
            else:
                raise ValueError(f"unsupported op {kind}")
        else:
            if kind in ("replace", "remove") and last not in node:
                raise KeyError(f"{op['path']}: no such member for {kind}")
            if kind in ("add", "replace"):
                node[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del node[last]
            else:
                raise ValueError(f"unsupported op {kind}")


def walk_containers(node: Any):
    """Every container and init container anywhere in `node` (kustomize's images transformer finds these too)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from walk_containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_containers(item)


def _generated(kind: str, gen: dict[str, Any], folder: Path) -> dict[str, Any]:
    pairs: dict[str, str] = {}
    for literal in gen.get("literals", []):
        key, _, value = literal.partition("=")
        pairs[key] = value
    for env in gen.get("envs", []):
        for line in (folder / env).read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                pairs[key.strip()] = value
    if not set(gen) <= {"name", "literals", "envs"}:
        raise ValueError(f"{folder}: unsupported generator fields {set(gen)}")
    if kind == "Secret":
        data = {k: base64.b64encode(v.encode()).decode() for k, v in pairs.items()}
        return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": gen["name"]}, "type": "Opaque", "data": data}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": pairs}


def build(folder: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build folder` emits, for the subset of kustomize deploy/k8s uses."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kust) - KNOWN_KEYS
    if unknown:
        raise ValueError(f"{folder}: kustomization fields kbuild cannot build: {unknown}")
    docs: list[dict[str, Any]] = []
    for res in kust.get("resources", []):
        path = folder / res
        if path.is_dir():
            docs += build(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for comp in kust.get("components", []):
        ckust = yaml.safe_load((folder / comp / "kustomization.yaml").read_text())
        if ckust["kind"] != "Component" or not set(ckust) <= {"apiVersion", "kind", "patches"}:
            raise ValueError(f"{folder / comp}: only a Component with patches is supported")
        _apply_patches(docs, ckust.get("patches", []), folder / comp)
    gens = [("Secret", g) for g in kust.get("secretGenerator", [])]
    gens += [("ConfigMap", g) for g in kust.get("configMapGenerator", [])]
    if gens:
        if kust.get("generatorOptions", {}).get("disableNameSuffixHash") is not True:
            raise ValueError(f"{folder}: generated names must be fixed (the RayService's references are not rewritten)")
        docs += [_generated(kind, g, folder) for kind, g in gens]
    _apply_patches(docs, kust.get("patches", []), folder)
    for image in kust.get("images", []):
        for container in walk_containers(docs):
            repo, _, _tag = container["image"].partition(":")
            if repo == image["name"]:
                container["image"] = f"{image.get('newName', repo)}:{image['newTag']}"
    if "namespace" in kust:
        for d in docs:
            d["metadata"]["namespace"] = kust["namespace"]
    return docs


def _apply_patches(docs: list[dict[str, Any]], patches: list[dict[str, Any]], folder: Path) -> None:
    for p in patches:
        if not set(p) <= {"target", "patch", "path"}:
            raise ValueError(f"{folder}: unsupported patch fields {set(p)}")
        ops = yaml.safe_load(p["patch"] if "patch" in p else (folder / p["path"]).read_text())
        if not isinstance(ops, list):
            raise ValueError(f"{folder}: only JSON 6902 patches (a list of ops) are supported")
        target = p["target"]
        if not set(target) <= {"kind", "name"}:
            raise ValueError(f"{folder}: unsupported target fields {set(target)}")
        hits = [d for d in docs if d["kind"] == target["kind"]
                and ("name" not in target or d["metadata"]["name"] == target["name"])]
        if not hits:
            raise ValueError(f"{folder}: patch target {target} matches nothing")
        for d in hits:
            json_patch(d, ops)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    print(yaml.safe_dump_all(build(Path(argv[0])), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

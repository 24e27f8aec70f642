"""Embed deploy/serve.yaml into the RayService's spec.serveConfigV2 (deploy/k8s/base/rayservice.yaml).

KubeRay wants the Serve config inline, as a string inside the custom resource, and kustomize cannot
put a file into a CR field; so the file stays the one source of truth and this script copies it in.
Only the serveConfigV2 block is rewritten: the rest of rayservice.yaml, comments included, is kept.

    python deploy/k8s/render.py           # rewrite base/rayservice.yaml after editing deploy/serve.yaml
    python deploy/k8s/render.py --check   # exit 1 if base/rayservice.yaml is out of date (CI)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[1]
SERVE_YAML = DEPLOY / "serve.yaml"
RAYSERVICE = DEPLOY / "k8s" / "base" / "rayservice.yaml"
KEY = "  serveConfigV2: "
INDENT = " " * 4


def render(manifest: str, serve_yaml: str) -> str:
    """`manifest` with the serveConfigV2 block replaced by `serve_yaml` as a YAML literal block."""
    if not serve_yaml.strip():
        raise ValueError("deploy/serve.yaml is empty")
    lines = manifest.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith(KEY)]
    if len(starts) != 1:
        raise ValueError(f"expected one line starting with {KEY.strip()!r} in the RayService, found {len(starts)}")
    start = starts[0]
    end = start + 1
    # The block runs until the next line indented like a key of spec (or less).
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith(INDENT)):
        end += 1
    body = serve_yaml.splitlines()
    if body[0][:1].isspace():
        raise ValueError("deploy/serve.yaml must not start with an indented line")
    # "|" keeps exactly one final newline, "|+" keeps them all: pick whichever reproduces the file.
    chomp = "|" if serve_yaml.endswith("\n") and not serve_yaml.endswith("\n\n") else "|+"
    if not serve_yaml.endswith("\n"):
        chomp = "|-"
    block = [f"{KEY}{chomp}\n"] + [(INDENT + line if line.strip() else "") + "\n" for line in body]
    # Blank lines before the next key would be read as part of a "|+" block.
    tail = lines[end:]
    return "".join(lines[:start] + block + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the manifest is up to date")
    args = parser.parse_args(argv)
    current = RAYSERVICE.read_text()
    wanted = render(current, SERVE_YAML.read_text())
    if args.check:
        if wanted != current:
            print(f"{RAYSERVICE} is out of date with {SERVE_YAML}; run: python deploy/k8s/render.py", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        RAYSERVICE.write_text(wanted)
        print(f"wrote {RAYSERVICE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Rebuild assets/emoji/emoji-styles.json.gz from pinned @iconify-json packages.

One class = one emoji name shared across icon sets (e.g. "tomato"); its
images are that emoji as drawn by each icon set ("artist style").

Usage (from the repository root):

    python3 scripts/build-emoji-asset.py

Steps:
  1. `npm pack @iconify-json/<id>@<version>` for every pinned set into the
     scratch folder .emoji-build/ (git-ignored); tarballs already there are
     reused.
  2. Check every tarball's sha256 against the pinned value; any mismatch is
     a hard error.
  3. Read package/icons.json (+ package/info.json for licence/author data)
     straight from each tarball.
  4. Keep icon names (from `icons`, not `aliases`) present in at least
     MIN_SETS of the sets, dropping skin-tone variants and `flag-*` names.
  5. Write deterministic gzip-compressed JSON (sorted keys, sorted class
     names, fixed gzip header with mtime=0) and verify it.

Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

FORMAT = "gca-hng-emoji-styles"
FORMAT_VERSION = 1

# (id, npm version, sha256 of the npm tarball) -- order is the set order used
# in the asset.  CC-BY-SA sets (openmoji, emojione-v1) are deliberately left out.
SETS: list[tuple[str, str, str]] = [
    ("noto", "1.2.9", "3e918d88fc945c0bb3d468dbace6f88caef67f01c9f0e7bcae0915a042e8f1ad"),
    ("noto-v1", "1.2.5", "2bf62c26c2c2884aa99e90aec942cdaee17a5921f05690694f4978ad4b017c37"),
    ("twemoji", "1.2.5", "19046dff7d8707ce96212ec86468b36ac5f8e60409629dd13f809265c6d0ebb7"),
    ("fluent-emoji", "1.2.7", "8044210dbf11e016d4de85f15d01a243423bd832457e7e2491df1b751c0e272b"),
    ("fluent-emoji-flat", "1.2.6", "7d064769dee690815f823bc5bcc511d957198caf9f5edd8dd9c1aa48a6aeb175"),
    ("fluent-emoji-high-contrast", "1.2.6", "0b92d48c90d2200bd499e3cdd09a127ca6a8c8ddefd34c35eb5a1e4994012ae0"),
    ("fxemoji", "1.2.2", "f3e72b3c59d05e1db03b7e308d55c0d05bd7ba3f625a90da1b79313c12858eef"),
    ("emojione", "1.2.3", "26a14f44284407e8bcde91799388dca2bfd91dbcd55a97f425524a1c5b73610e"),
    ("emojione-monotone", "1.2.1", "40b90004bafb406b59266155ef9b7e1dd67bf2947fc8db8d07388776f4d0d04e"),
    ("streamline-emojis", "1.2.4", "5dac87c876b322500989828c5823143e0100d78881627a2e4081a4b897cbfdbc"),
]

MIN_SETS = 7

# Counts produced by the pinned inputs.  The inputs are hash-checked, so any
# difference means the selection code changed; the build fails rather than
# silently writing a different dataset.
EXPECTED_CLASSES = 1038
EXPECTED_ICONS = 8874

# Iconify defaults for a missing left/top/width/height.
ICONIFY_DEFAULTS = {"left": 0, "top": 0, "width": 16, "height": 16}

# Skin-tone variants.  CLDR-style names end with (or contain, for multi-person
# emoji such as "...-light-skin-tone-medium-skin-tone") one of the five
# Fitzpatrick modifiers; emojione uses "-tone1" .. "-tone5" for a few aliases.
# Written so that e.g. "gem-stone", "headstone" and "curling-stone" survive.
SKIN_TONE_RE = re.compile(
    r"(?:^|-)(?:light|medium-light|medium|medium-dark|dark)-skin-tone(?:$|-)"
    r"|-tone[1-5](?:$|-)"
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUILD_DIR = REPO_ROOT / ".emoji-build"
DEFAULT_OUT = REPO_ROOT / "assets" / "emoji" / "emoji-styles.json.gz"


def die(msg: str) -> None:
    print(f"build-emoji-asset: ERROR: {msg}", file=sys.stderr)
    sys.exit(1)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tarball_name(set_id: str, version: str) -> str:
    # npm pack names a scoped package "@scope/name" as "scope-name-<version>.tgz".
    return f"iconify-json-{set_id}-{version}.tgz"


def fetch(set_id: str, version: str, want_sha: str, build_dir: Path, offline: bool) -> Path:
    path = build_dir / tarball_name(set_id, version)
    if not path.exists():
        if offline:
            die(f"{path} is missing and --offline was given")
        npm = shutil.which("npm")
        if npm is None:
            die("npm not found on PATH (needed for `npm pack`)")
        spec = f"@iconify-json/{set_id}@{version}"
        print(f"  npm pack {spec}", file=sys.stderr)
        res = subprocess.run(
            [npm, "pack", spec],
            cwd=build_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if res.returncode != 0:
            die(f"`npm pack {spec}` failed (exit {res.returncode}):\n{res.stderr}")
        if not path.exists():
            die(f"`npm pack {spec}` did not produce {path.name}; stdout was:\n{res.stdout}")
    got = sha256_file(path)
    if got != want_sha:
        die(
            f"sha256 mismatch for {path}\n"
            f"  expected {want_sha}\n"
            f"  got      {got}\n"
            f"Refusing to build. Delete the file to re-download it; if it still "
            f"differs, the published package is not the pinned one."
        )
    return path


def read_member_json(tar: tarfile.TarFile, name: str, required: bool = True):
    try:
        member = tar.getmember(name)
    except KeyError:
        if required:
            die(f"{tar.name}: missing {name}")
        return None
    f = tar.extractfile(member)
    if f is None:
        die(f"{tar.name}: {name} is not a regular file")
    return json.loads(f.read().decode("utf-8"))


def load_set(set_id: str, version: str, sha: str, path: Path) -> dict:
    with tarfile.open(path, "r:gz") as tar:
        pkg = read_member_json(tar, "package/package.json")
        icons = read_member_json(tar, "package/icons.json")
        info_file = read_member_json(tar, "package/info.json", required=False)
    package = f"@iconify-json/{set_id}"
    if pkg.get("name") != package or pkg.get("version") != version:
        die(f"{path.name}: package.json says {pkg.get('name')}@{pkg.get('version')}, expected {package}@{version}")
    if icons.get("prefix") != set_id:
        die(f"{path.name}: icons.json prefix is {icons.get('prefix')!r}, expected {set_id!r}")
    # IconifyInfo: prefer icons.json "info"; these package versions ship it
    # only as package/info.json (same IconifyInfo format).
    info = icons.get("info") or info_file
    if not info:
        die(f"{path.name}: no IconifyInfo block in icons.json or info.json")
    license_ = info.get("license") or {}
    author = info.get("author") or {}
    spdx = license_.get("spdx")
    if not spdx:
        die(f"{path.name}: IconifyInfo has no license.spdx")
    if pkg.get("license") and pkg["license"] != spdx:
        die(f"{path.name}: package.json license {pkg['license']!r} != info license.spdx {spdx!r}")
    if not author.get("name"):
        die(f"{path.name}: IconifyInfo has no author.name")
    defaults = {k: icons.get(k, ICONIFY_DEFAULTS[k]) for k in ICONIFY_DEFAULTS}
    return {
        "meta": {
            "id": set_id,
            "package": package,
            "version": version,
            "sha256": sha,
            "name": info.get("name", set_id),
            "license": spdx,
            "author": author["name"],
            "author_url": author.get("url"),
        },
        "defaults": defaults,
        "icons": icons["icons"],
    }


def keep_name(name: str) -> bool:
    return not name.startswith("flag-") and SKIN_TONE_RE.search(name) is None


def view_box(icon: dict, defaults: dict) -> list:
    return [icon.get(k, defaults[k]) for k in ("left", "top", "width", "height")]


def build(sets: list[dict]) -> dict:
    presence: dict[str, list[int]] = {}
    for idx, s in enumerate(sets):
        for name in s["icons"]:
            presence.setdefault(name, []).append(idx)
    names = sorted(n for n, idxs in presence.items() if len(idxs) >= MIN_SETS and keep_name(n))
    classes = []
    for name in names:
        icons = []
        for idx in presence[name]:  # already in set order
            s = sets[idx]
            icon = s["icons"][name]
            icons.append({
                "set": s["meta"]["id"],
                "view_box": view_box(icon, s["defaults"]),
                "body": icon["body"],
            })
        classes.append({"name": name, "icons": icons})
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "sets": [s["meta"] for s in sets],
        "classes": classes,
    }


def encode(doc: dict) -> bytes:
    raw = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    buf = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of build-time data.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    return buf.getvalue()


def verify(data: bytes, set_ids: list[str]) -> dict:
    doc = json.loads(gzip.decompress(data).decode("utf-8"))
    if doc.get("format") != FORMAT or doc.get("version") != FORMAT_VERSION:
        die("verify: bad format/version header")
    if [s["id"] for s in doc["sets"]] != set_ids:
        die("verify: set list/order differs")
    names = [c["name"] for c in doc["classes"]]
    if names != sorted(names) or len(set(names)) != len(names):
        die("verify: class names not sorted/unique")
    order = {sid: i for i, sid in enumerate(set_ids)}
    per_set = dict.fromkeys(set_ids, 0)
    for c in doc["classes"]:
        icons = c["icons"]
        if len(icons) < MIN_SETS:
            die(f"verify: class {c['name']!r} has only {len(icons)} icons")
        pos = [order[i["set"]] for i in icons]
        if pos != sorted(pos) or len(set(pos)) != len(pos):
            die(f"verify: class {c['name']!r} icons not in set order / duplicated set")
        for i in icons:
            if not isinstance(i["body"], str) or not i["body"].strip():
                die(f"verify: empty body for {c['name']!r} in {i['set']}")
            vb = i["view_box"]
            if len(vb) != 4 or not all(isinstance(v, (int, float)) for v in vb) or vb[2] <= 0 or vb[3] <= 0:
                die(f"verify: bad view_box {vb} for {c['name']!r} in {i['set']}")
            per_set[i["set"]] += 1
    return {"classes": len(names), "icons": sum(per_set.values()), "per_set": per_set}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR, help="scratch folder for tarballs (default: .emoji-build/)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output path (default: assets/emoji/emoji-styles.json.gz)")
    ap.add_argument("--offline", action="store_true", help="do not run npm; tarballs must already be in --build-dir")
    args = ap.parse_args()

    args.build_dir.mkdir(parents=True, exist_ok=True)
    sets = []
    for set_id, version, sha in SETS:
        path = fetch(set_id, version, sha, args.build_dir, args.offline)
        sets.append(load_set(set_id, version, sha, path))
        print(f"  ok {set_id}@{version} sha256 verified ({len(sets[-1]['icons'])} icons)", file=sys.stderr)

    doc = build(sets)
    data = encode(doc)
    stats = verify(data, [s[0] for s in SETS])
    if stats["classes"] != EXPECTED_CLASSES or stats["icons"] != EXPECTED_ICONS:
        die(
            f"got {stats['classes']} classes / {stats['icons']} icons, expected "
            f"{EXPECTED_CLASSES} / {EXPECTED_ICONS}; selection rules changed?"
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, args.out)

    print(f"wrote {args.out} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})")
    print(f"classes: {stats['classes']}  icons: {stats['icons']}")
    for sid, n in stats["per_set"].items():
        print(f"  {sid:28s} {n}")


if __name__ == "__main__":
    main()

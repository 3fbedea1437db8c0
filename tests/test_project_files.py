"""The project's files name no paths of one machine: they must work from any checkout."""
from __future__ import annotations

import re
import subprocess

from conftest import ROOT

# An absolute path into a home or work folder, where a path starts (not an S3 key such as
# `${Bucket}/work/...` or `s3://b/work/...`).
MACHINE_PATH = re.compile(r"(?:^|[\s\"'`(=:])(/(?:work|home|Users|root|mnt)/[\w.-]+)", re.MULTILINE)
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".json", ".sh", ".cfg", ""}


def tracked_text_files():
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in listing.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file() and path.suffix in TEXT_SUFFIXES:
            yield name, path


def test_no_machine_specific_paths_in_project_files():
    found = []
    for name, path in tracked_text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{name}: {m.group(1)}" for m in MACHINE_PATH.finditer(text)]
    assert not found, "machine-specific paths: " + "; ".join(found)

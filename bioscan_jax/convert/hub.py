"""Where pretrained weights come from: a local path, or a Hugging Face hub id.

``resolve('path/to/file_or_dir')`` returns the path; ``resolve('owner/name')`` (a repository) or
``resolve('owner/name:sub/dir/file.pth')`` (one file of it) goes through ``huggingface_hub`` (the
``hub`` extra): its local cache first, the hub when online. When neither has it, the error says
which file to place where, in one line.
"""

from __future__ import annotations

import os
import pathlib
import re

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:.+)?$")


def is_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and not os.path.exists(spec.split(":", 1)[0])


def resolve(spec: str, *, what: str = "weights") -> pathlib.Path:
    """A local file or directory for ``spec`` (module docstring)."""
    if os.path.exists(spec):
        return pathlib.Path(spec)
    if not is_hub_id(spec):
        raise FileNotFoundError(f"{what}: no file or directory {spec!r} (and it is not a hub id owner/name[:file])")
    repo, _, filename = spec.partition(":")
    try:
        import huggingface_hub as hf
    except ImportError:
        raise FileNotFoundError(
            f"{what}: {spec!r} is a Hugging Face hub id and huggingface_hub is not installed "
            f"(pip install 'bioscan-jax[hub]'), or download it yourself and pass the local path") from None
    errors = []
    for offline in (True, False):
        try:
            if filename:
                return pathlib.Path(hf.hf_hub_download(repo, filename, local_files_only=offline))
            return pathlib.Path(hf.snapshot_download(repo, local_files_only=offline))
        except Exception as e:  # noqa: BLE001 - offline, not cached, unknown repo: all one message
            errors.append(type(e).__name__)
    where = f"{filename} of the hub repository {repo}" if filename else f"the hub repository {repo}"
    raise FileNotFoundError(
        f"{what}: {where} is neither in the Hugging Face cache nor reachable ({', '.join(errors)}); on a machine "
        f"online run `huggingface-cli download {repo}{' ' + filename if filename else ''}` (cache in "
        f"$HF_HOME, default ~/.cache/huggingface), or pass a local path instead of {spec!r}")

"""Hugging Face hub ids on machines without a network: the local cache, or an error at once.

huggingface_hub retries an unreachable hub for minutes before it gives up (compute nodes of
clusters often have no network). Before asking the hub for a repository, `local_files_only`
probes it once per process, with a short timeout: when it cannot be reached (or HF_HUB_OFFLINE is
set) the repository is read from the local cache, and a repository the cache does not hold is a
MissingInputError that says how to get it. So is a repository the reachable hub does not give
(a mistyped id, a gated or private one, a dropped connection).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from caer_jax import errors

PROBE_TIMEOUT_S = 5.0
T = TypeVar("T")
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def is_hub_id(source: str) -> bool:
    """Whether `source` reads as "owner/name" and is not a local path."""
    return bool(_REPO_ID.fullmatch(source)) and not Path(source).exists()


@functools.cache
def hub_reachable() -> bool:
    """One HEAD request to the hub's endpoint (through the proxies huggingface_hub uses)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - whatever the transport raises, there is no hub
        return False
    return True


def local_files_only(repo_id: str, filename: str, field: str) -> bool:
    """True: load `repo_id` from the local cache only (the hub is unreachable and the cache holds
    its `filename`); False: the hub is reachable. Raises MissingInputError, naming the config
    `field`, when neither."""
    from huggingface_hub import constants, try_to_load_from_cache

    if hub_reachable():
        return False
    if isinstance(try_to_load_from_cache(repo_id, filename), str):
        return True
    raise errors.MissingInputError(
        f"{field}={repo_id!r}: no such local folder, and as a Hugging Face hub id it is not in "
        f"the local cache ({constants.HF_HUB_CACHE}) while the hub ({constants.ENDPOINT}) cannot "
        f"be reached; download it where there is a network (huggingface-cli download {repo_id} "
        f"--local-dir DIR) and set {field}=DIR"
    )


def fetch(repo_id: str, filename: str, field: str, load: Callable[[bool], T]) -> T:
    """`load(local_files_only)` for a hub id (see `local_files_only`, which probes for `filename`).
    A failure of the hub, which transformers and huggingface_hub raise as OSError (no such
    repository, a gated one, a lost connection), is a MissingInputError naming `field`."""
    from huggingface_hub import constants

    local = local_files_only(repo_id, filename, field)
    try:
        return load(local)
    except OSError as e:
        where = "the local cache" if local else f"the Hugging Face hub ({constants.ENDPOINT})"
        first = (str(e).strip().splitlines() or [""])[0]
        raise errors.MissingInputError(
            f"{field}={repo_id!r}: not found in {where} ({type(e).__name__}: {first}); check "
            "the id (e.g. openai/clip-vit-base-patch32), log in (hf auth login) for a gated or "
            "private repository, or give a local folder"
        ) from e

"""`--ray auto|local|ADDRESS`: one way for every command to reach Ray.

auto     an existing cluster (RAY_ADDRESS, or one started with `ray start` on this machine), else a
         new local instance on this machine: nothing to set up
local    always a new local instance, even when a cluster runs here
ADDRESS  a cluster: "ray://head:10001" (Ray Client) or "head:6379"

A session started here is shut down when the command ends; one that was already running in this
process (a notebook, the tests) is used as it is and left running. Paths handed to workers (videos,
feature caches, output folders) must be the same on every node: on a cluster, a shared filesystem.

Token authentication: `ray start` turns it on when a token exists (~/.ray/auth_token), but a command
given a cluster's address sends the token only with RAY_AUTH_MODE=token in its environment; without
it Ray says only "Failed to connect", so the error here says so when a token is present.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

RAY_PIN = "ray[data]==2.60.0"


def _token_hint() -> str:
    """Why a refused connection may be token authentication, when a Ray token is present and not sent."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return ""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        return ""
    where = "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else str(token_file)
    return (f"; a Ray auth token is present ({where}) but RAY_AUTH_MODE is not 'token', so none was sent: "
            "if the cluster uses token authentication, export RAY_AUTH_MODE=token (see the README's Ray section)")


class RaySetupError(RuntimeError):
    """Ray is not installed or the cluster cannot be reached; the message says what to do."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise RaySetupError(f"--ray needs the ray package: pip install '{RAY_PIN}'") from None
    return ray


@contextmanager
def ray_session(address: str = "auto", num_cpus: int | None = None, object_store_memory: int | None = None) -> Iterator[dict[str, float]]:
    """Connect (or start) Ray for the duration of the block; yields the cluster's resources.

    num_cpus / object_store_memory apply only to a new local instance (None: Ray's defaults)."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    # a wrong token (Ray >= 2.52) is refused with its own error, which explains itself
    authentication_error = getattr(getattr(ray, "exceptions", None), "AuthenticationError", ConnectionError)
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
    local = dict(num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=False, **quiet)
    try:
        if address == "local":
            ray.init(**local)
        elif address == "auto":
            if os.environ.get("RAY_ADDRESS"):
                ray.init(address="auto", **quiet)
            else:
                try:
                    ray.init(address="auto", **quiet)
                except ConnectionError:  # no cluster on this machine: start our own
                    ray.init(**local)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, ValueError, RuntimeError, authentication_error) as exc:
        raise RaySetupError(f"cannot connect to Ray at {address!r}: {exc}{_token_hint()}") from None
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()

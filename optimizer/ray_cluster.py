"""The Ray cluster onnxopt's Ray executor runs on: an existing one, or a local one on loopback.

    with connected(address) as ray:
        ref = ray.remote(num_cpus=1)(fn).remote(...)

Used by batch mode (``onnxopt.batch``: one task per model) and by the strength search
(``onnxopt.strength``: one task per candidate evaluation). Ray is an optional extra
(``pip install 'onnxopt[ray]'``), imported only here and only when asked.

Which cluster: when Ray is already initialized in this process (a user's ``ray.init``, or a
Ray task whose job submits tasks of its own), that connection is used and left open. Otherwise
``address`` (else ``$RAY_ADDRESS``) names an existing cluster to connect to; without one, a
local cluster is started for the block and shut down at its end.

A local cluster listens on the loopback interface only (127.0.0.1), with no dashboard: it runs
this user's code for this process, and nothing on the network should reach it. Ray rewrites a
loopback ``_node_ip_address`` to the machine's address on the network, and its servers (GCS,
raylet, workers, runtime-env agent) then listen on every interface, unless Ray is told that
clusters of several machines are off (``ray._private.ray_constants.ENABLE_RAY_CLUSTER``, the
switch behind ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``; Ray 2.9 to 2.60 read it when resolving the
node's address): the switch is off while ``ray.init`` starts the cluster, and the node's
address, loopback, is fixed from then on. Ray's token authentication stays on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Any, Iterator

from onnxopt.errors import UsageError, first_line

__all__ = ["connected", "check_executor", "require_ray", "LOOPBACK"]

#: The address a local cluster listens on.
LOOPBACK = "127.0.0.1"


def check_executor(executor: str, address: str | None) -> None:
    """Raise UsageError (before any work) for an executor other than ``"local"`` and ``"ray"``,
    for ``"ray"`` when Ray is not installed, and for a Ray ``address`` without ``"ray"``."""
    if executor not in ("local", "ray"):
        raise UsageError(f"unknown executor '{executor}'; use 'local' or 'ray'")
    if executor == "ray":
        require_ray()
    elif address is not None:
        raise UsageError("a Ray address is for the Ray executor: give --executor ray "
                         "(executor='ray') too")


def require_ray() -> None:
    """Raise UsageError when Ray is not installed (before any work)."""
    if importlib.util.find_spec("ray") is None:
        raise UsageError("the Ray executor needs ray: pip install 'onnxopt[ray]'")


@contextlib.contextmanager
def connected(address: str | None = None) -> Iterator[Any]:
    """The ``ray`` module, connected for the block (see the module docstring).

    Args:
        address: the cluster to connect to when Ray is not initialized yet (default
            ``$RAY_ADDRESS``; none: start a local cluster on loopback).

    Raises:
        UsageError: Ray is not installed; no cluster answers at the address.
    """
    require_ray()
    import ray

    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        try:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        except ConnectionError as err:
            reason = first_line(err, "no answer")
            raise UsageError(f"Ray cluster at {address}: cannot connect ({reason})") from None
    else:
        _start_local(ray)
    try:
        yield ray
    finally:
        ray.shutdown()


def _start_local(ray) -> None:
    """``ray.init`` of a local cluster listening on :data:`LOOPBACK` only, without dashboard."""
    from ray._private import ray_constants

    multi_node = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(_node_ip_address=LOOPBACK, include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_node

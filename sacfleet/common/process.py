"""Facts about the current process that supervision needs, and the calls every fleet process answers."""

from __future__ import annotations

import os


def restarted_by_ray() -> bool:
    """Whether this Ray actor's process replaces one that died (Ray restarted the actor); False
    outside a Ray actor."""
    try:
        import warnings

        import ray

        with warnings.catch_warnings():  # Ray's own property reads a deprecated attribute inside
            warnings.simplefilter("ignore")
            return bool(ray.is_initialized() and ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not in a Ray actor
        return False


def peer_handles(peers: dict) -> dict:
    """{"shards": [names], "learner": name} -> the same with Ray actor handles. Fleet processes get
    their peers' names, not handles: Ray keeps a constructor argument holding a handle in the object
    store, where losing it would make a restart of the process fail (ray-project/ray#53727)."""
    import ray

    return {"shards": [ray.get_actor(name) for name in peers.get("shards", [])],
            "learner": ray.get_actor(peers["learner"]) if peers.get("learner") else None}


def this_node() -> str:
    """The Ray node id of this Ray actor's process: where a part of the fleet really runs."""
    import ray

    return ray.get_runtime_context().get_node_id()


class ProcessIdentity:
    """The calls the driver makes of every part of the fleet: whether it is up (ping, answered once its
    constructor has run), which node and placement group it runs in (placement) and which process it
    is (a restart shows as another pid)."""

    def ping(self) -> bool:
        return True

    def node(self) -> str:
        return this_node()

    def placement_group(self) -> str | None:
        """The hex id of the placement group this process runs in, if any (a reserved fleet's)."""
        import ray

        return ray.get_runtime_context().get_placement_group_id()

    def pid(self) -> int:
        return os.getpid()

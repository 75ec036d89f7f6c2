"""Where each part of a fleet runs: the CPUs and GPUs it gets, planned per node of the Ray cluster (what
each node can hold, not the cluster's total), and the node it is pinned to. Pins are soft, so that the
parts of a lost node are restarted on the nodes left. A fleet given a reservation (a placement-group
bundle, as `sacfleet sweep` reserves one per fleet trial through Tune) plans within it and runs in it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sacfleet.common.config import Config
from sacfleet.driver.errors import FleetError

EPS = 1e-6  # Ray accounts resources in units of 1e-4; sums of fractions must not fail on float noise


class PlacementError(FleetError):
    """The fleet does not fit on the cluster's nodes; the message names the part that does not."""


@dataclass(frozen=True)
class Node:
    id: str
    address: str
    cpus: float
    gpus: float
    driver: bool = False  # the driver's node: kept light when there is a choice

    @property
    def label(self) -> str:
        return node_label(self.address, self.id)


def node_label(address: str, node_id: str) -> str:
    # Nodes of a local cluster share one address; the id's start tells them apart.
    return f"{address}/{node_id[:6]}"


@dataclass(frozen=True)
class Resources:
    cluster_cpus: float
    cluster_gpus: float
    learner_cpus: float
    learner_gpus: int
    shard_cpus: float
    actor_cpus: float
    eval_cpus: float
    learner_threads: int


@dataclass(frozen=True)
class Reservation:
    """Bundle `bundle` of placement group `group` (hex id): resources held for one fleet, which it is
    planned within and runs in (`sacfleet train --placement-group GROUP:BUNDLE`)."""

    group: str
    bundle: int

    @classmethod
    def parse(cls, text: str) -> "Reservation":
        group, _, bundle = text.partition(":")
        try:
            bytes.fromhex(group)
            index = int(bundle)
        except ValueError:
            index = -1
        if not group or index < 0:
            raise ValueError(f"expected PLACEMENT_GROUP_ID:BUNDLE_INDEX (hex id, index >= 0), got {text!r}")
        return cls(group, index)

    def __str__(self) -> str:
        return f"{self.group}:{self.bundle}"

    def handle(self):
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup

        return PlacementGroup(PlacementGroupID(bytes.fromhex(self.group)))


@dataclass
class Placement:
    """The node of each part and what is left free on each node; `place` finds room for one more part
    (the fleet asks it again when the actor count changes). With a reservation, its bundle is the one
    node, and every part runs in the bundle."""

    nodes: list[Node]
    free: dict[str, float] = field(default_factory=dict)
    parts: dict[str, str] = field(default_factory=dict)  # part ("learner", "shard 0", "actor 3") -> node id
    reservation: Reservation | None = None

    def __post_init__(self):
        self.free = self.free or {n.id: n.cpus for n in self.nodes}

    def take(self, part: str, node: Node, cpus: float) -> None:
        self.free[node.id] -= cpus
        self.parts[part] = node.id

    def place(self, part: str, cpus: float) -> str | None:
        """The node for `part` needing `cpus`: among nodes with room, the one holding the fewest parts of
        its kind (so shards and actors spread over the nodes), then the one with most free CPUs; None
        when no node has room."""
        kind = part.split()[0]
        count = {n.id: 0 for n in self.nodes}
        for name, node in self.parts.items():
            if name.split()[0] == kind:
                count[node] += 1
        fits = [n for n in self.nodes if self.free[n.id] + EPS >= cpus]
        if not fits:
            return None
        node = min(fits, key=lambda n: (count[n.id], -self.free[n.id], n.driver))
        self.take(part, node, cpus)
        return node.id

    def release(self, part: str, cpus: float) -> None:
        node = self.parts.pop(part, None)
        if node is not None:
            self.free[node] += cpus

    def room_for(self, cpus: float) -> int:
        """How many more parts of `cpus` each the nodes can hold."""
        return sum(math.floor((free + EPS) / cpus) for free in self.free.values() if free > 0) if cpus > 0 else 10**9

    def free_note(self) -> str:
        return ", ".join(f"{self.free[n.id]:.4g} on {n.label}" for n in self.nodes) or "no nodes"

    def table(self) -> list[dict]:
        return placement_table(self.nodes, self.parts)

    def strategy(self, part: str) -> dict:
        """Ray scheduling options for `part`: in the reservation's bundle, else pinned to its node."""
        if self.reservation is None:
            return strategy(self.parts.get(part))
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            self.reservation.handle(), placement_group_bundle_index=self.reservation.bundle)}


def placement_table(nodes: list[Node], parts: dict[str, str]) -> list[dict]:
    """Per node: its address, size and the parts (part -> node id) it holds, for the start line and
    summary.json; a node that joined after planning and holds a part gets a row too."""
    held: dict[str, list[str]] = {n.id: [] for n in nodes}
    for part, node in parts.items():
        held.setdefault(node, []).append(part)
    sizes = {n.id: (n.address, n.cpus, n.gpus, n.driver) for n in nodes}
    return [dict(zip(("node", "address", "cpus", "gpus", "driver", "parts"),
                     (node, *sizes.get(node, ("?", 0.0, 0.0, False)), held_parts)))
            for node, held_parts in held.items()]


def describe(table: list[dict]) -> str:
    """A placement table (placement_table) in one line: each node, its size and the parts it holds."""
    return "; ".join(f"{node_label(row['address'], row['node'])} ({row['cpus']:g} CPU"
                     f"{', %g GPU' % row['gpus'] if row['gpus'] else ''}{', driver' if row['driver'] else ''}): "
                     f"{summarize(row['parts']) or '-'}" for row in table)


def summarize(parts: list[str]) -> str:
    """["learner", "shard 0", "actor 0", "actor 2"] -> "learner, shard 0, actors 0,2"."""
    groups: dict[str, list[str]] = {}
    for part in parts:
        kind, _, index = part.partition(" ")
        groups.setdefault(kind, []).append(index)
    return ", ".join(kind if indices == [""] else f"{kind}{'s' if len(indices) > 1 else ''} {','.join(indices)}"
                     for kind, indices in groups.items())


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected Ray cluster, the driver's marked."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return [Node(n["NodeID"], n["NodeManagerAddress"], float(n["Resources"].get("CPU", 0)),
                 float(n["Resources"].get("GPU", 0)), n["NodeID"] == here)
            for n in ray.nodes() if n.get("Alive")]


def reserved_nodes(reservation: Reservation) -> list[Node]:
    """The reservation's bundle as the one node a fleet is planned on: its CPUs and GPUs, on the node
    Ray placed it."""
    import ray
    from ray.util.placement_group import placement_group_table

    table = placement_group_table(reservation.handle())
    if not table or table.get("state") != "CREATED":
        raise FleetError(f"placement group {reservation.group} is {table.get('state', 'unknown') if table else 'unknown'}"
                         f", not created: was it removed, or is it still waiting for resources?")
    bundle = table["bundles"].get(reservation.bundle)
    if bundle is None:
        raise FleetError(f"placement group {reservation.group} has bundles {sorted(table['bundles'])}, not "
                         f"{reservation.bundle}")
    node_id = table["bundles_to_node_id"].get(reservation.bundle, "")
    address = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), "?")
    return [Node(node_id, address, float(bundle.get("CPU", 0)), float(bundle.get("GPU", 0)))]


def plan_fleet(cfg: Config, nodes: list[Node], reservation: Reservation | None = None) -> tuple[Resources, Placement]:
    """Size every part and pick its node. The learner goes to a GPU node when it uses a GPU, else to the
    node with most CPUs (not the driver's when another is as large); it gets learner.num_cpus, at most
    its node's CPUs and half the cluster's. Shards and the eval actor take small shares; env actors split
    what is left unless actors.num_cpus fixes their share. Raises PlacementError naming what does not fit."""
    cpus, gpus = sum(n.cpus for n in nodes), sum(n.gpus for n in nodes)
    if cfg.learner.device == "cuda" and gpus < 1:
        raise FleetError("learner.device=cuda, but the Ray cluster has no GPU; use learner.device=auto or cpu")
    if cpus <= 0:
        raise PlacementError("the Ray cluster has no CPUs for the fleet (every node was started with --num-cpus=0)")
    use_gpu = cfg.learner.device in ("cuda", "auto") and any(n.gpus >= 1 for n in nodes)
    candidates = [n for n in nodes if n.gpus >= 1] if use_gpu else nodes
    learner_node = max(candidates, key=lambda n: (n.cpus, not n.driver))
    learner_cpus = round(min(cfg.learner.num_cpus, learner_node.cpus, cpus / 2), 4)
    placement = Placement(nodes, reservation=reservation)
    placement.take("learner", learner_node, learner_cpus)

    shards = cfg.replay.num_shards
    shard_cpus = round(min(cfg.replay.num_cpus, cpus / 4 / shards), 4)
    for i in range(shards):
        if placement.place(f"shard {i}", shard_cpus) is None:
            raise PlacementError(f"replay shard {i} of {shards} ({shard_cpus:g} CPU each, replay.num_cpus) does not "
                                 f"fit: CPUs free per node after the learner and {i} shards: {placement.free_note()}; "
                                 f"lower replay.num_shards or replay.num_cpus, or add nodes")
    eval_cpus = min(0.1, cpus / 20)
    if placement.place("eval", eval_cpus) is None:
        raise PlacementError(f"the eval actor ({eval_cpus:g} CPU) does not fit: CPUs free per node after the learner "
                             f"and shards: {placement.free_note()}")

    actors = cfg.actors.num
    planned = max(actors, cfg.actors.max_num or 0)  # room is kept for scaling up to actors.max_num
    actor_cpus = cfg.actors.num_cpus or _largest_share(placement, planned, cap=1.0)
    if actor_cpus < 1e-4 or placement.room_for(actor_cpus) < planned:
        given = f"{actor_cpus:g} CPU each (actors.num_cpus)" if cfg.actors.num_cpus else "any CPU share"
        key = "actors.max_num" if planned > actors else "actors.num"
        raise PlacementError(f"{planned} env actors ({key}) of {given} do not fit: CPUs free per node after the "
                             f"learner, shards and eval actor: {placement.free_note()} (room for "
                             f"{placement.room_for(actor_cpus) if actor_cpus >= 1e-4 else 0}); lower {key}"
                             f"{' or actors.num_cpus' if cfg.actors.num_cpus else ''}, or add nodes")
    for i in range(actors):
        placement.place(f"actor {i}", actor_cpus)
    threads = cfg.learner.num_threads or max(1, int(learner_cpus))
    res = Resources(cpus, gpus, learner_cpus, 1 if use_gpu else 0, shard_cpus, actor_cpus, eval_cpus, threads)
    return res, placement


def _largest_share(placement: Placement, count: int, cap: float) -> float:
    """The largest CPU share, at most `cap` and a multiple of 1e-4, such that `count` parts fit on the
    nodes' free CPUs; 0 when they do not fit at any share Ray can express."""
    candidates = [cap] + [free / k for free in placement.free.values() if free > 0 for k in range(1, count + 1)]
    for share in sorted(candidates, reverse=True):
        share = math.floor(min(share, cap) * 1e4 + EPS) / 1e4
        if share >= 1e-4 and placement.room_for(share) >= count:
            return share
    return 0.0


def strategy(node_id: str | None):
    """Ray scheduling option pinning a part to its node, softly: when that node is gone (or was never
    there) Ray places the part on another."""
    if node_id is None:
        return {}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=True)}

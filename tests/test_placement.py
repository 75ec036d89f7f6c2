"""The fleet's placement, planned per node: every part fits on its node, the learner takes a GPU node
when there is one, shards and actors spread over the nodes, and a fleet that cannot fit says which
part does not (before anything is started). replay.num_shards=auto follows the actor count."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sacfleet.common.config import ConfigError, load_config
from sacfleet.driver.errors import FleetError
from sacfleet.driver.placement import Node, PlacementError, plan_fleet


def nodes(*cpus, gpus=(), driver=0):
    return [Node(f"{i:02d}" + "ab" * 27, "10.0.0.%d" % i, float(c), float(gpus[i]) if i < len(gpus) else 0.0,
                 i == driver) for i, c in enumerate(cpus)]


def used_per_node(res, placement):
    size = {"learner": res.learner_cpus, "shard": res.shard_cpus, "eval": res.eval_cpus, "actor": res.actor_cpus}
    used = {n.id: 0.0 for n in placement.nodes}
    for part, node in placement.parts.items():
        used[node] += size[part.split()[0]]
    return used


def test_one_two_cpu_machine_fits_any_actor_count():
    for actors in (1, 2, 3, 8, 64):
        cfg = load_config("pointmass", [f"actors.num={actors}", "replay.num_shards=2"])
        res, placement = plan_fleet(cfg, nodes(2))
        assert used_per_node(res, placement)[placement.nodes[0].id] <= 2.0 + 1e-9
        assert res.actor_cpus > 0 and res.learner_cpus == 1.0 and res.learner_gpus == 0 and res.learner_threads == 1
        assert sorted(placement.parts) == sorted(["learner", "eval", "shard 0", "shard 1",
                                                  *(f"actor {i}" for i in range(actors))])
    # The embedded default: as it was planned against the cluster's total (two actors of 0.4 CPU).
    res, _ = plan_fleet(load_config("pointmass"), nodes(2))
    assert (res.learner_cpus, res.shard_cpus, res.eval_cpus, res.actor_cpus) == (1.0, 0.1, 0.1, 0.4)


def test_three_one_cpu_nodes_hold_three_actors_spread_over_the_nodes():
    # The case that waited silently for 600 s when actors were sized against the cluster's 3 CPUs.
    cfg = load_config("pointmass", ["actors.num=3", "replay.num_shards=2"])
    res, placement = plan_fleet(cfg, nodes(1, 1, 1))
    used = used_per_node(res, placement)
    assert all(used[n.id] <= n.cpus + 1e-9 for n in placement.nodes), used
    assert placement.parts["learner"] != placement.nodes[0].id  # the driver's node stays light
    assert len({placement.parts[f"shard {i}"] for i in range(2)}) == 2
    actor_nodes = [placement.parts[f"actor {i}"] for i in range(3)]
    assert len(set(actor_nodes)) == 2 and placement.parts["learner"] not in actor_nodes  # the learner's node is full


def test_the_learner_goes_to_the_gpu_node():
    cfg = load_config("pointmass", ["actors.num=8"])
    res, placement = plan_fleet(cfg, nodes(16, 8, 16, gpus=(0, 1, 0)))
    assert res.learner_gpus == 1 and placement.parts["learner"] == placement.nodes[1].id
    assert not plan_fleet(load_config("pointmass", ["learner.device=cpu"]), nodes(16, 8, gpus=(0, 1)))[0].learner_gpus
    with pytest.raises(FleetError, match="learner.device=cuda, but the Ray cluster has no GPU"):
        plan_fleet(load_config("pointmass", ["learner.device=cuda"]), nodes(2))


def test_a_fleet_that_does_not_fit_names_the_part_and_the_free_cpus():
    cfg = load_config("pointmass", ["actors.num=3", "actors.num_cpus=1"])
    with pytest.raises(PlacementError, match=r"3 env actors \(actors.num\) of 1 CPU each \(actors.num_cpus\) do not "
                                             r"fit.*0\.9 on 10\.0\.0\.0/00abab, 0 on 10\.0\.0\.1.*room for 0\)"):
        plan_fleet(cfg, nodes(1, 1, 1))
    with pytest.raises(PlacementError, match="no CPUs"):
        plan_fleet(load_config("pointmass"), nodes(0, 0))


@settings(max_examples=300, deadline=None)
@given(cpus=st.lists(st.sampled_from([0, 0.5, 1, 2, 3, 4, 8, 16]), min_size=1, max_size=6),
       actors=st.integers(1, 40), shards=st.integers(1, 6), actor_cpus=st.sampled_from([None, 0.25, 0.5, 1.0]))
def test_any_plan_fits_each_node_or_says_what_does_not(cpus, actors, shards, actor_cpus):
    overrides = [f"actors.num={actors}", f"replay.num_shards={shards}"]
    if actor_cpus:
        overrides.append(f"actors.num_cpus={actor_cpus}")
    try:
        res, placement = plan_fleet(load_config("pointmass", overrides), nodes(*cpus))
    except PlacementError as exc:
        assert "does not fit" in str(exc) or "do not fit" in str(exc) or "no CPUs" in str(exc)
        return
    used = used_per_node(res, placement)
    assert all(used[n.id] <= n.cpus + 1e-6 for n in placement.nodes), (used, res)
    assert sum(part.startswith("actor ") for part in placement.parts) == actors
    assert all(round(x * 1e4) == pytest.approx(x * 1e4) for x in (res.actor_cpus, res.shard_cpus))


def test_replay_num_shards_auto_follows_the_actor_count():
    assert [load_config("halfcheetah", [f"actors.num={n}"]).replay.num_shards for n in (1, 2, 4, 5, 8, 9)] == \
        [1, 1, 1, 2, 2, 3]
    assert load_config("pointmass", ["actors.num=6", "replay.num_shards=auto"]).replay.num_shards == 2
    assert load_config("pointmass", ["actors.num=6", "replay.num_shards=3"]).replay.num_shards == 3
    with pytest.raises(ConfigError, match="replay.num_shards: expected an integer.*; or auto"):
        load_config("pointmass", ["replay.num_shards=many"])


def test_the_table_shows_a_part_on_a_node_that_was_not_planned_for():
    res, placement = plan_fleet(load_config("pointmass"), nodes(2))
    placement.parts["actor 1"] = "ff" * 28  # Ray put it on a node that joined after planning
    rows = {row["node"]: row["parts"] for row in placement.table()}
    assert rows["ff" * 28] == ["actor 1"] and "actor 1" not in rows[placement.nodes[0].id]


def test_a_reserved_bundle_is_the_one_node_and_every_part_runs_in_it():
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

    from sacfleet.driver.placement import Reservation

    group = "ab" * 18
    reservation = Reservation.parse(f"{group}:1")
    assert (reservation.group, reservation.bundle, str(reservation)) == (group, 1, f"{group}:1")
    for bad in ("", "xyz:1", f"{group}", f"{group}:-1", f"{group}:a"):
        with pytest.raises(ValueError, match="PLACEMENT_GROUP_ID:BUNDLE_INDEX"):
            Reservation.parse(bad)
    # Planned on the bundle's 1.9 CPUs as on a node of that size: what the bundle holds is all it uses.
    res, placement = plan_fleet(load_config("pointmass"), nodes(1.9), reservation)
    assert sum(used_per_node(res, placement).values()) <= 1.9 + 1e-6
    for part in ("learner", "eval", "shard 0", "actor 0", "actor 1"):
        chosen = placement.strategy(part)["scheduling_strategy"]
        assert isinstance(chosen, PlacementGroupSchedulingStrategy) and chosen.placement_group_bundle_index == 1
        assert chosen.placement_group.id.hex() == group
    # Without a reservation a part is pinned (softly) to its planned node.
    _, pinned = plan_fleet(load_config("pointmass"), nodes(2, 2))
    assert isinstance(pinned.strategy("learner")["scheduling_strategy"], NodeAffinitySchedulingStrategy)

"""sacfleet: distributed Soft Actor-Critic with a Ray fleet of actors, sharded replay and one learner."""

__version__ = "0.1.0"

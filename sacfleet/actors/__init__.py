"""Acting: vector env stepping with the numpy policy, chunks of steps for the replay, evaluation episodes,
and the Ray actors that run them (env actors, the eval actor)."""

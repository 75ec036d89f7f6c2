"""Env actors: rollout logic (vector env stepping, batched policy inference) and evaluation."""

"""Shared by every part: config, environments, the transition schema, the wire codec, health checks,
metrics and plots, atomic writes, process facts, and the reaper that outlives no driver.

Submodules are imported where needed, so that importing one (the codec, say) does not pull in
gymnasium or tensorboard."""

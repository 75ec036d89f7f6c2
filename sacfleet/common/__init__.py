"""Shared by every part: config, environments, the transition schema, the wire codec, metrics.

Submodules are imported where needed, so that importing one (the codec, say) does not pull in
gymnasium or tensorboard."""

#!/bin/sh
# `docker run IMAGE train ...` (or eval, bench, scale, chaos, soak, --help) runs sacfleet; any other
# command runs as given, so that Ray's cluster launcher (`bash`) and KubeRay (`ray start ...`) can use
# the image as they use Ray's own.
case "${1:-}" in
  train|eval|bench|scale|chaos|soak|--help|-h|"") exec sacfleet "$@" ;;
  *) exec "$@" ;;
esac

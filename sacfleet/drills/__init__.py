"""Failure and endurance drills on a real run: `sacfleet chaos` and `sacfleet soak`."""

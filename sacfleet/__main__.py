"""`python -m sacfleet` runs the command-line interface."""

from sacfleet.cli import main

raise SystemExit(main())

"""`sacfleet sweep`: many runs (grid points x seeds) as Ray Tune trials, and their statistics and plots."""

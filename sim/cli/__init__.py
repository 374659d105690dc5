"""The `infersim` command line (`sim.cli.main:main`)."""

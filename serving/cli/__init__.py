"""The `rarechange` command line: one module per subcommand; heavy imports inside each command."""

"""CLI sub-commands, one module per lab (see engine.cli)."""

"""The `meshtls` command."""

"""Every step from the shell: the `fedlens` CLI and one module per command."""

"""The ``encdec`` commands, one module each; ``encdec_cli.cli`` registers them on the app."""

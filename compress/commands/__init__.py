"""One module per `compress` command, each exposing ``register(subparsers)`` (listed in cli.COMMANDS)."""

"""The ``underpass`` command: one entry point, one module per subcommand group.

Each subcommand module exposes ``register(subparsers)``; :mod:`underpass.cli.main`
wires them together. Modules import their component lazily inside the command
function so that ``underpass --help`` stays fast and light.
"""

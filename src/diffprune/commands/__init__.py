"""Subcommands that live outside cli.py: each module has `add_parser(sub)` and `run(args)`.

cli.py keeps the parser conventions (`diffprune: error: …`, exit status 2) and registers these with one
line each, so new commands do not grow it.
"""

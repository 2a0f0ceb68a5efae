"""``python -m sc_foundation ...``: the ``sc-foundation`` command."""

from sc_foundation.cli import main

main()

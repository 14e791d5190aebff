"""``python -m fedbench``: the ``fedbench`` command, for environments where the script is not on PATH."""

from fedbench.cli import main

main(prog_name="fedbench")

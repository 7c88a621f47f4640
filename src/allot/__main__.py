"""`python -m allot` and `torchrun --nproc_per_node N -m allot`: the `allot` command."""

from allot_main import entry

entry()

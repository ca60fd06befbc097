"""`python -m nic_fast` is `nic-fast`."""
from nic_fast.cli import main

main()

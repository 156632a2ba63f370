"""The rank entry point: `python -m torch.distributed.run ... -m planc.run.rank LOCK [run options]`.

`planc run` starts it for a tensor- or pipeline-parallel plan; each process is `planc run LOCK ...`
with torchrun's RANK / LOCAL_RANK / WORLD_SIZE, so it checks its own part of the machine, loads its
share and generates (planc.run.distributed).
"""

import sys

from planc.cli import main

if __name__ == "__main__":
    arguments = sys.argv[1:]
    group = []  # planc's own options (-q, -v) go before the command
    while arguments and arguments[0] in ("-q", "-v"):
        group.append(arguments.pop(0))
    main([*group, "run", *arguments], prog_name="planc")

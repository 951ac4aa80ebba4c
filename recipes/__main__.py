"""``python -m memopt.recipes``: the `memopt` command, for where its script is not on PATH
(``torchrun --nproc_per_node N -m memopt.recipes train --ddp ...``)."""

from .cli import main

raise SystemExit(main())

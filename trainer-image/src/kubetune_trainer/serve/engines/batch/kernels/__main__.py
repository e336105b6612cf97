"""`python -m kubetune_trainer.serve.engines.batch.kernels`: build the kernels beside it."""

import sys

from kubetune_trainer.serve.engines.batch.kernels.lora_branch import main

sys.exit(main())

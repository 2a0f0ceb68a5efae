"""Fine-tuning: ``python finetune.py task=<annotation|integration|imputation|multimodal> pretrained=DIR
'data.files=[...]'``, the same as ``sc-foundation finetune [overrides]``.

The tasks live in :mod:`sc_foundation.tasks` (what each does, what it writes and how it is scored is documented
there); the configs are in ``sc_foundation/conf``.
"""

import sys

from sc_foundation.cli import main

if __name__ == "__main__":
    main(["finetune", *sys.argv[1:]])

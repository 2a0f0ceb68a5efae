"""Fine-tuning: ``python finetune.py task=<annotation|integration|imputation|multimodal> pretrained=DIR
'data.files=[...]'``, the same as ``sc-foundation finetune [overrides]``.

The tasks live in :mod:`sc_foundation.tasks` (what each does, what it writes and how it is scored is documented
there); the configs are in ``sc_foundation/conf``.
"""

import sys

if __name__ == "__main__":
    # Imported here, not above: a spawned worker process imports this file too, and must not load the package
    # (seconds of torch) before it has arranged to die with its parent (sc_foundation/data/lifetime.py).
    from sc_foundation.cli import main

    main(["finetune", *sys.argv[1:]])

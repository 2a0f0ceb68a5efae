"""Pretraining: ``python train.py [hydra overrides]``, the same as ``sc-foundation pretrain [overrides]``.

Builds (or reuses) the tokenized corpus store of ``data``, pretrains and exports the model with its tokenizer to
``<output_dir>/export/best`` and ``/final`` (:mod:`sc_foundation.training.pretrain`; the configs are in
``sc_foundation/conf``).
"""

import sys

if __name__ == "__main__":
    # Imported here, not above: a spawned worker process imports this file too, and must not load the package
    # (seconds of torch) before it has arranged to die with its parent (sc_foundation/data/lifetime.py).
    from sc_foundation.cli import main

    main(["pretrain", *sys.argv[1:]])

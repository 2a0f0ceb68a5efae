"""Pretraining: ``python train.py [hydra overrides]``, the same as ``sc-foundation pretrain [overrides]``.

Builds (or reuses) the tokenized corpus store of ``data``, pretrains and exports the model with its tokenizer to
``<output_dir>/export/best`` and ``/final`` (:mod:`sc_foundation.training.pretrain`; the configs are in
``sc_foundation/conf``).
"""

import sys

from sc_foundation.cli import main

if __name__ == "__main__":
    main(["pretrain", *sys.argv[1:]])

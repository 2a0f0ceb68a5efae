"""Fine-tuning entry point: ``python finetune.py task=<annotation|integration|imputation|multimodal> pretrained=DIR
'data.files=[...]'``.

The tasks live in :mod:`sc_foundation.tasks` (what each does, what it writes and how it is scored is documented
there); this file only hands Hydra's config to :func:`sc_foundation.tasks.run`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sc_foundation.tasks import run


@hydra.main(version_base="1.3", config_path="conf", config_name="finetune")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()

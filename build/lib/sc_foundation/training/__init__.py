"""How it learns: pretraining (``pretrain``), the generic LightningModule (``lightning_module``), representation
probes, run folders and exports (``runs``), hardware and precision, console output and the model card."""

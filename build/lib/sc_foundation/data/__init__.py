"""What comes in: count readers and checks (``io``, ``soma``), the dataset registry (``datasets``), gene vocabularies
and id resolution (``genes``), tokenization, the on-disk corpus store, gene panels and statistics, and the Lightning
DataModule that batches a store (``datamodule``).

Kept empty on purpose: store-building and loader worker processes import :mod:`sc_foundation.data.store` and must
not pay for Lightning or scanpy.
"""

"""What learns: the configuration, the one modeling file (backbone and every head), our export folder format
(``export``) and the converters of published scGPT and Geneformer folders (``convert``)."""

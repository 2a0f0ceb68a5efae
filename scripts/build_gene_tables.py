"""Regenerate the offline gene tables shipped in ``sc_foundation/resources`` from ``../shared/data/reference``.

    python scripts/build_gene_tables.py [--reference ../shared/data/reference]

Writes ``human_genes.tsv.gz`` (Ensembl id, symbol; GENCODE v44) and ``human_mouse_orthologs.tsv.gz`` (human symbol,
mouse symbol; Ensembl 105, pairs without an ortholog dropped). Both are sorted so the files are reproducible.
"""

import argparse
from pathlib import Path

import pandas as pd

RESOURCES = Path(__file__).resolve().parents[1] / "sc_foundation" / "resources"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=Path("../shared/data/reference"))
    args = parser.parse_args()

    genes = pd.read_csv(
        args.reference / "gencode_v44_human_gene_id2name.csv.gz", header=None, names=["ensembl_id", "symbol"]
    )
    genes = genes.dropna().drop_duplicates().sort_values(["ensembl_id"])
    genes.to_csv(RESOURCES / "human_genes.tsv.gz", sep="\t", index=False, compression={"method": "gzip", "mtime": 0})

    orthologs = pd.read_csv(
        args.reference / "ensembl105_human2mouse_symbols.csv.gz", header=None, names=["human_symbol", "mouse_symbol"]
    )
    orthologs = orthologs.dropna().drop_duplicates().sort_values(["human_symbol", "mouse_symbol"])
    orthologs.to_csv(
        RESOURCES / "human_mouse_orthologs.tsv.gz", sep="\t", index=False, compression={"method": "gzip", "mtime": 0}
    )
    print(f"{len(genes)} human genes, {len(orthologs)} human-mouse ortholog pairs -> {RESOURCES}")


if __name__ == "__main__":
    main()

"""Gene vocabulary, special tokens and gene-id resolution.

Every gene in every input file is mapped onto one canonical id before it meets a vocabulary:

* versioned Ensembl ids lose their version (``ENSG00000141510.17`` -> ``ENSG00000141510``);
* genome prefixes from Cell Ranger references are stripped (``hg19_TP53`` -> ``TP53``);
* human symbols become human Ensembl ids through the GENCODE v44 table shipped in ``resources/``;
* mouse symbols become the Ensembl id of their human ortholog (Ensembl 105 orthologs by symbol), so human and
  mouse cells share one vocabulary; a mouse symbol the ortholog table does not list takes the human gene of the same
  upper-case symbol (``Pitx2`` -> ``PITX2``) when no listed mouse gene claims that human gene; mouse Ensembl ids
  (``ENSMUSG...``) are kept as they are.

The tables are read from the package, never from the network.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

PAD_TOKEN = "<pad>"
CLS_TOKEN = "<cls>"
MASK_TOKEN = "<mask>"
EOS_TOKEN = "<eos>"
"""An end-of-cell token; only vocabularies whose tokenizer appends one (Geneformer V2's) hold it."""
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, CLS_TOKEN, MASK_TOKEN)
"""Tokens every vocabulary holds. More (modality or assay tokens) can be added with ``GeneVocab.add_special``."""

VOCAB_FILE = "gene_vocab.json"

_GENOME_PREFIX = re.compile(r"^(?:hg\d+|GRCh\d+|mm\d+|GRCm\d+)[_-]+", re.IGNORECASE)
_ENSEMBL = re.compile(r"^(ENS[A-Z]*G\d{11})(?:\.\d+)?(?:_PAR_Y)?$")
_SPECIAL = re.compile(r"^<[^<>\s]+>$")
DAMAGED_FILE_FIX = "Copy the folder (store or model export) again, or build or export it again."
GENE_ID_RULES = 2
"""Version of the name-to-id rules; cached panels and stores put it in their plan, so a change of the rules (2: the
same-symbol fallback for mouse genes the ortholog table lacks) never reuses a cache built with the old ones."""


def current_umask() -> int:
    """The process's file-mode creation mask, read without changing it where Linux exposes it."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read by setting, then put it back
    os.umask(mask)
    return mask


def read_json(path: Path, fix: str):
    """The JSON object in ``path``; a ``ValueError`` naming the file and ``fix`` when it is corrupt or truncated."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is corrupt or truncated (not JSON: {error}). {fix}") from None
    if not isinstance(value, dict):  # every file of ours holds an object; random bytes can parse as a number
        raise ValueError(f"{path} is corrupt or truncated (a JSON {type(value).__name__}, not an object). {fix}")
    return value


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so a crash never leaves half a file.

    The file gets the mode a plain ``open`` would give it (0644 under umask 022), not ``mkstemp``'s private 0600:
    stores and exports are read by other people.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class GeneVocab:
    """An ordered token list: special tokens and canonical gene ids, each with a fixed integer id.

    Token ids never change once a vocabulary exists: special tokens that a loaded vocabulary lacks (Geneformer's has
    no ``<cls>``) are appended at the end, so token ids from a corpus tokenized with the original stay valid.
    """

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        for special in SPECIAL_TOKENS:
            if special not in tokens:
                tokens.append(special)
        index = {token: i for i, token in enumerate(tokens)}
        if len(index) != len(tokens):
            repeated = pd.Index(tokens)[pd.Index(tokens).duplicated()].unique()[:5].tolist()
            raise ValueError(f"A gene vocabulary lists some tokens twice, e.g. {repeated}; each token must be unique.")
        self._tokens = tokens
        self._index = index

    @classmethod
    def from_genes(cls, genes: Iterable[str], specials: Sequence[str] = SPECIAL_TOKENS) -> GeneVocab:
        """Special tokens first, then ``genes`` in the given order."""
        return cls([*specials, *genes])

    @classmethod
    def build(cls, cells_per_gene: Mapping[str, int], min_cells: int = 1) -> GeneVocab:
        """A vocabulary of the genes detected in at least ``min_cells`` cells of a corpus, sorted by id."""
        kept = sorted(gene for gene, n in cells_per_gene.items() if n >= min_cells)
        if not kept:
            raise ValueError(f"No gene is detected in at least min_cells={min_cells} cells; lower min_cells.")
        return cls.from_genes(kept)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> GeneVocab:
        """Load ``gene_vocab.json`` (ours) or a plain text file with one token per line (Geneformer's ``vocab.txt``)."""
        path = Path(path)
        if path.is_dir():
            path = path / VOCAB_FILE
        if not path.exists():
            raise FileNotFoundError(f"No gene vocabulary at {path}.")
        if path.suffix == ".json":
            payload = read_json(path, DAMAGED_FILE_FIX)
            if not isinstance(payload, dict) or not isinstance(payload.get("tokens"), list):
                raise ValueError(f"{path} holds no token list ('tokens'): not a gene vocabulary. {DAMAGED_FILE_FIX}")
            return cls(payload["tokens"])
        lines = [line.strip() for line in path.read_text().splitlines()]
        return cls([line for line in lines if line])

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``gene_vocab.json`` into ``directory`` atomically and return its path."""
        path = Path(directory) / VOCAB_FILE
        _atomic_write_text(path, json.dumps({"tokens": self._tokens}, indent=0))
        return path

    def add_special(self, token: str) -> int:
        """Add a special token such as ``<rna>`` or ``<assay:10xv3>`` at the end and return its id."""
        if not _SPECIAL.match(token):
            raise ValueError(f"Special tokens are written <name>, got {token!r}.")
        if token not in self._index:
            self._index[token] = len(self._tokens)
            self._tokens.append(token)
        return self._index[token]

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocab) and self._tokens == other._tokens

    def __repr__(self) -> str:
        specials = self.special_tokens
        genes = [token for token in self._tokens[: len(specials) + 3] if token not in specials]
        return f"GeneVocab({len(self):,} tokens: {len(self) - len(specials):,} genes e.g. {genes}, specials {specials})"

    def __hash__(self) -> int:
        return hash(tuple(self._tokens))

    def __getitem__(self, token: str) -> int:
        return self._index[token]

    @property
    def tokens(self) -> list[str]:
        return list(self._tokens)

    @property
    def special_tokens(self) -> list[str]:
        return [t for t in self._tokens if _SPECIAL.match(t)]

    @property
    def special_ids(self) -> np.ndarray:
        """(n_special,) int64 ids of all special tokens."""
        return np.array([self._index[t] for t in self.special_tokens], dtype=np.int64)

    @property
    def n_genes(self) -> int:
        return len(self._tokens) - len(self.special_tokens)

    @property
    def pad_id(self) -> int:
        return self._index[PAD_TOKEN]

    @property
    def cls_id(self) -> int:
        return self._index[CLS_TOKEN]

    @property
    def mask_id(self) -> int:
        return self._index[MASK_TOKEN]

    def lookup(self, genes: Sequence[str | None]) -> np.ndarray:
        """(n,) int64 token id of each canonical gene id, -1 where the gene is not in the vocabulary."""
        get = self._index.get
        return np.fromiter((get(g, -1) if g is not None else -1 for g in genes), dtype=np.int64, count=len(genes))


@dataclass(frozen=True)
class _GeneTables:
    symbol_to_ensembl: dict[str, str]
    upper_symbol_to_ensembl: dict[str, str]
    mouse_to_human_symbol: dict[str, str]
    unclaimed_upper_symbol_to_ensembl: dict[str, str]
    """Human genes (by upper-case symbol) that no mouse gene of the ortholog table maps to."""
    listed_mouse_symbols: frozenset[str]


def _read_table(name: str) -> pd.DataFrame:
    with resources.files("sc_foundation.resources").joinpath(name).open("rb") as raw, gzip.open(raw, "rt") as text:
        return pd.read_csv(text, sep="\t", dtype=str)


@functools.cache
def _tables() -> _GeneTables:
    genes = _read_table("human_genes.tsv.gz")
    # A few symbols name several Ensembl genes (5S_rRNA, Y_RNA, ...). The table is sorted by id, so keeping the first
    # maps such a symbol to its lowest id: deterministic, and the same choice every time.
    genes = genes.drop_duplicates("symbol", keep="first")
    symbol_to_ensembl = dict(zip(genes["symbol"], genes["ensembl_id"], strict=True))
    upper = genes.assign(upper=genes["symbol"].str.upper()).drop_duplicates("upper", keep="first")
    all_orthologs = _read_table("human_mouse_orthologs.tsv.gz")
    # Keep one human partner per mouse symbol, and only partners the human table can resolve.
    orthologs = all_orthologs[all_orthologs["human_symbol"].isin(symbol_to_ensembl)]
    orthologs = orthologs.drop_duplicates("mouse_symbol", keep="first")
    # The ortholog table lacks some well-known pairs altogether (Pitx2, Casz1, Anxa2: 14 of MERFISH's 1,122 genes).
    # For a mouse symbol it does not list, the human gene of the same upper-case symbol is its ortholog in nearly
    # every case; a human gene the table already pairs with another mouse gene is left out, so two mouse genes never
    # share one id.
    claimed = set(all_orthologs["human_symbol"].str.upper())
    unclaimed = upper[~upper["upper"].isin(claimed)]
    return _GeneTables(
        symbol_to_ensembl=symbol_to_ensembl,
        upper_symbol_to_ensembl=dict(zip(upper["upper"], upper["ensembl_id"], strict=True)),
        mouse_to_human_symbol=dict(zip(orthologs["mouse_symbol"], orthologs["human_symbol"], strict=True)),
        unclaimed_upper_symbol_to_ensembl=dict(zip(unclaimed["upper"], unclaimed["ensembl_id"], strict=True)),
        listed_mouse_symbols=frozenset(all_orthologs["mouse_symbol"]),
    )


def human_symbols() -> Mapping[str, str]:
    """Every human gene symbol this project knows, with its Ensembl id (sc_foundation/resources/human_genes.tsv.gz)."""
    return _tables().symbol_to_ensembl


def symbol_of(ensembl_ids: Sequence[str]) -> list[str | None]:
    """Human symbol of each human Ensembl id (``None`` where unknown); handy for labelling plots and reports."""
    inverse = {v: k for k, v in _tables().symbol_to_ensembl.items()}
    return [inverse.get(g) for g in ensembl_ids]


@dataclass
class GeneResolution:
    """Canonical ids for a list of input gene names, with how each was found.

    ``canonical`` is an (n,) object array of canonical ids, ``None`` where a name could not be resolved.
    """

    names: np.ndarray
    canonical: np.ndarray
    species: str
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def unresolved(self) -> np.ndarray:
        return self.names[pd.isna(self.canonical)]


def detect_species(names: Sequence[str]) -> str:
    """``"mouse"`` when most names are mouse Ensembl ids or mouse-style symbols (``Cd3e``), else ``"human"``."""
    sample = [_GENOME_PREFIX.sub("", str(n)) for n in names[:5000]]
    mouse_ids = sum(n.startswith("ENSMUSG") for n in sample)
    human_ids = sum(n.startswith("ENSG") for n in sample)
    if mouse_ids or human_ids:
        return "mouse" if mouse_ids > human_ids else "human"
    # Mouse symbols are capitalised (Xkr4, Cd3e); human symbols are upper case (XKR4, CD3E).
    lettered = [n for n in sample if any(c.isalpha() for c in n)]
    mouse_style = sum(n[:1].isupper() and any(c.islower() for c in n[1:]) for n in lettered)
    return "mouse" if lettered and mouse_style > len(lettered) / 2 else "human"


def resolve_genes(names: Sequence[str], species: str = "auto") -> GeneResolution:
    """Map gene names (symbols, versioned or prefixed Ensembl ids; human or mouse) to canonical ids.

    Args:
        names: (n,) gene names as they stand in the file.
        species: ``"human"``, ``"mouse"`` or ``"auto"`` (see :func:`detect_species`).
    """
    names = np.asarray([str(n) for n in names], dtype=object)
    if species == "auto":
        species = detect_species(names)
    if species not in ("human", "mouse"):
        raise ValueError(f"species must be 'human', 'mouse' or 'auto', got {species!r}.")
    tables = _tables()
    counts = dict.fromkeys(("ensembl", "versioned", "prefixed", "symbol", "ortholog", "same_symbol", "unresolved"), 0)
    canonical = np.empty(len(names), dtype=object)
    for i, raw in enumerate(names):
        name = raw.strip()
        stripped = _GENOME_PREFIX.sub("", name)
        if stripped != name:
            counts["prefixed"] += 1
            name = stripped
        gene = None
        ensembl = _ENSEMBL.match(name)
        if ensembl:
            gene = ensembl.group(1)
            counts["versioned" if gene != name else "ensembl"] += 1
        elif species == "human":
            gene = tables.symbol_to_ensembl.get(name) or tables.upper_symbol_to_ensembl.get(name.upper())
            counts["symbol"] += gene is not None
        elif name in tables.listed_mouse_symbols:
            human = tables.mouse_to_human_symbol.get(name)
            gene = tables.symbol_to_ensembl.get(human) if human else None
            counts["ortholog"] += gene is not None
        else:
            gene = tables.unclaimed_upper_symbol_to_ensembl.get(name.upper())
            counts["same_symbol"] += gene is not None
        counts["unresolved"] += gene is None
        canonical[i] = gene
    return GeneResolution(names=names, canonical=canonical, species=species, counts=counts)

"""GeneCompass-style cross-species tokens: one vocabulary for human and mouse.

One-to-one orthologs (Ensembl BioMart) share a single token, anchored on the human gene; every
other gene keeps a token of its own; a species token (`<human>`, `<mouse>`) starts each cell.
Values follow GeneCompass: x = count / n_counts x 10,000 / gene median, value = log2(1 + x);
genes are ranked by value (highest first, ties in input gene order) and the top `max_len`
are kept, each with its value.

A further species needs only its one-to-one table against human, bundled as
`celltron/data/genes/orthologs_human_<species>.tsv.gz` (columns human, <species>, confidence).
"""

from __future__ import annotations

import gzip
from functools import cache
from importlib import resources

import numpy as np

from celltron.inputs import MissingInputError
from celltron.tokenizers.ragged import RaggedTokens, bind_genes, rank_cells
from celltron.tokenizers.schemes import Block, save_tokenizer
from celltron.tokenizers.vocab import CLS, EOS, MASK, PAD, GeneVocab, species_token

ANCHOR = "human"


@cache
def ortholog_table(species: str, min_confidence: int = 0) -> dict[str, str]:
    """One-to-one orthologs of `species` -> human Ensembl ID, from the bundled table."""
    name = f"orthologs_{ANCHOR}_{species}.tsv.gz"
    resource = resources.files("celltron.data.genes").joinpath(name)
    if not resource.is_file():
        raise MissingInputError(f"no bundled ortholog table {name} for species {species!r}")
    rows = gzip.decompress(resource.read_bytes()).decode().splitlines()
    header = rows[0].split("\t")
    anchor_col, species_col, confidence_col = header.index(ANCHOR), header.index(species), header.index("confidence")
    table = {}
    for line in rows[1:]:
        fields = line.split("\t")
        if int(fields[confidence_col]) >= min_confidence:
            table[fields[species_col]] = fields[anchor_col]
    return table


def group_by_species(gene_ids, gene_species) -> dict[str, list[str]]:
    """species -> its Ensembl IDs, from parallel arrays (a corpus's gene table)."""
    grouped: dict[str, list[str]] = {}
    for gene, species in zip(gene_ids, gene_species):
        grouped.setdefault(str(species), []).append(str(gene))
    return grouped


def ortholog_vocab(genes_by_species: dict[str, list[str]], min_confidence: int = 0) -> GeneVocab:
    """A vocabulary over the given genes of each species, orthologs sharing the human token.

    Args:
        genes_by_species: species -> Ensembl IDs to cover (e.g. a corpus's gene table).
        min_confidence: keep only orthologs with at least this BioMart confidence (0 or 1).
    """
    specials = {"pad": PAD, "mask": MASK, "cls": CLS, "eos": EOS}
    specials.update({s: species_token(s) for s in sorted(genes_by_species)})
    anchors = set(genes_by_species.get(ANCHOR, []))
    aliases: dict[str, str] = {}
    own: dict[str, set[str]] = {}
    for species, genes in sorted(genes_by_species.items()):
        if species == ANCHOR:
            continue
        table = ortholog_table(species, min_confidence)
        own[species] = set()
        for gene in genes:
            if gene in table:
                aliases[gene] = table[gene]
                anchors.add(table[gene])
            else:
                own[species].add(gene)
    tokens = list(specials.values()) + sorted(anchors)
    for species in sorted(own):
        tokens += sorted(own[species])
    ensembl = [""] * len(specials) + tokens[len(specials) :]
    return GeneVocab(tokens, ensembl, specials, name="ortholog-" + "-".join(sorted(genes_by_species)), aliases=aliases)


class OrthologTokenizer:
    """Species token + top `max_len` genes by GeneCompass value, with values.

    Args:
        vocab: a vocabulary from `ortholog_vocab`.
        gene_ids: Ensembl IDs of the input's genes (gene index i = gene_ids[i]).
        medians: Ensembl ID -> non-zero median of normalised expression (a corpus's own).
        max_len: genes per cell, after the species token.
    """

    SCHEME = "ortholog"
    TAKES_GENES_SUBSET = False

    def __init__(self, vocab: GeneVocab, gene_ids, medians: dict[str, float], max_len: int = 2048):
        self.vocab, self.max_len = vocab, max_len
        self.medians = dict(medians)
        self.token_of_gene, self.median = bind_genes(vocab, gene_ids, medians)

    @classmethod
    def for_corpus(cls, scheme: str, genes, max_len: int | None, seed: int, genes_subset=None) -> OrthologTokenizer:
        """A vocabulary over `genes`' own genes of each species (`ortholog_vocab`) and their
        medians; 2,048 genes per cell unless `max_len`. Draws nothing: `seed` is unused."""
        vocab = ortholog_vocab(group_by_species(genes.gene_ids, genes.gene_species))
        return cls(vocab, genes.gene_ids, genes.medians, max_len=max_len or 2048)

    @classmethod
    def from_saved(cls, vocab: GeneVocab, settings: dict, medians, gene_ids) -> OrthologTokenizer:
        return cls(vocab, gene_ids, medians, **settings)

    @classmethod
    def fixed_vocab(cls, scheme: str) -> None:
        """None: the vocabulary is built from the data's own genes, so it always covers them."""
        return None

    def settings(self) -> dict:
        return {"max_len": self.max_len}

    def save_pretrained(self, directory):
        return save_tokenizer(self, directory)

    def encode_block(self, block: Block, rng: np.random.Generator) -> RaggedTokens:
        """Tokenise a Block: its species and totals; draws nothing from `rng`."""
        return self.encode_csr(block.indptr, block.genes, block.counts, block.species, block.n_counts)

    def encode_csr(self, indptr, genes, counts, species, n_counts=None) -> RaggedTokens:
        """Tokenise a CSR block; `species` is one name per cell (or one for the whole block)."""
        offsets, out, values = rank_cells(
            indptr, genes, counts, n_counts, self.token_of_gene, self.median, self.max_len, 1, 0, values_kind="log2p1"
        )
        if isinstance(species, str):
            out[offsets[:-1]] = self.vocab.special_id(species)
        else:
            ids = {name: self.vocab.special_id(name) for name in set(species)}
            out[offsets[:-1]] = [ids[name] for name in species]
        return RaggedTokens(out, offsets, values)

    def __call__(self, cell: dict, species_names: list[str]) -> dict:
        """Tokenise one CorpusStream cell; `species_names` are the corpus's species categories."""
        block = self.encode_csr(
            np.array([0, len(cell["genes"])]),
            cell["genes"],
            cell["counts"],
            species_names[int(cell["species"])],
            [cell["n_counts"]],
        )
        return {"input_ids": block.input_ids, "values": block.values, "length": len(block.input_ids)}


def coverage(gene_ids, gene_species, count_sum, vocab: GeneVocab) -> dict[str, dict[str, float]]:
    """Per species: the fraction of genes, and of counts, that land on tokens shared across species."""
    gene_ids = np.asarray(gene_ids, dtype=str)
    gene_species = np.asarray(gene_species, dtype=str)
    count_sum = np.asarray(count_sum, dtype=np.float64)
    tokens = vocab.lookup_genes(gene_ids)
    shared_tokens = {vocab[t] for t in vocab.aliases.values()}
    shared = np.array([t in shared_tokens for t in tokens])
    report = {}
    for species in sorted(set(gene_species)):
        mine = gene_species == species
        report[species] = {
            "genes": int(mine.sum()),
            "genes_with_token": float((tokens[mine] >= 0).mean()),
            "genes_shared": float(shared[mine].mean()),
            "counts_shared": float(count_sum[mine & shared].sum() / max(count_sum[mine].sum(), 1.0)),
        }
    return report


def align_prior_knowledge(matrix: np.ndarray, gene_ids, vocab: GeneVocab) -> tuple[np.ndarray, np.ndarray]:
    """Align a gene x d prior-knowledge matrix (promoter, co-expression, gene family, GRN
    embeddings) to the vocabulary's token ids.

    Rows of genes that share a token (orthologs from several species) are averaged; tokens
    without any row get zeros. Returns the (len(vocab), d) float32 matrix and a boolean mask of
    the tokens that have a prior.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    tokens = vocab.lookup_genes(gene_ids)
    known = tokens >= 0
    sums = np.zeros((len(vocab), matrix.shape[1]))
    np.add.at(sums, tokens[known], matrix[known])
    counts = np.bincount(tokens[known], minlength=len(vocab))
    has = counts > 0
    sums[has] /= counts[has, None]
    return sums.astype(np.float32), has


def save_prior_knowledge(path, priors: dict[str, np.ndarray]) -> None:
    """Write aligned prior matrices (name -> tokens x d) as safetensors."""
    from safetensors.numpy import save_file

    save_file({name: np.ascontiguousarray(m, dtype=np.float32) for name, m in priors.items()}, str(path))


def load_prior_knowledge(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))

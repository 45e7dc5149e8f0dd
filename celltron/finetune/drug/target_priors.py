"""Knowledge priors over drug targets, for the similar_drugs baseline (ic50 mode).

A drug held out of training borrows responses from training drugs that resemble it. Besides
shared targets, a shared pathway and similar structure, two drugs can resemble each other
because their targets sit close together in what is known about genes: a gene regulatory
network, or any gene x d table a lab brings (co-expression loadings, protein language model
embeddings). `drug.target_grn` and `drug.target_table` give each gene a row, the same way
`celltron priors build` does for a model's vocabulary (celltron.tokenizers.gene_priors: the GRN's
spectral embedding, a table mapped through gene symbols or Ensembl IDs); each drug then gets its
targets' mean row (features.target_vectors), and the kernel's `prior` part is the cosine of two
drugs' rows. Whether that part is used is chosen like the rest of the kernel, by inner
cross-validation over the training drugs (ic50.PRIOR_GRID).

GDSC lists targets by symbol. A name finds a row through the bundled human symbol table, aliases
included, so some family names resolve to one member gene (e.g. "HDAC"); mechanisms ("PI3K
(class 1)", "Microtubule stabiliser") find none. What was found is recorded in metrics.json
(`target_priors`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from celltron.errors import ConfigError, InputError

GRN_OPTION = "drug.target_grn (--target-grn)"
TABLE_OPTION = "drug.target_table (--target-table)"


@contextmanager
def _drug_fixes(option: str, path, dims: int | None = None):
    """The builders' two errors whose fix reads differently here: no gene maps (the drug task has
    no --species or --gene-column: the names must be human), and a GRN too small for its width."""
    from celltron.corpus.genes import GeneMappingError

    try:
        yield
    except GeneMappingError:
        raise InputError(
            f"{option} {path}: none of its gene names is a human gene symbol or Ensembl ID; GDSC targets are human, "
            "so give human symbols or Ensembl IDs (TRRUST: TF and target columns; a table: its first column)"
        ) from None
    except ConfigError as error:
        if dims is None:
            raise
        reason = str(error).split(";")[0]
        raise ConfigError(
            f"{reason}; lower drug.target_prior_dims (now {dims}; at least 2: --set drug.target_prior_dims=N) "
            "or give a table whose genes form a larger connected graph"
        ) from None


def _human_gene_vocab():
    """Every human gene of the bundled tables as one token each (the prior builders align rows to a vocabulary)."""
    from celltron.corpus.genes import symbol_to_ensembl
    from celltron.tokenizers.vocab import GeneVocab

    return GeneVocab.from_genes(sorted(set(symbol_to_ensembl("human").values())), name="human-genes")


def _rows_by_symbol(prior, vocab) -> dict[str, np.ndarray]:
    """Upper-case human symbol -> the prior's row, for the genes it covers."""
    from celltron.corpus.genes import symbol_to_ensembl

    rows = {}
    for symbol, gene_id in symbol_to_ensembl("human").items():
        token = vocab[gene_id]
        if prior.has[token]:
            rows[symbol.upper()] = prior.matrix[token].astype(np.float64)
    return rows


def read_target_priors(section) -> tuple[list[dict[str, np.ndarray]], list[dict]]:
    """The gene tables of `drug.target_grn` (a TF-target table, TRRUST format: its spectral
    embedding, `drug.target_prior_dims` wide) and `drug.target_table` (a gene x d CSV/TSV), each
    as symbol -> row, with a record of each (source, sha256, genes covered). Neither set: ([], [])."""
    from celltron.tokenizers.gene_priors import grn_prior, table_prior

    if not (section.target_grn or section.target_table):
        return [], []
    for option, given in ((GRN_OPTION, section.target_grn), (TABLE_OPTION, section.target_table)):
        if given and not Path(given).is_file():
            kind = "a TF-target table (TRRUST format)" if option == GRN_OPTION else "a gene x d CSV/TSV"
            raise InputError(f"{option} {given}: no such file; give {kind}")
    vocab = _human_gene_vocab()
    priors = []
    if section.target_grn:
        dims = section.target_prior_dims
        with _drug_fixes(GRN_OPTION, section.target_grn, dims):
            priors.append(grn_prior(section.target_grn, vocab, dims, species="human", name="grn", option=GRN_OPTION))
    if section.target_table:
        with _drug_fixes(TABLE_OPTION, section.target_table):
            priors.append(table_prior(section.target_table, vocab, name="table", species="human", option=TABLE_OPTION))
    tables = [_rows_by_symbol(prior, vocab) for prior in priors]
    records = [
        {"name": prior.name, "method": prior.method, "sources": prior.sources, "genes_with_row": int(prior.has.sum())}
        for prior in priors
    ]
    return tables, records


def coverage(targets: dict, vectors: dict, tables: list[dict]) -> dict:
    """How much of the drug list the priors reach: drugs with targets, drugs with a vector, and
    the target names with a row in any prior."""
    names = sorted(frozenset().union(*targets.values())) if targets else []
    found = [name for name in names if any(name.upper() in table for table in tables)]
    return {
        "drugs_with_targets": sum(bool(t) for t in targets.values()),
        "drugs_with_vector": len(vectors),
        "target_names": len(names),
        "target_names_with_row": len(found),
    }

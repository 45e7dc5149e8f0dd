"""Prior-knowledge matrices for GeneCompass-style models: one row per token of a run's vocabulary.

GeneCompass fuses what is known about each gene (its regulators and targets, its co-expression
partners, its family) into the gene's input embedding. `celltron priors build` writes those
matrices for one corpus and tokenizer scheme, so their rows line up with the vocabulary the
pretraining run builds from the same corpus and scheme:

- `grn` (built in celltron.tokenizers.gene_priors, as `--table` is): a spectral embedding
  (Laplacian eigenmaps: the eigenvectors of the normalised Laplacian with the smallest non-zero eigenvalues, scikit-learn's `spectral_embedding`) of the
  undirected graph of a TF-target table in TRRUST format, on its largest connected component
  (other genes get no row: an embedding cannot place a component that no edge ties to the rest).
  Genes that share a token (orthologs) are one node.
- `coexpression`: the top components of the gene-gene correlation of log-normalised training
  cells, streamed: one pass for each gene's mean and variance, one pass through a Frequent
  Directions sketch of the gene-standardised cells (memory bounded by the sketch, never genes x
  genes). A gene's row is its right singular vector coordinates x sqrt(singular value).
- `--table NAME=FILE`: any gene x d matrix a lab brings (a CSV/TSV, first column gene symbols or
  Ensembl IDs), mapped to Ensembl IDs as corpus genes are, then to tokens; rows of genes that
  share a token are averaged.

Each matrix is scaled to an overall std of 1 (the model's projection learns the rest) and saved
as NAME.npy (float32, vocab size x d); tokens without a prior get zeros. `priors.json` records
the corpus, scheme, the vocabulary's size and sha256 (of its token strings in id order), and per
prior its file, shape, method, how many tokens it covers, and its sources with their sha256.
`load_priors` refuses a matrix whose rows are not the run's vocabulary.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from celltron.corpus.schema import sha256_file
from celltron.corpus.store import Corpus, log_normalised_cells
from celltron.errors import ConfigError, InputError
from celltron.io import write_folder_atomically
from celltron.preprocessing import FrequentDirections
from celltron.pretrain.data import corpus_tokenizer
from celltron.pretrain.svd_init import gene_vectors, token_columns
from celltron.tokenizers.gene_priors import DEFAULT_DIMS, Prior, grn_prior, table_prior, unit_std

PRIORS_MANIFEST = "priors.json"
MODEL_PRIORS_FILE = "model_priors.json"  # in a run's model folder, so every export carries it
PRIORS_FORMAT = "celltron-priors"
PRIOR_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def vocab_sha256(vocab) -> str:
    """The vocabulary's fingerprint: sha256 of its token strings in id order."""
    return hashlib.sha256("\n".join(vocab.tokens).encode()).hexdigest()


# ---------------------------------------------------------------- co-expression


def coexpression_prior(corpus, vocab, dims: int = DEFAULT_DIMS, max_cells: int = 50_000, name: str = "coexpression") -> Prior:
    """Top components of the gene-gene correlation of the corpus's training cells (module
    docstring); genes are the vocabulary's tokens, orthologs summed into their shared token."""
    mapping, column_tokens = token_columns(corpus, vocab)
    if len(column_tokens) == 0:
        raise InputError(f"{corpus.location}: no corpus gene has a token in the {vocab.name} vocabulary")
    rows = 2 * dims
    sums, squares, cells = np.zeros(len(column_tokens)), np.zeros(len(column_tokens)), 0
    for block in log_normalised_cells(corpus, "train", max_cells, block_cells=4096):
        columns = block @ mapping
        sums += np.asarray(columns.sum(axis=0)).ravel()
        squares += np.asarray(columns.multiply(columns).sum(axis=0)).ravel()
        cells += columns.shape[0]
    if cells < 2:
        raise InputError(f"{corpus.location}: its training split has {cells} cell(s); co-expression needs at least 2")
    variance = np.maximum(squares / cells - (sums / cells) ** 2, 0.0)
    varies = variance > 0
    scale = sp.diags(np.where(varies, 1.0 / np.sqrt(np.where(varies, variance, 1.0)), 0.0))
    sketch = FrequentDirections(len(column_tokens), rows)
    for block in log_normalised_cells(corpus, "train", max_cells, block_cells=rows):
        sketch.update(block @ mapping @ scale)  # standardised genes: their covariance is the correlation
    values, right = sketch.components(dims, centre=True)
    vectors = gene_vectors(values, right, dims)
    matrix = np.zeros((len(vocab), dims))
    has = np.zeros(len(vocab), dtype=bool)
    matrix[column_tokens[varies]] = vectors[varies]
    has[column_tokens[varies]] = True
    method = {
        "kind": "coexpression",
        "algorithm": "gene-gene correlation of log-normalised training cells, Frequent Directions sketch of "
        f"{rows} rows, top components x sqrt(singular value)",
        "split": "train",
        "cells": int(cells),
    }
    manifest = Path(str(corpus.location)) / "manifest.json"
    sources = [{"path": str(corpus.location), **({"sha256": sha256_file(manifest)} if manifest.is_file() else {})}]
    return Prior(name, unit_std(matrix, has), has, method, sources)


# ---------------------------------------------------------------- build, save, load


def build_priors(
    out,
    corpus_location,
    scheme: str,
    grn=None,
    grn_species: str | None = None,
    coexpression: bool = False,
    tables: dict | None = None,
    dims: int = DEFAULT_DIMS,
    max_cells: int = 50_000,
    max_len: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    storage_options: dict | None = None,
) -> dict:
    """Build the priors asked for, aligned to the vocabulary of `scheme` on the corpus, into
    folder `out` (written under a temporary name, then swapped in); returns the manifest."""
    tables = dict(tables or {})
    for name in ["grn"] * bool(grn) + ["coexpression"] * coexpression + list(tables):
        if not PRIOR_NAME.match(name):
            raise ConfigError(f"prior name {name!r}: use lower-case letters, digits and _ (starting with a letter)")
    if len(set(tables) & {"grn", "coexpression"}) or not (grn or coexpression or tables):
        raise ConfigError(
            "give at least one of --grn FILE, --coexpression, --table NAME=FILE (table names other than grn and coexpression)"
        )
    if dims < 1:
        raise ConfigError(f"--dims {dims}: give 1 or more")
    corpus = Corpus(corpus_location, storage_options)
    vocab = corpus_tokenizer(corpus, scheme, max_len, seed).vocab
    priors = []
    if grn:
        priors.append(grn_prior(grn, vocab, dims, grn_species))
    if coexpression:
        priors.append(coexpression_prior(corpus, vocab, dims, max_cells))
    priors += [table_prior(path, vocab, name) for name, path in tables.items()]
    manifest = {
        "format": PRIORS_FORMAT,
        "version": 1,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "corpus": str(corpus.location),
        "scheme": scheme,
        "vocab": {"name": vocab.name, "size": len(vocab), "sha256": vocab_sha256(vocab)},
        "priors": {
            p.name: {
                "file": f"{p.name}.npy",
                "shape": list(p.matrix.shape),
                "tokens_with_prior": int(p.has.sum()),
                "method": p.method,
                "sources": p.sources,
            }
            for p in priors
        },
    }

    def fill(folder: Path) -> None:
        for prior in priors:
            np.save(folder / f"{prior.name}.npy", prior.matrix)
        (folder / PRIORS_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")

    write_folder_atomically(out, fill, overwrite=overwrite, written_by="celltron priors build")
    return manifest


def load_priors(paths: dict, vocab, option: str = "model.priors") -> dict[str, np.ndarray]:
    """name -> (vocab size, d) float32 matrix from each NAME: FILE.npy, refusing, naming the file,
    one that is missing, not a finite 2-D matrix, not one row per token of `vocab`, or (when a
    priors.json lies beside it) built for another vocabulary."""
    matrices = {}
    for name, path in paths.items():
        where = f"{option}.{name}: {path}"
        if not PRIOR_NAME.match(str(name)):
            raise ConfigError(f"{option}.{name}: prior names are lower-case letters, digits and _ (starting with a letter)")
        if not isinstance(path, (str, Path)):
            raise ConfigError(f"{where}: give the path of a .npy matrix (tokens x d)")
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"{where}: no such file; build it with `celltron priors build --corpus CORPUS --scheme SCHEME --out DIR`"
            )
        try:
            matrix = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as error:
            raise ConfigError(f"{where}: not a .npy matrix ({error})") from None
        if not isinstance(matrix, np.ndarray):  # an .npz archive
            raise ConfigError(f"{where}: an archive of several arrays; give one .npy matrix (tokens x d)")
        if matrix.ndim != 2 or matrix.dtype.kind not in "fiu" or not np.isfinite(matrix).all():
            raise ConfigError(f"{where}: expected a finite 2-D numeric matrix (tokens x d), got {matrix.dtype} {matrix.shape}")
        if matrix.shape[0] != len(vocab):
            raise ConfigError(
                f"{where}: has {matrix.shape[0]} rows; this run's {vocab.name} vocabulary has {len(vocab)} tokens, so "
                f"expected ({len(vocab)}, d); rebuild it with `celltron priors build` on this run's corpus and tokenizer scheme"
            )
        _check_built_for(path, vocab, where)
        matrices[name] = matrix.astype(np.float32)
    return matrices


def _manifest_beside(path: Path, where: str) -> dict:
    """The priors.json beside a prior's file ({} when there is none), refused when unreadable."""
    manifest_path = path.parent / PRIORS_MANIFEST
    if not manifest_path.is_file():
        return {}
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        manifest = error
    if not isinstance(manifest, dict):
        raise ConfigError(
            f"{where}: {manifest_path} beside it is not a priors manifest ({manifest}); rebuild the folder with "
            "`celltron priors build`, or remove the file if the matrix is your own"
        )
    return manifest


def _check_built_for(path: Path, vocab, where: str) -> None:
    """Refuse a matrix whose priors.json says it was built for another vocabulary (a lab's own
    aligned matrix, with none beside it, has only the shape check)."""
    manifest = _manifest_beside(path, where)
    built = manifest.get("vocab") or {}
    if manifest.get("format") == PRIORS_FORMAT and built.get("sha256") not in (None, vocab_sha256(vocab)):
        raise ConfigError(
            f"{where}: built for another vocabulary ({built.get('name')}, {built.get('size')} tokens, scheme "
            f"{manifest.get('scheme')}, corpus {manifest.get('corpus')}), not this run's {vocab.name}; rebuild it with "
            "`celltron priors build` on this run's corpus and tokenizer scheme"
        )


def describe_priors(paths: dict) -> dict:
    """What a run's model.priors were: per name the file, its sha256, and the record `celltron
    priors build` wrote for it (method, sources, vocabulary) when its priors.json lies beside it."""
    described = {}
    for name, path in paths.items():
        path = Path(path)
        record = {"path": str(path.resolve()), "sha256": sha256_file(path)}
        manifest = _manifest_beside(path, f"model.priors.{name}: {path}")
        built = [r for r in manifest.get("priors", {}).values() if isinstance(r, dict) and r.get("file") == path.name]
        if built:
            record["built"] = {**built[0], **{k: manifest.get(k) for k in ("corpus", "scheme", "vocab")}}
        described[name] = record
    return {"format": "celltron-model-priors", "priors": described}


def check_resumed_priors(paths: dict, recorded_file: Path) -> None:
    """Refuse to resume a run whose model.priors differ from those it started with (its
    MODEL_PRIORS_FILE): the checkpoint holds the old matrices, and a rebuilt file would be
    silently ignored, or fail to load with another width."""
    if not Path(recorded_file).is_file():
        return
    recorded = json.loads(Path(recorded_file).read_text()).get("priors", {})
    fix = "resume with the priors the run started with, or start a new run in another --out"
    if set(recorded) != set(paths):
        raise ConfigError(f"model.priors names {sorted(paths)}; the run started with {sorted(recorded)}: {fix}")
    for name, path in paths.items():
        if sha256_file(Path(path)) != recorded[name]["sha256"]:
            raise ConfigError(
                f"model.priors.{name}: {path} differs from the file the run started with ({recorded[name]['path']}): {fix}"
            )

"""Paired pretraining on real paired data (TEA-seq RNA + 46 proteins, SNARE-seq RNA + ATAC; 300
cells): the contrastive loss falls, a stopped run resumes with the uninterrupted losses, the
export holds the RNA model and both towers, and configs refuse what cannot work."""

import itertools
import math

import numpy as np
import pytest
import torch

import celltron  # noqa: F401
from celltron.cli import main
from celltron.corpus.build_multimodal import build_multimodal_corpus
from celltron.corpus.options import BuildOptions
from celltron.errors import ConfigError
from celltron.model_zoo import FAMILIES
from celltron.model_zoo.contrastive import DualEncoder
from celltron.pretrain.config import load_config, replace
from celltron.pretrain.run import PAIRED_EXPORT, pretrain
from tests.conftest import shared_file
from tests.corpus.test_modalities import SNARE_ATAC, SNARE_RNA
from tests.pretrain.conftest import CONFIGS, config_for, metric_rows
from tests.pretrain.test_pretrain import _SendSigterm


def test_the_contrastive_loss_falls_and_the_export_holds_both_towers(citeseq_corpus, tmp_path):
    config = config_for("geneformer_citeseq_debug.yaml", citeseq_corpus, trainer={"max_steps": 100, "val_every": 100})
    result = pretrain(config, tmp_path)
    contrastive = [loss for _, loss in metric_rows(tmp_path, "contrastive_loss")]
    assert contrastive[0] > math.log(32) - 0.05  # 32 cells a batch: chance, or worse before training
    assert sum(contrastive[-3:]) / 3 < math.log(32) - 0.5, contrastive
    masked = [loss for _, loss in metric_rows(tmp_path, "loss")]
    assert masked[-1] < masked[0]
    rna = FAMILIES["geneformer"].model_class.from_pretrained(result.export)  # the RNA model: a plain Geneformer folder
    dual = DualEncoder.from_pretrained(result.export / PAIRED_EXPORT)
    assert dual.modalities == ["rna", "adt"] and rna.config.vocab_size == dual.encoders["rna"].config.vocab_size
    state = dual.encoders["rna"].state_dict()
    assert all(torch.equal(value, state[key]) for key, value in rna.state_dict().items())


def test_a_stopped_paired_run_resumes_with_the_uninterrupted_losses(citeseq_corpus, tmp_path):
    config = config_for(
        "geneformer_citeseq_debug.yaml",
        citeseq_corpus,
        data={"batch_size": 16, "round_cells": 64},
        trainer={"max_steps": 8, "log_every": 1, "val_every": 100, "checkpoint_every": 100},
    )
    pretrain(config, tmp_path / "whole")
    stopped = pretrain(config, tmp_path / "stopped", callbacks=[_SendSigterm(at_step=3)])
    assert stopped.interrupted and stopped.steps == 3
    pretrain(config, tmp_path / "stopped", resume="auto")
    for field in ("loss", "contrastive_loss"):
        assert metric_rows(tmp_path / "stopped", field) == metric_rows(tmp_path / "whole", field)
    assert len(metric_rows(tmp_path / "whole", "contrastive_loss")) == 8
    assert main(["export", str(tmp_path / "stopped" / "checkpoints" / "step=8.ckpt"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / PAIRED_EXPORT / "contrastive.pt").exists()


def test_chromatin_pairs_train_from_the_multiome_config(tmp_path):
    files = {"rna": shared_file(SNARE_RNA), "atac": shared_file(SNARE_ATAC)}
    build_multimodal_corpus(None, tmp_path / "c", BuildOptions(progress=False, val_fraction=0.1, genome="mm10"), modalities=files)
    config = config_for(
        "genecompass_multiome_debug.yaml", tmp_path / "c", trainer={"max_steps": 6, "val_every": 6, "log_every": 2}
    )
    result = pretrain(config, tmp_path / "run")
    assert result.steps == 6 and len(metric_rows(tmp_path / "run", "contrastive_loss")) == 3
    assert DualEncoder.from_pretrained(result.export / PAIRED_EXPORT).modalities == ["rna", "atac"]


def test_a_tower_of_a_family_that_reads_no_values_gets_the_proteins_in_rank_order(citeseq_corpus, tmp_path):
    from celltron.corpus.store import Corpus
    from celltron.corpus.stream import CorpusStream, collate_cells
    from celltron.pretrain.run import paired_model
    from celltron.tokenizers.multimodal import PROTEIN_SPECIALS, ModalityCells, protein_clr

    config = config_for(
        "geneformer_citeseq_debug.yaml",
        citeseq_corpus,
        multimodal={"pair_family": "geneformer"},
        trainer={"max_steps": 6, "val_every": 6, "log_every": 2},
    )
    corpus = Corpus(citeseq_corpus)
    rna = FAMILIES["geneformer"].model_class(FAMILIES["geneformer"].config_class.from_size("debug", vocab_size=64))
    _, tokens, _ = paired_model(config, corpus, rna)
    # the stream repeats epochs without end: take the first 8 cells
    flat = collate_cells(list(itertools.islice(CorpusStream(corpus, split="train", shuffle=False, rank=0, world_size=1), 8)))
    sequences = tokens(flat, np.random.default_rng(0))
    clr = protein_clr(ModalityCells.from_batch(flat, "adt"), corpus.n_features("adt"))
    for i in range(8):  # <cls>, then the panel from the highest CLR down
        proteins = sequences[i][1:] - len(PROTEIN_SPECIALS)
        assert sorted(proteins) == list(range(corpus.n_features("adt"))) and np.all(np.diff(clr[i, proteins]) <= 0)
    result = pretrain(config, tmp_path)
    assert len(metric_rows(tmp_path, "contrastive_loss")) == 3
    assert type(DualEncoder.from_pretrained(result.export / PAIRED_EXPORT).encoders["adt"]) is FAMILIES["geneformer"].model_class


def test_paired_settings_that_cannot_work_are_refused(citeseq_corpus, tmp_path, pbmc3k):
    base = load_config(CONFIGS / "pretrain" / "geneformer_citeseq_debug.yaml")
    with pytest.raises(ConfigError, match="needs multimodal.pair"):
        replace(base, multimodal={"pair": None}).check()
    with pytest.raises(ConfigError, match="data.packing"):
        replace(base, data={"packing": True}).check()
    with pytest.raises(ConfigError, match="multimodal.objective"):
        replace(base, multimodal={"objective": ["masked", "clip"]}).check()
    assert main(["corpus", "build", str(pbmc3k), "--out", str(tmp_path / "rna"), "--no-progress"]) == 0
    config = config_for("geneformer_citeseq_debug.yaml", tmp_path / "rna")
    with pytest.raises(ConfigError, match="is an RNA corpus"):
        pretrain(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()

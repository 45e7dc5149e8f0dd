"""Joint multi-modal pretraining on real paired data (TEA-seq RNA + 46 proteins, SNARE-seq RNA +
ATAC; 300 cells): one sequence per cell read by one model with modality embeddings, the masked
objective over every modality, an exact resume, an export whose tokenizer comes back multi-modal
and still embeds RNA-only data, and refusals of settings that cannot work."""

import math

import anndata as ad
import pytest
import torch

import celltron  # noqa: F401
from celltron.cli import main
from celltron.corpus.build_multimodal import build_multimodal_corpus
from celltron.corpus.options import BuildOptions
from celltron.corpus.store import Corpus
from celltron.errors import ConfigError, UserError
from celltron.model_zoo import FAMILIES
from celltron.model_zoo.registry import check_vocabulary
from celltron.pretrain.config import load_config, replace
from celltron.pretrain.data import PretrainDataModule, corpus_tokenizer
from celltron.pretrain.run import joint_tokenizer, pretrain
from celltron.tokenizers.multimodal import MODALITY_IDS, MultiModalTokenizer
from celltron.tokenizers.saving import load_tokenizer
from tests.conftest import shared_file
from tests.corpus.test_modalities import SNARE_ATAC, SNARE_RNA, TEASEQ_RNA
from tests.pretrain.conftest import CONFIGS, config_for, metric_rows
from tests.pretrain.test_pretrain import _SendSigterm


def test_a_joint_batch_hides_rna_and_protein_values_alike(citeseq_corpus):
    config = config_for("scgpt_citeseq_debug.yaml", citeseq_corpus).check()
    corpus = Corpus(citeseq_corpus)
    tokenizer = joint_tokenizer(config, corpus, corpus_tokenizer(corpus, "scgpt", config.tokenizer.max_len, 0))
    batch = next(iter(PretrainDataModule(corpus, "scgpt", tokenizer, config.data, 0).train_dataloader()))
    proteins = batch["modality_ids"] == MODALITY_IDS["adt"]
    assert (proteins.sum(1) == 46).all()  # every cell its whole panel, after its RNA tokens
    assert (batch["input_ids"][proteins] >= tokenizer.first_id["adt"]).all()
    hidden = (batch["values"] != batch["target_values"]) & batch["attention_mask"].bool()
    share = hidden[proteins].float().mean()
    assert abs(float(share) - config.data.mask_ratio) < 0.1  # scGPT's masked share, proteins included
    assert hidden[batch["modality_ids"] == MODALITY_IDS["rna"]].any()


def test_joint_scgpt_learns_and_its_export_embeds_rna_alone(citeseq_corpus, tmp_path):
    config = config_for("scgpt_citeseq_debug.yaml", citeseq_corpus, trainer={"max_steps": 60, "val_every": 30})
    result = pretrain(config, tmp_path / "run")
    losses = [loss for _, loss in metric_rows(tmp_path / "run", "loss")]
    assert losses[-1] < 0.8 * losses[0], losses
    for modality in ("rna", "adt"):  # validation scores each modality's hidden values, beside a guess without a model
        for score in ("mse", "mse_cellmean"):
            rows = metric_rows(tmp_path / "run", f"val_masked_{score}_{modality}")
            assert len(rows) == 2 and all(math.isfinite(v) and v > 0 for _, v in rows)
    model = FAMILIES["scgpt"].model_class.from_pretrained(result.export)
    tokenizer = load_tokenizer(result.export, Corpus(citeseq_corpus).gene_ids)
    assert isinstance(tokenizer, MultiModalTokenizer) and model.config.n_modalities == 2
    assert len(tokenizer.vocab) == model.config.vocab_size
    check_vocabulary(result.export)  # the saved tokenizer counts its protein tokens
    out = tmp_path / "embedded.h5ad"
    assert (
        main(["embed", "--model", str(result.export), "--data", str(shared_file(TEASEQ_RNA)), "--out", str(out), "--no-progress"])
        == 0
    )
    embedding = ad.read_h5ad(out).obsm["X_celltron"]
    assert embedding.shape == (300, model.config.hidden_size) and torch.isfinite(torch.as_tensor(embedding)).all()


def test_joint_chromatin_run_resumes_with_the_uninterrupted_losses(tmp_path):
    files = {"rna": shared_file(SNARE_RNA), "atac": shared_file(SNARE_ATAC)}
    build_multimodal_corpus(None, tmp_path / "c", BuildOptions(progress=False, val_fraction=0.1, genome="mm10"), modalities=files)
    config = config_for(
        "genecompass_multiome_joint_debug.yaml",
        tmp_path / "c",
        data={"round_cells": 64},
        trainer={"max_steps": 8, "log_every": 1, "val_every": 8, "checkpoint_every": 100},
    )
    whole = pretrain(config, tmp_path / "whole")
    stopped = pretrain(config, tmp_path / "stopped", callbacks=[_SendSigterm(at_step=3)])
    assert stopped.interrupted and stopped.steps == 3
    pretrain(config, tmp_path / "stopped", resume="auto")
    assert metric_rows(tmp_path / "stopped", "loss") == metric_rows(tmp_path / "whole", "loss")
    for score in ("accuracy", "accuracy_constant"):  # hidden open bins are predicted, beside the best constant guess
        assert len(metric_rows(tmp_path / "whole", f"val_masked_{score}_atac")) == 1
    assert FAMILIES["genecompass"].model_class.from_pretrained(whole.export).config.n_modalities == 3
    # mouse genes have no token in Geneformer's human vocabulary: such a run is refused, not trained on specials
    with pytest.raises(UserError, match=r"only 0 of 1,644 genes \(0%\) holding 0% of counts .*species is mouse.*ortholog"):
        pretrain(config_for("geneformer_debug.yaml", tmp_path / "c"), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_joint_settings_that_cannot_work_are_refused(citeseq_corpus, tmp_path, pbmc3k):
    base = load_config(CONFIGS / "pretrain" / "scgpt_citeseq_debug.yaml")
    with pytest.raises(ConfigError, match="two designs"):
        replace(base, multimodal={"pair": "adt", "objective": ["masked", "contrastive"]}).check()
    with pytest.raises(ConfigError, match="data.packing"):
        replace(base, data={"packing": True}).check()
    with pytest.raises(ConfigError, match="each once"):
        replace(base, multimodal={"joint": ["adt", "rna"]}).check()
    with pytest.raises(ConfigError, match="no atac modality"):
        pretrain(config_for("scgpt_citeseq_debug.yaml", citeseq_corpus, multimodal={"joint": ["atac"]}), tmp_path / "run")
    assert main(["corpus", "build", str(pbmc3k), "--out", str(tmp_path / "rna"), "--no-progress"]) == 0
    with pytest.raises(ConfigError, match="is an RNA corpus"):
        pretrain(config_for("scgpt_citeseq_debug.yaml", tmp_path / "rna"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_each_modality_is_scored_beside_the_cells_own_mean():
    from types import SimpleNamespace

    from celltron.training.module import per_modality_scores

    target = torch.tensor([[0.0, 2.0, 4.0, 6.0, 10.0, 20.0, 30.0, 0.0]])  # <cls>, 3 RNA, 3 proteins, padding
    batch = {
        "modality_ids": torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0]]),
        "target_values": target,
        "values": torch.tensor([[0.0, 2.0, -1.0, 6.0, 10.0, -1.0, 30.0, -2.0]]),  # hidden: 4.0 (RNA), 20.0 (protein)
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]]),
    }
    predicted = target.clone()
    predicted[0, 5] = 23.0  # the protein guessed 3 off, the RNA value exactly
    scores = {key: float(value) for key, value, _ in per_modality_scores(batch, SimpleNamespace(expression=predicted))}
    assert scores["val/masked_mse_rna"] == 0 and scores["val/masked_mse_adt"] == 9
    assert scores["val/masked_mse_cellmean_rna"] == 0  # visible RNA (2, 6; not <cls>) average 4
    assert scores["val/masked_mse_cellmean_adt"] == 0  # visible proteins (10, 30) average 20
    batch["values"][0, 1] = -1.0  # hide 2.0 too: visible RNA is 6 alone
    scores = {key: float(value) for key, value, _ in per_modality_scores(batch, SimpleNamespace(expression=predicted))}
    assert scores["val/masked_mse_cellmean_rna"] == ((6 - 2) ** 2 + (6 - 4) ** 2) / 2


def test_hidden_tokens_are_scored_per_modality_beside_the_best_constant_guess():
    from types import SimpleNamespace

    from celltron.training.module import per_modality_scores

    labels = torch.tensor([[-100, 7, 7, 8, 50, 51, 51, 51]])  # hidden: 3 RNA genes, 4 open bins
    batch = {"modality_ids": torch.tensor([[0, 0, 0, 0, 2, 2, 2, 2]]), "labels": labels}
    logits = torch.zeros(7, 60)  # one row per hidden token, in order
    for row, guess in enumerate([7, 8, 8, 50, 50, 50, 51]):
        logits[row, guess] = 1.0
    scores = {key: float(value) for key, value, _ in per_modality_scores(batch, SimpleNamespace(logits=logits))}
    expected = {"rna": 2 / 3, "constant_rna": 2 / 3, "atac": 2 / 4, "constant_atac": 3 / 4}
    assert {key: pytest.approx(scores[f"val/masked_accuracy_{key}"]) for key in expected} == expected

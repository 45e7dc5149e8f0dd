"""The contrastive dual encoder on real paired cells (TEA-seq RNA + 46 proteins): the loss falls and
partners are found, modality embeddings work in every family, the folder round-trips, and the
gathered loss of two ranks equals the loss of one process on the whole batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from celltron.corpus.build_multimodal import build_multimodal_corpus
from celltron.corpus.options import BuildOptions
from celltron.corpus.store import Corpus
from celltron.corpus.stream import CorpusStream, collate_cells
from celltron.model_zoo.contrastive import DualEncoder, info_nce
from celltron.model_zoo.genecompass import GeneCompassConfig, GeneCompassForPretraining
from celltron.model_zoo.geneformer import GeneformerConfig, GeneformerForMaskedLM
from celltron.model_zoo.scgpt import ScGPTConfig, ScGPTModel
from celltron.pretrain.data import corpus_tokenizer
from celltron.tokenizers.multimodal import PROTEIN_SPECIALS, ModalityCells, protein_sequences
from celltron.tokenizers.schemes import Block
from tests.conftest import shared_file
from tests.corpus.test_modalities import TEASEQ_ADT, TEASEQ_RNA


def padded(ids: list[np.ndarray], values: list[np.ndarray] | None = None, pad_value: float = -2.0) -> dict:
    length = max(len(i) for i in ids)
    batch = {
        "input_ids": torch.zeros(len(ids), length, dtype=torch.long),
        "attention_mask": torch.zeros(len(ids), length, dtype=torch.long),
    }
    if values is not None:
        batch["values"] = torch.full((len(ids), length), pad_value)
    for row, cell in enumerate(ids):
        batch["input_ids"][row, : len(cell)] = torch.as_tensor(cell)
        batch["attention_mask"][row, : len(cell)] = 1
        if values is not None:
            batch["values"][row, : len(cell)] = torch.as_tensor(values[row])
    return batch


@pytest.fixture(scope="module")
def paired_batches(tmp_path_factory):
    """Token batches of the 300 TEA-seq cells: RNA (Geneformer V2, 64 tokens) and proteins."""
    out = tmp_path_factory.mktemp("contrastive") / "tea"
    files = {"rna": shared_file(TEASEQ_RNA), "adt": shared_file(TEASEQ_ADT)}
    build_multimodal_corpus(None, out, BuildOptions(progress=False, val_fraction=0.0), modalities=files)
    corpus = Corpus(out)
    batch = collate_cells(list(CorpusStream(corpus, infinite=False, shuffle=False)))
    rna = corpus_tokenizer(corpus, "geneformer-v2", 64, 0)
    species = corpus.manifest["obs_categories"]["species"]
    block = Block(
        batch["offsets"], batch["genes"], batch["counts"], batch["n_counts"], [species[c] for c in batch["species"]], {}
    )
    rna_tokens = rna.encode_block(block, np.random.default_rng(0))
    proteins = protein_sequences(ModalityCells.from_batch(batch, "adt"), 46, 51, np.random.default_rng(0))
    rna_ids = [rna_tokens[i] for i in range(len(rna_tokens))]
    adt_ids = [proteins[i] for i in range(len(proteins))]
    adt_values = [proteins.cell_values(i) for i in range(len(proteins))]
    return rna, rna_ids, adt_ids, adt_values


def dual_encoder(rna_vocab: int, seed: int = 0) -> DualEncoder:
    torch.manual_seed(seed)
    rna = GeneformerForMaskedLM(GeneformerConfig.from_size("debug", vocab_size=rna_vocab, hidden_dropout_prob=0.0))
    adt = ScGPTModel(ScGPTConfig.from_size("debug", vocab_size=len(PROTEIN_SPECIALS) + 46, dropout=0.0, pad_token_id=0))
    return DualEncoder({"rna": rna, "adt": adt}, projection_dim=32)


def batches(paired, rows) -> dict:
    _, rna_ids, adt_ids, adt_values = paired
    return {
        "rna": padded([rna_ids[r] for r in rows]),
        "adt": padded([adt_ids[r] for r in rows], [adt_values[r] for r in rows]),
    }


def test_the_contrastive_loss_falls_and_partners_are_found(paired_batches):
    """On the cells it trains on: whether the alignment generalises to unseen cells is the
    cross-modal benchmark's question (60 steps on 236 cells memorise, as CLIP would)."""
    model = dual_encoder(len(paired_batches[0].vocab))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    probe = np.arange(64)  # a fixed batch of training cells, scored with batch statistics (the
    # projection heads' batch norm; their running averages trail a model this young)
    with torch.no_grad():
        before = model(batches(paired_batches, probe))
    losses = []
    for _ in range(60):
        rows = rng.choice(236, 64, replace=False)
        loss = model(batches(paired_batches, rows))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        after = model(batches(paired_batches, probe))
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0, losses
    assert after["loss"] < before["loss"] - 1.0 and after["accuracy"] > 10 / 64  # chance: 1 / 64
    assert before["loss"] > np.log(64) - 0.2  # untrained: chance or worse


def test_the_folder_round_trips(paired_batches, tmp_path):
    model = dual_encoder(len(paired_batches[0].vocab)).eval()
    model.save_pretrained(tmp_path / "dual")
    again = DualEncoder.from_pretrained(tmp_path / "dual").eval()
    rows = np.arange(32)
    with torch.no_grad():
        assert torch.allclose(model(batches(paired_batches, rows))["loss"], again(batches(paired_batches, rows))["loss"])


@pytest.mark.parametrize("family", ["geneformer", "scgpt", "genecompass"])
def test_modality_ids_add_a_type_embedding_in_every_family(family):
    torch.manual_seed(0)
    if family == "geneformer":
        model = GeneformerForMaskedLM(GeneformerConfig.from_size("debug", vocab_size=50, n_modalities=3, hidden_dropout_prob=0.0))
    elif family == "scgpt":
        model = ScGPTModel(ScGPTConfig.from_size("debug", vocab_size=50, n_modalities=3, dropout=0.0))
    else:
        model = GeneCompassForPretraining(
            GeneCompassConfig.from_size("debug", vocab_size=50, n_modalities=3, hidden_dropout_prob=0.0)
        )
    model.eval()
    ids = torch.randint(3, 50, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "values": torch.rand(2, 6)}
    rna_only = model(**batch, heads=False).cell_embedding
    same = model(**batch, modality_ids=torch.zeros_like(ids), heads=False).cell_embedding
    mixed = model(**batch, modality_ids=torch.tensor([[0, 0, 0, 1, 1, 2]] * 2), heads=False).cell_embedding
    if family != "scgpt":  # BERT families: type 0 is what single-modality inputs always had
        assert torch.allclose(rna_only, same, atol=1e-6)
    assert not torch.allclose(same, mixed, atol=1e-4)
    with pytest.raises(ValueError, match="modality id 3"):
        model(**batch, modality_ids=torch.full_like(ids, 3), heads=False)


def _two_ranks(rank: int, path: str, first, second, scale, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    half = first.shape[0] // 2
    a = first[rank * half : (rank + 1) * half].clone().requires_grad_(True)
    b = second[rank * half : (rank + 1) * half].clone()
    loss, _ = info_nce(a, b, scale)
    loss.backward()
    out[rank] = (float(loss), a.grad.clone())
    dist.destroy_process_group()


def test_negatives_are_gathered_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    generator = torch.Generator().manual_seed(0)
    first = torch.nn.functional.normalize(torch.randn(8, 4, generator=generator), dim=-1)
    second = torch.nn.functional.normalize(torch.randn(8, 4, generator=generator), dim=-1)
    scale = torch.tensor(2.0)
    whole = first.clone().requires_grad_(True)
    loss, _ = info_nce(whole, second, scale)
    loss.backward()
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_two_ranks, args=(str(tmp_path / "rendezvous"), first, second, scale, out), nprocs=2, join=True)
    # DDP averages the ranks' gradients: their mean loss and summed-then-halved gradients are the whole batch's
    assert abs((out[0][0] + out[1][0]) / 2 - float(loss)) < 1e-6
    assert torch.allclose(torch.cat([out[0][1], out[1][1]]) / 2, whole.grad, atol=1e-6)

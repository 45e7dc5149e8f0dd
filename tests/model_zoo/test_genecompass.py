"""GeneCompass family: priors and species shape the embedding and travel with the weights, the
dual loss is weighted as configured, padded = packed, it learns."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from celltron.model_zoo.genecompass import GeneCompassConfig, GeneCompassForPretraining
from celltron.tokenizers.collate import MLMCollator, PackingCollator, pack_stream

VOCAB = 90
SPECIES = [4, 5]  # <human>, <mouse>
PRIORS = {"promoter": 6, "coexpression": 3}


def _model(**overrides):
    torch.manual_seed(0)
    config = GeneCompassConfig.from_size(
        "debug",
        vocab_size=VOCAB,
        prior_dims=PRIORS,
        species_token_ids=SPECIES,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **overrides,
    )
    model = GeneCompassForPretraining(config).eval()
    rng = np.random.default_rng(0)
    for name, width in PRIORS.items():
        model.set_prior_knowledge(name, rng.normal(size=(VOCAB, width)))
    return model


def _cells(n, seed=0):
    rng = np.random.default_rng(seed)
    cells = []
    for i in range(n):
        length = int(rng.integers(5, 30))
        ids = np.concatenate([[SPECIES[i % 2]], rng.choice(np.arange(6, VOCAB), length, replace=False)])
        values = np.concatenate([[0.0], np.sort(rng.random(length) * 4)[::-1]]).astype(np.float32)
        cells.append({"input_ids": ids, "values": values})
    return cells


def _collator(probability=0.0, seed=0):
    return MLMCollator(
        0,
        1,
        [0, 1, 2, 3, *SPECIES],
        VOCAB,
        probability=probability,
        generator=torch.Generator().manual_seed(seed),
        values_key="values",
    )


def test_priors_and_species_shape_the_embedding_and_are_saved(tmp_path):
    model = _model()
    batch = _collator()(_cells(4))
    with torch.no_grad():
        before = model(**batch).cell_embedding
        model.set_prior_knowledge("promoter", torch.zeros(VOCAB, PRIORS["promoter"]))
        no_promoter = model(**batch).cell_embedding
        swapped = dict(batch, input_ids=batch["input_ids"].clone())
        swapped["input_ids"][:, 0] = SPECIES[1] + SPECIES[0] - swapped["input_ids"][:, 0]
        other_species = model(**swapped).cell_embedding
    assert not torch.allclose(before, no_promoter)
    assert not torch.allclose(no_promoter, other_species)
    model.save_pretrained(tmp_path)
    again = GeneCompassForPretraining.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(again(**batch).cell_embedding, no_promoter, atol=1e-6)
    with pytest.raises(ValueError, match="tokens x width"):
        model.set_prior_knowledge("coexpression", np.zeros((VOCAB, 4)))


def test_fused_gene_embeddings_are_what_the_encoder_sees_of_each_gene_priors_included():
    model = _model()
    fused = model.fused_gene_embeddings(value=1.5)
    assert fused.shape == (VOCAB, model.config.hidden_size)
    # the same as the embedding layer's gene part for a token at that value
    ids = torch.tensor([[7, 9]])
    parts = [model.embeddings.word_embeddings(ids), torch.full((1, 2, 1), 1.5)]
    parts += [model.embeddings.prior_projections[n](getattr(model.embeddings, f"prior_{n}")[ids]) for n in sorted(PRIORS)]
    with torch.no_grad():
        assert torch.allclose(fused[[7, 9]], model.embeddings.fuse(torch.cat(parts, -1))[0], atol=1e-6)
        # a prior row moves its own token's fused embedding and no other's
        rows = getattr(model.embeddings, "prior_promoter").clone()
        rows[7] += 1.0
        model.set_prior_knowledge("promoter", rows)
    moved = model.fused_gene_embeddings(value=1.5)
    assert not torch.allclose(moved[7], fused[7]) and torch.allclose(moved[8:], fused[8:])


def test_heads_read_genes_with_their_priors_and_train_the_prior_projections():
    """gene_token_table is what fine-tuning heads read of each gene (perturbation keys, linear_model
    and graph features): for GeneCompass the fused embedding, so a prior reaches them."""
    from celltron.model_zoo.registry import gene_token_table

    model = _model()
    with torch.no_grad():
        assert torch.allclose(gene_token_table(model), model.fused_gene_embeddings(value=0.0), atol=1e-6)
    tokens = torch.tensor([[9, -1], [7, 9]])  # -1: no token (a padded multi-target row)
    table = gene_token_table(model, tokens)
    assert table.shape == (10, model.config.hidden_size)
    assert torch.allclose(table[[7, 9]], model.fused_gene_embeddings()[[7, 9]], atol=1e-6) and not table[:7].any()
    table[9].sum().backward()  # differentiable: a tuned head trains the priors' projections too
    assert model.embeddings.prior_projections["promoter"].weight.grad.abs().sum() > 0


def test_dual_loss_uses_the_configured_weights():
    model = _model(id_loss_weight=0.3, value_loss_weight=0.7)
    batch = _collator(probability=0.3)(_cells(8))
    chosen = batch["labels"] != -100
    assert (batch["values"][chosen] == 0).all() and (batch["target_values"][chosen] > 0).any()
    with torch.no_grad():
        out = model(**batch)
    id_loss = F.cross_entropy(out.logits[chosen], batch["labels"][chosen])
    value_loss = F.mse_loss(out.predicted_values[chosen], batch["target_values"][chosen])
    assert torch.allclose(out.loss, 0.3 * id_loss + 0.7 * value_loss, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_padded_and_packed_give_the_same_cells(pooling):
    model = _model(cell_embedding=pooling)
    cells = _cells(9, seed=1)
    padded = _collator()(cells)
    packs = list(pack_stream(iter(cells), max_tokens=96))
    packed = PackingCollator(96, 0)(packs)
    with torch.no_grad():
        a = model(**padded)
        b = model(**{k: packed[k] for k in ("input_ids", "values", "attention_mask", "position_ids", "cu_seqlens")})
    assert torch.allclose(a.cell_embedding, b.cell_embedding, atol=1e-5)
    spans = [(r, int(cu[k]), int(cu[k + 1])) for r, cu in enumerate(packed["cu_seqlens"]) for k in range(len(packs[r]))]
    for i, (r, lo, hi) in enumerate(spans):
        assert torch.allclose(a.logits[i, : hi - lo], b.logits[r, lo:hi], atol=1e-5)
        assert torch.allclose(a.predicted_values[i, : hi - lo], b.predicted_values[r, lo:hi], atol=1e-5)


def test_one_step_lowers_the_loss():
    model = _model().train()
    batch = _collator(probability=0.3)(_cells(16, seed=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = model(**batch).loss
    before.backward()
    optimizer.step()
    assert model(**batch).loss < before

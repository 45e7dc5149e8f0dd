"""GRN: edge scoring against a truth (AUPRC, its ratio over random, EPR), the co-expression
baselines on a network with known edges, the held-out TF x target blocks, the degree prior and
the intervals over held-out TFs, and `celltron grn` on real PBMCs with TRRUST."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from celltron.cli import main
from celltron.errors import ConfigError
from celltron.finetune.grn.evaluate import (
    anchored_scores,
    block_edges,
    block_folds,
    bootstrap_edges_metric,
    candidate_edges,
    check_anchor_weights,
    choose_anchor_weight,
    choose_anchor_weight_by_inner_folds,
    coexpression_scores,
    degree_prior_scores,
    evaluate_edges,
    evaluate_on_folds,
    rank_normalised,
)
from celltron.finetune.grn.run import attention_scores, bundled_tfs, candidates_first, scoreable_pairs
from celltron.finetune.report import choose_best
from celltron.inputs import read_truth
from celltron.tokenizers.ragged import RaggedTokens
from tests.conftest import shared_file

TFS, TARGETS = ["T1", "T2", "T3"], [f"G{i}" for i in range(20)]
TRUTH = pd.DataFrame({"tf": ["T1", "T1", "T2", "T3"], "target": ["G0", "G1", "G5", "G9"]})


def _scored(score_of) -> pd.DataFrame:
    edges = candidate_edges(TFS, TARGETS)
    edges["score"] = [score_of(tf, target) for tf, target in zip(edges.tf, edges.target)]
    return edges


def test_a_perfect_ranking_scores_one_and_its_reverse_scores_low():
    truth = set(zip(TRUTH.tf, TRUTH.target))
    perfect = evaluate_edges(_scored(lambda tf, t: float((tf, t) in truth)), TRUTH)
    density = 4 / (3 * 20)
    assert (
        perfect["auprc"] == 1
        and perfect["auprc_ratio"] == pytest.approx(1 / density)
        and perfect["epr"] == pytest.approx(1 / density)
    )
    assert perfect["n_true_edges"] == 4 and perfect["n_scored_edges"] == 60
    reverse = evaluate_edges(_scored(lambda tf, t: -float((tf, t) in truth)), TRUTH)
    assert reverse["epr"] == 0 and reverse["auprc_ratio"] < 1


def test_random_scores_have_a_ratio_near_one():
    rng = np.random.default_rng(0)
    tfs, targets = [f"T{i}" for i in range(30)], [f"G{i}" for i in range(300)]
    truth = pd.DataFrame({"tf": rng.choice(tfs, 400), "target": rng.choice(targets, 400)}).drop_duplicates()
    ratios = []
    for seed in range(5):
        edges = candidate_edges(tfs, targets)
        edges["score"] = np.random.default_rng(seed).random(len(edges))
        ratios.append(evaluate_edges(edges, truth)["auprc_ratio"])
    assert 0.8 < np.mean(ratios) < 1.25


def test_coexpression_finds_targets_driven_by_their_tfs():
    rng = np.random.default_rng(1)
    cells = 400
    tf_levels = rng.normal(size=(cells, 3))
    expression = rng.normal(size=(cells, 20))
    for tf, target in zip(TRUTH.tf, TRUTH.target):
        expression[:, TARGETS.index(target)] += 2 * tf_levels[:, TFS.index(tf)]
    matrix = np.concatenate([tf_levels, expression], axis=1)
    for method in ("pearson", "spearman"):
        edges = coexpression_scores(matrix, TFS + TARGETS, TFS, TARGETS, method)
        assert evaluate_edges(edges, TRUTH)["auprc"] == pytest.approx(1)


def test_truth_tables_read_with_or_without_a_header(tmp_path):
    (tmp_path / "a.tsv").write_text("TF\tTarget\nT1\tG0\nT1\tG0\nT2\tG5\n")
    (tmp_path / "b.tsv").write_text("T1\tG0\tActivation\t123\n")
    assert read_truth(tmp_path / "a.tsv").values.tolist() == [["T1", "G0"], ["T2", "G5"]]
    assert read_truth(tmp_path / "b.tsv").values.tolist() == [["T1", "G0"]]
    with pytest.raises(FileNotFoundError, match="--truth"):
        read_truth(tmp_path / "missing.tsv")


def test_bundled_tf_lists_hold_known_regulators():
    assert {"STAT1", "IRF1", "SPI1", "TP53"} <= set(bundled_tfs("human"))
    assert {"Stat1", "Irf1", "Spi1", "Trp53"} <= set(bundled_tfs("mouse"))


def test_block_folds_never_put_a_tf_or_a_target_on_both_sides():
    tfs = [f"T{i}" for i in range(10)]
    targets = [f"G{i}" for i in range(25)] + tfs[:4]  # some TFs are targets too
    folds = block_folds(tfs, targets, n_folds=3, seed=7)
    tested = []
    for fold in folds:
        assert not set(fold["test_tfs"]) & set(fold["train_tfs"])
        assert not set(fold["test_targets"]) & set(fold["train_targets"])
        assert set(fold["test_tfs"]) | set(fold["train_tfs"]) == set(tfs)
        assert set(fold["test_targets"]) | set(fold["train_targets"]) == set(targets)
        assert all(fold[k] == sorted(fold[k]) for k in fold)
        tested += [(tf, target) for tf in fold["test_tfs"] for target in fold["test_targets"]]
    assert len(tested) == len(set(tested))  # every pair tested at most once
    assert sorted(len(fold["test_tfs"]) for fold in folds) == [3, 3, 4]
    assert block_folds(tfs, targets, 3, seed=7) == folds and block_folds(tfs, targets, 3, seed=8) != folds
    with pytest.raises(ConfigError, match="--folds 11"):
        block_folds(tfs, targets, n_folds=11)


def test_the_cli_refuses_fewer_than_two_folds(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["grn", "--data", str(tmp_path / "lab.h5ad"), "--truth", "t.tsv", "--folds", "1"])
    assert exit_.value.code == 2 and "--folds: 1 is out of range; allowed: >= 2" in capsys.readouterr().err


def test_degree_prior_counts_training_tfs_regulating_the_target_and_never_a_pairs_own_edge():
    """Training TFs A, B, C; held-out X. Hub H is regulated by A, B and C, M by A only, Z by X only."""
    truth = pd.DataFrame({"tf": ["A", "B", "C", "A", "X"], "target": ["H", "H", "H", "M", "Z"]})

    def scores(truth):
        edges = degree_prior_scores(truth, ["A", "B", "C"], ["A", "B", "C", "X"], ["H", "M", "Z"])
        return {(tf, target): score for tf, target, score in zip(edges.tf, edges.target, edges.score)}

    held_out = scores(truth)
    assert [held_out["X", g] for g in ("H", "M", "Z")] == [3, 1, 0]  # the hub first; Z has no training regulator
    assert held_out["A", "H"] == 2 and held_out["A", "M"] == 0 and held_out["B", "M"] == 1  # own edge left out
    # a held-out pair's own label never moves any held-out score
    flipped = scores(pd.concat([truth, pd.DataFrame({"tf": ["X"], "target": ["M"]})]))
    assert all(flipped["X", g] == held_out["X", g] for g in ("H", "M", "Z"))


def _noisy_ranking(n_tfs: int, n_targets: int = 60, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Edges scored by truth plus noise, over a random truth of density 0.1."""
    rng = np.random.default_rng(seed)
    edges = candidate_edges([f"T{i}" for i in range(n_tfs)], [f"G{i}" for i in range(n_targets)])
    true = rng.random(len(edges)) < 0.1
    edges["score"] = true + rng.normal(size=len(edges))
    return edges, edges[true][["tf", "target"]]


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_tfs():
    widths = []
    for n_tfs in (10, 80):
        edges, truth = _noisy_ranking(n_tfs)
        interval = bootstrap_edges_metric(edges, truth, "auprc_ratio", n=300, seed=1)
        assert interval["low"] <= interval["mean"] <= interval["high"] and interval["n_units"] == n_tfs
        assert interval["mean"] == evaluate_edges(edges, truth)["auprc_ratio"] and interval["low"] > 1  # above random
        widths.append(interval["high"] - interval["low"])
    assert widths[1] < widths[0] / 2


def test_the_best_baseline_is_chosen_on_training_edges_and_compared_pairwise():
    edges, truth = _noisy_ranking(30, 40)
    tfs, targets = sorted(set(edges.tf)), sorted(set(edges.target))
    fold = {"test_tfs": tfs[:10], "test_targets": targets[:15], "train_tfs": tfs[10:], "train_targets": targets[15:]}
    on_test = edges.tf.isin(fold["test_tfs"]) & edges.target.isin(fold["test_targets"])
    is_true = edges.set_index(["tf", "target"]).index.isin(truth.set_index(["tf", "target"]).index)
    peeks = edges.assign(score=np.where(on_test, is_true, 0.0))  # perfect where held out, blind elsewhere
    fair = edges.assign(score=np.where(on_test, -edges.score, edges.score))  # good on training, bad where held out
    result = evaluate_on_folds(fair, {"peeks": peeks, "fair": fair}, truth, tfs, targets, [fold], n_resamples=200)
    (chosen,) = result["best_baseline"]
    assert chosen["name"] == "fair" and chosen["training_score"] == chosen["training_scores"]["fair"] > 1
    held_out = result["methods"]
    assert held_out["peeks"]["auprc_ratio"] > held_out["fair"]["auprc_ratio"]  # the choice never saw this
    # a model identical to the chosen baseline differs by exactly zero in every paired resample
    paired = result["paired"]
    assert paired["mean"] == paired["low"] == paired["high"] == 0 and paired["verdict"].startswith("no detectable")
    assert set(result["methods"]) == {"model", "peeks", "fair", "degree_prior"}
    for method in result["methods"].values():
        low, high = method["interval"]["auprc_ratio"]
        assert low <= method["auprc_ratio"] <= high


def _two_noisy_views(n_tfs: int = 45, n_targets: int = 120, seed: int = 0):
    """A random network of density 0.1 and two rankings of it with independent noise (a
    baseline and a model, each informative, together more so), the block folds over it."""
    rng = np.random.default_rng(seed)
    tfs, targets = [f"T{i}" for i in range(n_tfs)], [f"G{i}" for i in range(n_targets)]
    edges = candidate_edges(tfs, targets)
    true = rng.random(len(edges)) < 0.1
    baseline = edges.assign(score=np.round(true + rng.normal(size=len(edges)), 1))  # rounded: ties to break
    model = edges.assign(score=true + rng.normal(size=len(edges)))
    return baseline, model, edges[true][["tf", "target"]], tfs, targets, block_folds(tfs, targets, 3, seed=seed)


def test_rank_normalised_scores_share_ties_and_rank_unseen_pairs_last():
    assert rank_normalised([0.5, -2.0, 0.5, 0.1, -2.0]).tolist() == [0.9, 0.3, 0.9, 0.6, 0.3]


def test_weight_zero_reproduces_the_chosen_baseline_exactly():
    baseline, model, truth, tfs, targets, folds = _two_noisy_views()
    anchored = anchored_scores(baseline, model, 0)
    assert anchored.score.tolist() == baseline.score.tolist()
    assert evaluate_edges(anchored, truth) == evaluate_edges(baseline, truth)
    result = evaluate_on_folds(model, {"coexpression": baseline}, truth, tfs, targets, folds, n_resamples=50, anchor_weights=[0])
    for index, pick in enumerate(result["best_baseline"]):
        assert pick["weight"] == 0 and list(pick["weight_scores"]) == ["0.0"]
        assert result["methods"]["model"]["folds"][index] == result["methods"][pick["name"]]["folds"][index]
    paired = result["paired"]
    assert paired["mean"] == paired["low"] == paired["high"] == 0


def test_the_anchor_weight_is_chosen_without_reading_held_out_edges():
    baseline, model, truth, tfs, targets, folds = _two_noisy_views(seed=1)
    fold = folds[0]
    held_out = truth.tf.isin(fold["test_tfs"]) & truth.target.isin(fold["test_targets"])
    # the held-out block's true edges moved to other held-out pairs: the same count, other pairs
    rng = np.random.default_rng(5)
    scrambled = pd.DataFrame(
        {"tf": rng.choice(fold["test_tfs"], 200), "target": rng.choice(fold["test_targets"], 200)}
    ).drop_duplicates()[: held_out.sum()]
    moved = pd.concat([truth[~held_out], scrambled])

    def run(truth):
        return evaluate_on_folds(
            model, {"coexpression": baseline}, truth, tfs, targets, [fold], n_resamples=50, anchor_weights=(0, 0.5, 1)
        )

    before, after = run(truth), run(moved)
    assert before["methods"]["model"]["auprc_ratio"] != after["methods"]["model"]["auprc_ratio"]  # the test did change
    assert before["best_baseline"] == after["best_baseline"]  # baseline, weight and the training scores behind it


def test_an_informative_model_earns_a_weight_and_lifts_the_baseline_on_held_out_blocks():
    # inner blocks (1/9 of a training block each) need a network of this size to show the gain
    baseline, model, truth, tfs, targets, folds = _two_noisy_views(60, 160, seed=2)
    result = evaluate_on_folds(
        model, {"coexpression": baseline}, truth, tfs, targets, folds, n_resamples=100, anchor_weights=(1, 0.5, 0, 0.25, 0.75)
    )
    methods = result["methods"]
    for index, pick in enumerate(result["best_baseline"]):
        assert pick["name"] == "coexpression" and 0 < pick["weight"] < 1  # the blend beats either alone
        assert list(pick["weight_scores"]) == ["0.0", "0.25", "0.5", "0.75", "1.0"]  # tried ascending
        assert methods["model"]["folds"][index]["auprc"] >= methods["coexpression"]["folds"][index]["auprc"]
    assert methods["model"]["auprc_ratio"] > max(methods["coexpression"]["auprc_ratio"], methods["model_plain"]["auprc_ratio"])
    assert result["paired"]["low"] > 0 and result["paired"]["verdict"] == "the model adds signal beyond the baseline"


def test_edge_probabilities_are_calibrated_on_training_blocks_and_hold_on_held_out_ones():
    baseline, model, truth, tfs, targets, folds = _two_noisy_views(60, 160, seed=1)
    result = evaluate_on_folds(model, {"coexpression": baseline}, truth, tfs, targets, folds, n_resamples=50)
    calibrated = result["uncertainty"]
    assert calibrated["predictor"] == "model"
    # an informative score: better than the constant density, and its probabilities mean what they say
    assert calibrated["brier"] < 0.95 * calibrated["brier_training_density"]
    assert calibrated["expected_calibration_error"] < 0.03
    assert abs(calibrated["mean_probability"] - calibrated["share_true"]) < 0.02
    top = calibrated["top_k"]
    assert top["folds"] == 3 and top["inside"] >= 2 and all(f["k"] == 100 for f in top["per_fold"])
    # an uninformative score earns nothing over the density: probabilities stay near it
    rng = np.random.default_rng(0)
    noise = model.assign(score=rng.normal(size=len(model)))
    flat = evaluate_on_folds(noise, {"coexpression": noise}, truth, tfs, targets, folds, n_resamples=50)["uncertainty"]
    assert flat["brier"] >= 0.99 * flat["brier_training_density"]
    # the anchored head's probabilities come from its training block anchored at the fold's weight
    anchored = evaluate_on_folds(
        model, {"coexpression": baseline}, truth, tfs, targets, folds, n_resamples=50, anchor_weights=(0, 0.5)
    )
    assert anchored["uncertainty"]["predictor"] == "model (anchored head)"
    assert anchored["uncertainty"]["brier"] < anchored["uncertainty"]["brier_training_density"]


def test_a_weight_whose_training_gain_is_noise_is_not_taken():
    """A model of pure noise beside a coarse baseline (many ties, as the degree prior has): a small
    weight breaks ties at random and may score best on a training block by chance; the weight is
    kept at 0 unless its gain is beyond its bootstrap interval."""
    baseline, _, truth, tfs, targets, folds = _two_noisy_views(seed=4)
    baseline = baseline.assign(score=np.round(baseline.score))
    noise = baseline.assign(score=np.random.default_rng(0).normal(size=len(baseline)))
    best_of_grid = []
    for fold in folds:
        train = [block_edges(e, fold["train_tfs"], fold["train_targets"]) for e in (baseline, noise)]
        pick = choose_anchor_weight(*train, truth, (0, 0.05, 0.1, 0.25, 0.5, 1))
        assert pick["weight"] == 0, pick
        assert all(low <= 0 for low in pick["gain_low"].values())
        best_of_grid.append(float(choose_best(pick["weight_scores"])))
    assert max(best_of_grid) > 0  # the rule mattered: the best score alone would have taken noise


def test_the_weight_is_chosen_on_inner_blocks_each_anchored_on_a_baseline_built_without_them():
    baseline, _, truth, tfs, targets, folds = _two_noisy_views(seed=4)
    baseline = baseline.assign(score=np.round(baseline.score))
    noise = baseline.assign(score=np.random.default_rng(0).normal(size=len(baseline)))
    fold = folds[0]
    built_from = []

    def degree_prior_for(train_tfs):
        built_from.append(set(train_tfs))
        return degree_prior_scores(truth, train_tfs, tfs, targets)

    views_chosen_on = []

    def view_for(inner):  # a model view (attention layer / head) is chosen on the inner training block
        views_chosen_on.append(set(inner["train_tfs"]))
        return noise

    pick = choose_anchor_weight_by_inner_folds(degree_prior_for, view_for, truth, fold, (0, 0.05, 0.25, 1))
    assert pick["weight"] == 0 and pick["inner_folds"] == 3  # noise earns nothing on inner held-out blocks
    assert len(built_from) == 3 and all(tfs_ < set(fold["train_tfs"]) for tfs_ in built_from)
    assert views_chosen_on == built_from  # never on the whole training block, which holds the inner tests
    # each inner block's TFs are left out of its own prior, and every training TF is held out once
    held_out = [set(fold["train_tfs"]) - tfs_ for tfs_ in built_from]
    assert set().union(*held_out) == set(fold["train_tfs"]) and sum(map(len, held_out)) == len(fold["train_tfs"])
    pick_with_model = choose_anchor_weight_by_inner_folds(lambda _: baseline, baseline, truth, fold, (0, 0.5))
    assert set(pick_with_model["weight_scores"]) == {"0.0", "0.5"}


def test_the_plain_head_scores_the_models_own_edges():
    baseline, model, truth, tfs, targets, folds = _two_noisy_views(seed=3)
    plain = evaluate_on_folds(model, {"coexpression": baseline}, truth, tfs, targets, folds, n_resamples=50)
    anchored = evaluate_on_folds(
        model, {"coexpression": baseline}, truth, tfs, targets, folds, n_resamples=50, anchor_weights=(0, 1)
    )
    assert "model_plain" not in plain["methods"] and all("weight" not in pick for pick in plain["best_baseline"])
    assert plain["methods"]["model"] == anchored["methods"]["model_plain"]
    for index, fold in enumerate(folds):
        test = model[model.tf.isin(fold["test_tfs"]) & model.target.isin(fold["test_targets"])]
        assert plain["methods"]["model"]["folds"][index] == evaluate_edges(test, truth)


def test_each_fold_scores_the_model_view_best_on_its_training_block():
    baseline, model, truth, tfs, targets, folds = _two_noisy_views(seed=4)
    noise = model.assign(score=np.random.default_rng(9).random(len(model)))
    views = {"mean": noise, "layer1_head2": model}
    result = evaluate_on_folds(views, {"coexpression": baseline}, truth, tfs, targets, folds, n_resamples=50)
    for index, (pick, fold) in enumerate(zip(result["best_baseline"], folds)):
        assert pick["model_view"] == "layer1_head2" and list(pick["view_scores"]) == ["mean", "layer1_head2"]
        test = model[model.tf.isin(fold["test_tfs"]) & model.target.isin(fold["test_targets"])]
        assert result["methods"]["model"]["folds"][index] == evaluate_edges(test, truth)
    # a view perfect on the held-out block and blind elsewhere is not chosen: the choice never reads it
    fold = folds[0]
    on_test = model.tf.isin(fold["test_tfs"]) & model.target.isin(fold["test_targets"])
    is_true = model.set_index(["tf", "target"]).index.isin(truth.set_index(["tf", "target"]).index)
    peeks = model.assign(score=np.where(on_test, is_true, noise.score))
    result = evaluate_on_folds(
        {"mean": model, "peeks": peeks}, {"coexpression": baseline}, truth, tfs, targets, [fold], n_resamples=50
    )
    assert result["best_baseline"][0]["model_view"] == "mean"


def test_candidate_first_tokens_keep_specials_then_tfs_then_targets_in_the_cells_order():
    cls, eos = 1, 2
    tokens = RaggedTokens(np.array([cls, 10, 11, 12, 13, 14, eos, cls, 20, eos]), np.array([0, 7, 10]), np.arange(10.0))
    level = np.full(30, 2)
    level[13], level[[11, 14]] = 0, 1  # a candidate TF, two candidate targets
    kept = candidates_first(tokens, level, capacity=5, specials=[cls, eos])
    assert kept[0].tolist() == [cls, 11, 13, 14, eos]  # the TF, then targets, beat genes ranked above them
    assert kept.cell_values(0).tolist() == [0, 2, 4, 5, 6]  # values travel with their tokens
    assert kept[1].tolist() == [cls, 20, eos]  # a cell within the length is left as it is
    tight = candidates_first(tokens, level, capacity=4, specials=[cls, eos])
    assert tight[0].tolist() == [cls, 11, 13, eos]  # the TF, then the targets in the cell's own order


def test_scoreable_pairs_need_both_genes_in_one_cell_for_attention_and_anywhere_for_embeddings():
    token_of = {"T1": 13, "T2": 20, "G0": 11, "G1": 14}
    tokens = RaggedTokens(np.array([13, 11, 20, 14]), np.array([0, 2, 4]))
    together = scoreable_pairs(tokens, token_of, ["T1", "T2"], ["G0", "G1"], together=True)
    assert together.tolist() == [[True, False], [False, True]]
    assert scoreable_pairs(tokens, token_of, ["T1", "T2"], ["G0", "G1"], together=False).all()


def test_attention_keeps_each_layer_and_head_and_the_mean_view_averages_them(pretrained_geneformer):
    import torch

    from celltron.finetune.adapt import load_encoder
    from celltron.finetune.config import AdaptSection
    from celltron.model_zoo.common import recording_attention

    encoder = load_encoder(pretrained_geneformer, AdaptSection()).eval()
    layers, heads = encoder.config.num_hidden_layers, encoder.config.num_attention_heads
    cells = np.array([[30, 31, 32, 34, 35], [33, 35, 30, 36, 32]])  # gene tokens; 30 and 33 are TFs
    tokens = RaggedTokens(cells.ravel(), np.array([0, 5, 10]))
    token_of = {f"g{t}": t for t in range(30, 37)}
    tfs, targets = ["g30", "g33"], ["g32", "g34", "g36"]
    views = attention_scores(encoder, tokens, 0, token_of, tfs, targets)
    assert list(views) == ["mean", *[f"layer{i + 1}" for i in range(layers)]] + [
        f"layer{i + 1}_head{h + 1}" for i in range(layers) for h in range(heads)
    ]
    each = np.stack([views[f"layer{i + 1}_head{h + 1}"].score for i in range(layers) for h in range(heads)])
    assert np.allclose(views["mean"].score, each.mean(0))
    with torch.no_grad(), recording_attention([], per_head=True) as records:
        encoder(input_ids=torch.as_tensor(cells), attention_mask=torch.ones_like(torch.as_tensor(cells)), heads=False)
    # target g32 (query) on TF g30 (key), layer 2 head 1: position 2 on 0 in cell 0, 4 on 2 in cell 1
    by_hand = (records[1][0, 0, 2, 0] + records[1][1, 0, 4, 2]).item() / 2
    edges = views["layer2_head1"]
    assert np.isclose(edges.score[(edges.tf == "g30") & (edges.target == "g32")].item(), by_hand, atol=1e-6)
    for view in views.values():  # g33 and g34 never share a cell: last in every view
        assert view.score[(view.tf == "g33") & (view.target == "g34")].tolist() == [-1.0]


def test_anchor_weights_outside_zero_to_one_are_refused_naming_the_flag(tmp_path, capsys):
    assert check_anchor_weights([1, 0.5, 0, 0.5]) == (0, 0.5, 1)
    for weights in ([1.5], [-0.1, 0.5], [float("nan")], []):
        with pytest.raises(ConfigError, match="--anchor-weights"):
            check_anchor_weights(weights)
    code = main(["grn", "--data", str(tmp_path / "lab.h5ad"), "--truth", "t.tsv", "--anchor-weights", "0", "1.5"])
    assert code != 0 and "--anchor-weights: 1.5 outside [0, 1]" in capsys.readouterr().err


def test_grn_cli_scores_model_edges_beside_the_baselines_on_pbmc(pretrained_geneformer, tmp_path, capsys):
    data = shared_file("scrna/human/10x_pbmc4k_soupx_2170cells_raw.h5ad")
    truth = shared_file("grn/trrust_rawdata.human.tsv")
    code = main(
        [
            "grn",
            "--model",
            str(pretrained_geneformer),
            "--data",
            str(data),
            "--gene-column",
            "gene_symbol_original",
            "--truth",
            str(truth),
            "--out",
            str(tmp_path),
            "--max-cells",
            "150",
            "--top-genes",
            "300",
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "embedding"
    assert set(metrics["baselines"]) == {"coexpression_pearson", "coexpression_spearman", "genie3_extra_trees", "degree_prior"}
    assert metrics["split"]["kind"] == "tf_target_block" and len(metrics["split"]["folds"]) == metrics["split"]["n_folds"] == 3
    for result in [metrics["model"], *metrics["baselines"].values()]:
        assert {"auprc", "auprc_ratio", "epr", "n_true_edges", "n_scored_edges"} <= set(result)
        assert result["n_true_edges"] > 20 and len(result["folds"]) == 3
        assert result["all_pairs"]["n_true_edges"] > result["n_true_edges"]  # held-out blocks are a third of the pairs
        for metric, (low, high) in result["interval"].items():
            assert low <= result[metric] <= high
    # co-expression recovers TRRUST edges far above random on real PBMCs, held out as over all pairs
    assert metrics["baselines"]["coexpression_pearson"]["auprc_ratio"] > 1.5
    assert metrics["baselines"]["coexpression_pearson"]["all_pairs"]["auprc_ratio"] > 1.5
    assert len(metrics["best_baseline"]) == 3 and {"name", "training_score"} <= set(metrics["best_baseline"][0])
    paired = metrics["paired"]
    assert paired["low"] <= paired["mean"] <= paired["high"] and paired["verdict"]
    # the anchored head (the default): the model's own scores beside it, a weight per fold
    assert metrics["head"] == "anchored" and metrics["model_plain"]["n_true_edges"] == metrics["model"]["n_true_edges"]
    assert all(pick["weight"] in metrics["anchor_weights"] for pick in metrics["best_baseline"])
    printed = capsys.readouterr().out
    # candidate-first tokens (the default) can only add scoreable truth edges to the tokenizer's cut
    coverage = metrics["coverage"]
    assert coverage["tokens"] == "candidates" and coverage["scoreable_when"] == "each in some cell"
    assert coverage["truth_edges"] >= coverage["candidates"]["truth_edges"] >= coverage["tokenizer"]["truth_edges"] > 0
    assert "scoreable (each in some cell; scored with candidates tokens)" in printed
    assert "degree_prior" in printed and "chosen on each fold's training edges" in printed
    assert "anchor weight per fold" in printed and "anchored head: model − " in printed
    edges = pd.read_csv(tmp_path / "edges.tsv", sep="\t")
    assert list(edges.columns) == ["tf", "target", "score", "method", "group"]
    assert edges.score.is_monotonic_decreasing and set(edges.tf) <= set(bundled_tfs("human"))


def test_tree_baseline_finds_nonlinear_regulation():
    from celltron.finetune.grn.evaluate import tree_scores

    rng = np.random.default_rng(2)
    tf_levels = rng.normal(size=(500, 3))
    expression = rng.normal(size=(500, 20)) * 0.3
    for tf, target in zip(TRUTH.tf, TRUTH.target):
        expression[:, TARGETS.index(target)] += np.abs(tf_levels[:, TFS.index(tf)])  # no linear correlation
    matrix = np.concatenate([tf_levels, expression], axis=1)
    trees = evaluate_edges(tree_scores(matrix, TFS + TARGETS, TFS, TARGETS, n_jobs=1), TRUTH)
    linear = evaluate_edges(coexpression_scores(matrix, TFS + TARGETS, TFS, TARGETS, "pearson"), TRUTH)
    assert trees["auprc"] > 0.9 > linear["auprc"]


def test_attention_method_scores_pairs_the_cells_hold(pretrained_geneformer, tmp_path, capsys):
    data = shared_file("scrna/human/10x_pbmc4k_soupx_2170cells_raw.h5ad")
    code = main(
        [
            "grn",
            "--model",
            str(pretrained_geneformer),
            "--data",
            str(data),
            "--gene-column",
            "gene_symbol_original",
            "--method",
            "attention",
            "--out",
            str(tmp_path),
            "--max-cells",
            "40",
            "--top-genes",
            "200",
        ]
    )
    assert code == 0
    edges = pd.read_csv(tmp_path / "edges.tsv", sep="\t")
    assert set(edges.method) == {"attention"}
    seen = edges[edges.score >= 0]
    assert len(seen) > 100 and seen.score.max() <= 1  # attention probabilities; unseen pairs rank last at -1
    assert (edges.score[: len(seen)] >= 0).all()
    # pairs a cell holds together, out of all candidate pairs: more with the candidates put first
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("scoreable ("))
    (before, total), (after, _) = [map(int, part.split("pairs ")[1].split("/")) for part in line.split(": ", 1)[1].split("; ")]
    assert "a cell holds both" in line and before < after <= total and after == len(seen)


def test_in_silico_deletion_scores_embedding_shifts_and_reports_its_speed(pretrained_geneformer, tmp_path):
    data = shared_file("scrna/human/10x_pbmc4k_soupx_2170cells_raw.h5ad")
    truth = shared_file("grn/trrust_rawdata.human.tsv")
    code = main(
        [
            "grn",
            "--model",
            str(pretrained_geneformer),
            "--data",
            str(data),
            "--gene-column",
            "gene_symbol_original",
            "--method",
            "in-silico",
            "--head",
            "plain",
            "--truth",
            str(truth),
            "--out",
            str(tmp_path),
            "--max-cells",
            "20",
            "--top-genes",
            "150",
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "in-silico" and metrics["cells_x_tfs_per_second"] > 0
    # the plain head: the model's own scores as "model", no anchoring weight
    assert metrics["head"] == "plain" and metrics["model_plain"] is None and metrics["anchor_weights"] is None
    assert all("weight" not in pick for pick in metrics["best_baseline"])
    edges = pd.read_csv(tmp_path / "edges.tsv", sep="\t")
    seen = edges[edges.score >= 0]
    assert len(seen) > 50 and seen.score.max() <= 2  # 1 - cosine


def test_each_deletion_shift_equals_running_the_cell_without_that_tf(pretrained_geneformer):
    """The batched shifts equal, pair by pair, 1 - cosine between a target's embedding in the
    cell and in the cell run again on its own without the TF (positions after it move left)."""
    import torch

    from celltron.finetune.grn.run import _cell_batch, _deletion_shifts
    from celltron.model_zoo.registry import load_pretrained

    model = load_pretrained(pretrained_geneformer).eval()
    ids = np.array([2, 40, 41, 42, 43, 44, 45, 46])
    tf_at, target_at = [2, 5], np.array([1, 3, 5, 7])
    with torch.no_grad():
        hidden = model(**_cell_batch(ids, None, tf_at, model.config.pad_token_id), heads=False).last_hidden_state
        shift, real = _deletion_shifts(hidden, tf_at, target_at)
        for k, p in enumerate(tf_at):
            kept = torch.as_tensor(np.delete(ids, p))[None]
            alone = model(input_ids=kept, attention_mask=torch.ones_like(kept), heads=False).last_hidden_state[0]
            for j, q in enumerate(target_at):
                assert real[k, j] == (q != p)
                if q != p:
                    expected = 1 - torch.cosine_similarity(hidden[0, q], alone[q - int(q > p)], dim=0)
                    assert shift[k, j] == pytest.approx(float(expected), abs=1e-5)


def test_mouse_cells_use_the_mouse_tf_list_and_trrust_mouse(tmp_path):
    data = shared_file("scrna/mouse/dentategyrus_100obs.h5ad")
    truth = shared_file("grn/trrust_rawdata.mouse.tsv")
    assert main(["grn", "--data", str(data), "--truth", str(truth), "--out", str(tmp_path), "--top-genes", "300"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    edges = pd.read_csv(tmp_path / "edges.tsv", sep="\t")
    assert set(edges.tf) <= set(bundled_tfs("mouse")) and edges.tf.str.match(r"^[A-Z][a-z0-9]").all()  # mouse symbols
    assert metrics["baselines"]["coexpression_pearson"]["n_true_edges"] > 20

"""The gene-graph perturbation head on a simulated screen with a known answer: genes in
communities of the graph share a response, so a gene never perturbed in training should get
its community's response, and a combination the sum of its genes' responses."""

import json

import numpy as np
import pandas as pd
import pytest

from celltron.finetune.perturbation.evaluate import PerturbationData, evaluate
from celltron.finetune.perturbation.graph import GeneGraph, GraphSettings, build_gene_graph, graph_predictions

COMMUNITIES, SIZE, TRAINED = 6, 8, 5


def _community_screen(seed: int = 0):
    """48 measured genes in 6 graph communities (each gene linked to 3 of its community, plus 6
    edges across); perturbing a gene shifts expression by its community's response (noisy),
    a double by the sum of its genes' responses. Returns the data, the graph, and the train /
    unseen single / unseen double perturbations."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(COMMUNITIES * SIZE)]
    community = np.repeat(np.arange(COMMUNITIES), SIZE)
    edges = set()
    for c in range(COMMUNITIES):
        members = np.flatnonzero(community == c)
        for i in members:
            for j in rng.choice(members[members != i], 3, replace=False):
                edges.add((min(i, j), max(i, j)))
    crossing = 0
    while crossing < 6:
        i, j = sorted(rng.choice(len(genes), 2, replace=False))
        if community[i] != community[j] and (i, j) not in edges:
            edges.add((i, j))
            crossing += 1
    edges = np.asarray(sorted(edges))
    graph = GeneGraph(genes, edges, np.ones(len(edges)))
    response = rng.normal(0, 0.5, (COMMUNITIES, len(genes)))
    control = np.full(len(genes), 2.0)

    def change(*members):
        return sum(response[community[genes.index(g)]] * (1 + 0.1 * rng.normal()) for g in members)

    train, unseen, doubles = [], [], []
    for c in range(COMMUNITIES):
        members = [genes[i] for i in np.flatnonzero(community == c)]
        train += members[:TRAINED]
        unseen += members[TRAINED:]
    train += [f"{train[i]}+{train[i + SIZE]}" for i in range(0, 4)]  # a few trained doubles
    doubles = [f"{unseen[i]}+{unseen[i + 3]}" for i in range(0, len(unseen) - 3, 3)]
    means = {}
    for p in train + unseen + doubles:
        means[p] = control + change(*p.split("+")) + rng.normal(0, 0.02, len(genes))
    de = {p: np.argsort(-np.abs(means[p] - control))[:20] for p in means}
    data = PerturbationData(np.asarray(genes), sorted(means), control, means, de)
    return data, graph, train, unseen, doubles


SETTINGS = GraphSettings(dims=16, layers=2, steps=300, lr=0.01)


@pytest.fixture(scope="module")
def screen():
    return _community_screen()


def _score(data, graph, train, test):
    predicted = graph_predictions(data, graph, train, test, SETTINGS, seed=0)
    return evaluate(predicted.mean, data, test, train)["pearson_delta"], predicted.fell_back


def test_unseen_singles_take_their_graph_neighbours_response(screen):
    data, graph, train, unseen, _ = screen
    score, fell_back = _score(data, graph, train, unseen)
    assert fell_back == []
    assert score > 0.85
    # the training mean knows nothing of which community an unseen gene is in
    train_mean = np.mean([data.means[p] for p in train], axis=0)
    assert evaluate({p: train_mean for p in unseen}, data, unseen, train)["pearson_delta"] < 0.5


def test_the_graph_structure_not_its_size_carries_the_answer(screen):
    data, graph, train, unseen, _ = screen
    permuted, _ = _score(data, graph.permuted(seed=1), train, unseen)
    assert permuted < 0.5


def test_combinations_of_unseen_genes_add_their_communities(screen):
    data, graph, train, _, doubles = screen
    score, _ = _score(data, graph, train, doubles)
    assert score > 0.8


def test_a_gene_out_of_reach_falls_back_to_the_training_mean(screen):
    data, graph, train, unseen, _ = screen
    isolated = unseen[0]
    keep = np.all(graph.edges != graph.index[isolated], axis=1)
    cut = GeneGraph(graph.nodes, graph.edges[keep], graph.weights[keep])
    predicted = graph_predictions(data, cut, train, [isolated, unseen[1]], SETTINGS, seed=0)
    assert predicted.fell_back == [isolated]
    np.testing.assert_allclose(predicted.mean[isolated], np.mean([data.means[p] for p in train], axis=0))


def test_same_seed_same_predictions(screen):
    data, graph, train, unseen, _ = screen
    a = graph_predictions(data, graph, train, unseen[:2], SETTINGS, seed=3).mean
    b = graph_predictions(data, graph, train, unseen[:2], SETTINGS, seed=3).mean
    np.testing.assert_array_equal(a[unseen[0]], b[unseen[0]])


def test_graph_built_from_a_grn_control_cells_and_a_reference():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 1))
    # A and B move together in the control cells, C and D are noise
    expression = np.hstack([base, base + 0.1 * rng.normal(size=(200, 1)), rng.normal(size=(200, 2))])
    grn = pd.DataFrame({"tf": ["T", "T"], "target": ["A", "X"]})
    reference = {"U": np.array([1.0, 0.0]), "C": np.array([0.99, 0.05]), "D": np.array([0.0, 1.0])}
    graph = build_gene_graph(["A", "B", "C", "D"], ["U", "T"], grn, expression, reference, neighbours=1)
    assert set(graph.nodes) == {"A", "B", "C", "D", "U", "T", "X"}
    pairs = {frozenset((graph.nodes[i], graph.nodes[j])) for i, j in graph.edges}
    assert {frozenset("TA"), frozenset("TX"), frozenset("AB"), frozenset("UC")} <= pairs
    assert graph.sources["grn"] == 2
    # the unmeasured target U reaches the measured genes through the reference
    assert "C" in graph.within(["U"], 1)


def _finetune(*args) -> int:
    from celltron.cli import main

    return main(["finetune", "perturbation", *args, "--set", "logging.progress_bar=false"])


@pytest.fixture(scope="module")
def screen_with_grn(tmp_path_factory):
    """A simulated screen and a TF-target table linking its targets in a chain."""
    from tests.simulate import simulate_screen

    folder = tmp_path_factory.mktemp("graph_screen")
    screen = simulate_screen(n_genes=60, n_targets=8, n_combos=6, cells_per_perturbation=30, n_control=120, seed=3)
    screen.adata.write_h5ad(folder / "screen.h5ad")
    labels = screen.adata.obs["perturbation"].astype(str)
    targets = sorted({g for p in set(labels) - {"control"} for g in p.split("+")})
    (folder / "grn.tsv").write_text("".join(f"{a}\t{b}\tActivation\t1\n" for a, b in zip(targets, targets[1:])))
    return folder / "screen.h5ad", folder / "grn.tsv", len(targets) - 1


def test_the_graph_head_runs_without_a_model_anchored_on_the_best_baseline(screen_with_grn, tmp_path, capsys):
    import anndata as ad

    screen, grn, n_pairs = screen_with_grn
    out = tmp_path / "run"
    args = ("--baselines-only", "--data", str(screen), "--out", str(out), "--seeds", "0", "1", "--split", "simulation")
    assert _finetune(*args, "--graph-head", "--graph-grn", str(grn), "--set", "perturbation.graph_steps=50") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["graph"]["edges_by_source"]["grn"] == n_pairs and metrics["graph"]["control"] == "none"
    test = metrics["split"]["per_seed"]["0"]["test"]
    for name in ("graph_head", "graph_head_plain"):
        assert set(metrics[name]["per_perturbation"]["0"]) == set(test)
    chosen = metrics["best_baseline"]["chosen_per_seed"]["0"][0]
    assert chosen["graph_weight"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert metrics["paired_graph"]["all"]["n_units"] > 0
    predictions = ad.read_h5ad(out / "predictions.h5ad")
    assert {"graph", "graph_plain", "graph_interval_low", "graph_interval_high"} <= set(predictions.layers)
    # the default intervals: a 5-member ensemble, calibrated to 0.9 on the training perturbations
    uncertainty = metrics["graph_uncertainty"]
    assert uncertainty["method"] == "ensemble" and metrics["graph"]["ensemble_members"] == 5
    assert uncertainty["n_units"] == len(predictions) and 0 <= uncertainty["coverage"] <= 1
    assert uncertainty["ood"]["n_flagged"] == int(predictions.obs["ood_flagged"].sum())
    has_interval = ~np.isnan(predictions.layers["graph_interval_low"]).any(1)
    assert has_interval.sum() == uncertainty["n_with_interval"]
    assert (
        predictions.layers["graph_interval_low"][has_interval] <= predictions.layers["graph_interval_high"][has_interval]
    ).all()
    assert (out / "graph_ood_error.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "gene-graph head, plain" in printed and "gene-graph head − best baseline" in printed
    assert "gene-graph head's residual weight (inner CV)" in printed and "0.9 intervals (ensemble" in printed


def test_a_graph_head_at_weight_zero_is_the_best_baseline_and_a_permuted_graph_is_recorded(screen_with_grn, tmp_path):
    screen, grn, _ = screen_with_grn
    out = tmp_path / "run"
    args = ("--baselines-only", "--data", str(screen), "--out", str(out), "--seeds", "0", "--graph-head", "--graph-grn", str(grn))
    options = ("--graph-control", "permuted", "--intervals", "none", "--set", "perturbation.anchor_weights=[0]")
    assert _finetune(*args, *options) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["graph"]["control"] == "permuted" and metrics["graph_uncertainty"] is None
    headline = metrics["best_baseline"]["metric"]
    for p, values in metrics["graph_head"]["per_perturbation"]["0"].items():
        assert values[headline] == metrics["best_baseline"]["per_perturbation"]["0"][p][headline]


def test_graph_inputs_are_refused_clearly(screen_with_grn, tmp_path, capsys):
    screen, _, _ = screen_with_grn
    args = ("--baselines-only", "--data", str(screen), "--seeds", "0", "--graph-head")
    assert _finetune(*args, "--out", str(tmp_path / "a"), "--graph-features", "model") == 2
    assert "graph_features model" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert _finetune(*args, "--out", str(tmp_path / "b"), "--graph-features", "coexpression") == 2
    assert "coexpression_reference" in capsys.readouterr().err
    assert _finetune(*args, "--out", str(tmp_path / "c"), "--graph-grn", str(tmp_path / "missing.tsv")) == 2
    assert "--graph-grn" in capsys.readouterr().err


def test_the_models_gene_tokens_become_node_features(family_folders, screen_file):
    import types

    from celltron.finetune.perturbation.graph import node_features
    from celltron.finetune.perturbation.run import model_node_vectors
    from celltron.lab.data import load_model_tokenizer, read_lab_data

    lab = read_lab_data(screen_file, ["perturbation"])
    folder = family_folders["geneformer"]
    prepared = types.SimpleNamespace(folder=folder, tokenizer=load_model_tokenizer(folder, lab))
    genes = [str(g) for g in lab.gene_names[:5]] + ["NOT_A_GENE"]
    vectors = model_node_vectors(prepared, genes, lab)
    assert set(vectors) == set(genes[:5])
    graph = GeneGraph(genes, np.zeros((0, 2), dtype=np.int64), np.zeros(0))
    features = node_features(graph, vectors)
    assert features.shape == (6, len(vectors[genes[0]])) and not features[5].any()
    np.testing.assert_allclose(features[:5].mean(0), 0, atol=1e-5)


def _uncertainty(data, graph, fold, members=3, passes=0):
    from celltron.finetune.perturbation.baselines import inner_folds
    from celltron.finetune.perturbation.intervals import PerturbationUncertainty

    settings = GraphSettings(dims=16, layers=2, steps=150, lr=0.01, dropout=0.1 if passes else 0.0)
    section = uncertainty_section()
    inner = [
        (f, graph_predictions(data, graph, f["train"], f["test"], settings, 0, members=members, passes=passes))
        for f in inner_folds(fold["train"], 3, 0)
    ]
    outer = graph_predictions(data, graph, fold["train"], fold["test"], settings, 0, members=members, passes=passes)
    uncertainty = PerturbationUncertainty(section, data, lambda seed: graph)
    uncertainty.add_fold(0, fold, outer, inner)
    return uncertainty, outer, inner


@pytest.mark.parametrize("kind", ["ensemble", "mc_dropout"])
def test_intervals_are_calibrated_on_training_perturbations_alone(screen, kind):
    import dataclasses

    data, graph, train, unseen, _ = screen
    fold = {"train": [p for p in train if "+" not in p], "test": unseen}
    members, passes = (3, 0) if kind == "ensemble" else (1, 8)
    uncertainty, outer, inner = _uncertainty(data, graph, fold, members, passes)
    assert set(outer.spread) == set(unseen) and all((s >= 0).all() for s in outer.spread.values())
    summary = uncertainty.summary()
    assert summary["n_with_interval"] == len(unseen) and 0.5 < summary["coverage"] <= 1.0
    assert summary["ood"]["space"] == "graph" and summary["ood"]["n_units"] == len(unseen)
    low, high = uncertainty.bounds[0][unseen[0]]
    assert (low <= outer.mean[unseen[0]]).all() and (outer.mean[unseen[0]] <= high).all()
    # held-out truths moved far away: the scale (from the inner folds) is unchanged, the coverage is not
    moved = dataclasses.replace(data, means={p: v + (5.0 if p in unseen else 0.0) for p, v in data.means.items()})
    from celltron.finetune.perturbation.intervals import PerturbationUncertainty

    again = PerturbationUncertainty(uncertainty_section(), moved, lambda seed: graph)
    again.add_fold(0, fold, outer, inner)
    assert again.scales == uncertainty.scales
    assert again.summary()["coverage"] < 0.1


def test_the_best_baselines_intervals_are_calibrated_on_training_perturbations_alone(screen):
    """The baseline's interval: its prediction ± q x each gene's spread over the training
    perturbations, q from inner folds over them. Held-out truths moved far away change neither
    the spread nor q, only the coverage."""
    import dataclasses

    from celltron.finetune.perturbation.baselines import usable_inner_folds
    from celltron.finetune.perturbation.intervals import (
        BASELINE_METHOD,
        PerturbationUncertainty,
        baseline_inner_predictions,
        baseline_prediction,
        gene_scale,
    )

    data, _, train, unseen, _ = screen
    fold = {"train": [p for p in train if "+" not in p], "test": unseen}
    section = uncertainty_section()

    def run(data):
        uncertainty = PerturbationUncertainty(section, data, None, BASELINE_METHOD)
        outer = baseline_prediction(data, "train_mean", fold["train"], fold["test"])
        inner = baseline_inner_predictions(section, data, usable_inner_folds(fold["train"], 3, 0), 0)
        uncertainty.add_fold(0, fold, outer, inner)
        return uncertainty, outer

    uncertainty, outer = run(data)
    np.testing.assert_allclose(outer.spread[unseen[0]], np.std([data.means[p] for p in fold["train"]], axis=0))
    summary = uncertainty.summary()
    assert summary["n_with_interval"] == len(unseen) and 0.5 < summary["coverage"] <= 1.0
    assert summary["ood"]["space"] is None and summary["ood"]["n_flagged"] == 0  # nothing to measure OOD in
    moved = dataclasses.replace(data, means={p: v + (5.0 if p in unseen else 0.0) for p, v in data.means.items()})
    again, _ = run(moved)
    assert again.scales == uncertainty.scales
    np.testing.assert_array_equal(gene_scale(moved, fold["train"]), gene_scale(data, fold["train"]))
    assert again.summary()["coverage"] < 0.1


def uncertainty_section():
    import types

    return types.SimpleNamespace(
        intervals="ensemble", interval_level=0.9, ood_neighbours=3, headline="pearson_delta", inner_folds=3
    )

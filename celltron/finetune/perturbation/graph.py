"""A gene-graph perturbation head (GEARS-style, Roohani et al. 2023): perturbation embeddings
propagated over a gene graph, so a gene never perturbed in training borrows from the genes
it is linked to, and a combination is predicted from its genes' embeddings.

The graph's nodes are genes (symbols): the screen's measured genes, every target, and the
genes of a TF-target table. Its edges come from
- a TF-target table (TRRUST format), each pair an undirected edge of weight 1;
- co-expression in the screen's control cells: each measured gene's `neighbours` most
  correlated measured genes (weight |r|);
- co-expression in a reference (the run's `coexpression_reference` loadings), so targets the
  screen does not measure get neighbours too: each node's nearest nodes by cosine.

The head (GraphPerturbationHead): every node has a learned vector (plus, optionally, a
projection of fixed features: the model's gene-token embeddings or co-expression loadings);
`layers` residual graph convolutions over the normalised adjacency D^-1/2 (A + I) D^-1/2 mix
each node's vector with its neighbours'; a perturbation's embedding is the sum of its targets'
node states passed through a residual combination MLP; a per-gene linear decoder turns it into
the change of every measured gene from control, starting from the training perturbations' mean
change (an untrained head predicts the training mean). It trains on the training
perturbations' pseudobulk changes alone, full batch, with the settings fixed in the config
(nothing is chosen on held-out perturbations).

A held-out perturbation is predicted only when every target lies within `layers` hops of a
training target (otherwise nothing trained reaches it); the others are predicted as the
training mean and listed (`fell_back_to_train_mean`), as the linear baseline does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from celltron.errors import InputError


@dataclass
class GraphSettings:
    """The head's fixed settings (perturbation.graph_* in the config)."""

    dims: int = 32
    layers: int = 2
    steps: int = 300
    lr: float = 0.01
    weight_decay: float = 1e-4
    de_weight: float = 1.0
    dropout: float = 0.0  # on the graph convolutions and the combination MLP (MC dropout keeps it on)


@dataclass
class GeneGraph:
    """Undirected weighted gene graph: `nodes` (gene symbols), `edges` (E x 2 node indices,
    each pair once with i < j), `weights` (E,), and the number of edges each source gave."""

    nodes: list[str]
    edges: np.ndarray
    weights: np.ndarray
    sources: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.index = {g: i for i, g in enumerate(self.nodes)}

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    def degree(self, gene: str) -> int:
        i = self.index.get(gene)
        return 0 if i is None else int(np.sum(self.edges == i))

    def within(self, genes, hops: int) -> set[str]:
        """The nodes at most `hops` edges from any of `genes`."""
        reached = {self.index[g] for g in genes if g in self.index}
        frontier = set(reached)
        neighbours = self._neighbour_lists()
        for _ in range(hops):
            frontier = {j for i in frontier for j in neighbours[i]} - reached
            reached |= frontier
        return {self.nodes[i] for i in reached}

    def _neighbour_lists(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.nodes]
        for i, j in self.edges:
            out[i].append(int(j))
            out[j].append(int(i))
        return out

    def permuted(self, seed: int) -> GeneGraph:
        """The same graph with its node labels shuffled (seeded): as many edges and the same
        degrees, linking the wrong genes. The control for whether the graph's structure helps."""
        order = np.random.default_rng(seed).permutation(len(self.nodes))
        return GeneGraph([self.nodes[i] for i in order], self.edges, self.weights, dict(self.sources))

    def adjacency(self):
        """D^-1/2 (A + I) D^-1/2 as a torch sparse (COO) matrix."""
        import torch

        n = len(self.nodes)
        rows = np.concatenate([self.edges[:, 0], self.edges[:, 1], np.arange(n)])
        cols = np.concatenate([self.edges[:, 1], self.edges[:, 0], np.arange(n)])
        values = np.concatenate([self.weights, self.weights, np.ones(n)])
        degree = np.bincount(rows, weights=values, minlength=n)
        scale = 1.0 / np.sqrt(degree)
        values = values * scale[rows] * scale[cols]
        index = torch.as_tensor(np.stack([rows, cols]), dtype=torch.long)
        return torch.sparse_coo_tensor(
            index, torch.as_tensor(values, dtype=torch.float32), (n, n), check_invariants=True
        ).coalesce()

    def summary(self) -> dict:
        return {"nodes": len(self.nodes), "edges": self.n_edges, "edges_by_source": dict(self.sources)}


def build_gene_graph(
    measured: list[str],
    targets: list[str],
    grn=None,
    control_expression: np.ndarray | None = None,
    reference: dict[str, np.ndarray] | None = None,
    neighbours: int = 10,
) -> GeneGraph:
    """The graph over `measured` genes, `targets` and the genes of `grn` (a DataFrame of tf,
    target pairs, e.g. celltron.inputs.read_truth), with edges from the GRN, from co-expression
    of the measured genes in `control_expression` (cells x measured genes, log-normalised) and
    from co-expression in `reference` ({gene: loadings}); see the module docstring."""
    nodes = list(dict.fromkeys([*map(str, measured), *map(str, targets)]))
    if grn is not None:
        nodes = list(dict.fromkeys([*nodes, *grn["tf"].astype(str), *grn["target"].astype(str)]))
    index = {g: i for i, g in enumerate(nodes)}
    found: dict[tuple[int, int], float] = {}
    sources = {}
    if grn is not None:
        pairs = [(index[a], index[b], 1.0) for a, b in zip(grn["tf"].astype(str), grn["target"].astype(str)) if a != b]
        sources["grn"] = _add_edges(found, pairs)
    if control_expression is not None and neighbours and len(measured) > 1:
        columns = [index[str(g)] for g in measured]
        sources["control_coexpression"] = _add_edges(
            found, _cosine_knn_edges(_standardised_genes(control_expression), columns, neighbours)
        )
    if reference and neighbours:
        covered = [g for g in nodes if g in reference]
        if len(covered) > 1:
            vectors = np.stack([reference[g] for g in covered]).astype(np.float64)
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            edges = _cosine_knn_edges(vectors, [index[g] for g in covered], neighbours)
            sources["reference_coexpression"] = _add_edges(found, edges)
    keys = sorted(found)
    edges = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
    weights = np.asarray([found[k] for k in keys], dtype=np.float64)
    return GeneGraph(nodes, edges, weights, sources)


def _add_edges(found: dict, triples) -> int:
    """Add undirected edges (i, j, weight), keeping the larger weight of a pair met twice;
    returns how many pairs were new."""
    added = 0
    for i, j, w in triples:
        key = (min(i, j), max(i, j))
        if key[0] == key[1]:
            continue
        added += key not in found
        found[key] = max(found.get(key, 0.0), float(w))
    return added


def _standardised_genes(expression: np.ndarray) -> np.ndarray:
    """(genes, cells) rows centred and scaled to unit norm: their cosine is the genes' Pearson r
    (a constant gene: a zero row, r = 0 with every other)."""
    x = np.asarray(expression, dtype=np.float64).T
    x = x - x.mean(1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _cosine_knn_edges(unit_vectors: np.ndarray, columns: list[int], k: int, block: int = 1024):
    """Each row's k most similar other rows by |cosine| between unit rows (similarity > 0), as
    (node, node, weight) triples, `columns` mapping rows to node indices; a block of rows at a
    time (the full matrix of tens of thousands of genes would not fit)."""
    k = min(k, len(columns) - 1)
    if k <= 0:
        return []
    out = []
    for start in range(0, len(unit_vectors), block):
        similarity = np.abs(unit_vectors[start : start + block] @ unit_vectors.T)
        rows = np.arange(start, start + len(similarity))
        similarity[rows - start, rows] = -np.inf
        best = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        out += [
            (columns[r], columns[c], similarity[r - start, c])
            for r, cs in zip(rows, best)
            for c in cs
            if similarity[r - start, c] > 0
        ]
    return out


def node_features(graph: GeneGraph, vectors: dict[str, np.ndarray] | None) -> np.ndarray | None:
    """Fixed node features from {gene: vector}: each column standardised over the covered nodes,
    uncovered nodes 0 (they keep their learned vector alone)."""
    if vectors is None:
        return None
    covered = [g for g in graph.nodes if g in vectors]
    if not covered:
        raise InputError("perturbation.graph_features: no graph gene has a feature vector (check the species and gene names)")
    width = len(vectors[covered[0]])
    features = np.zeros((len(graph.nodes), width), dtype=np.float32)
    rows = [graph.index[g] for g in covered]
    values = np.stack([vectors[g] for g in covered]).astype(np.float64)
    spread = values.std(0)
    features[rows] = (values - values.mean(0)) / np.where(spread > 0, spread, 1.0)
    return features


def _head_class():
    import torch
    from torch import nn

    class GraphPerturbationHead(nn.Module):
        """See the module docstring. `outputs`: node index of each measured gene (the decoder's
        rows follow the measured genes, not the nodes); `start`: the training mean change."""

        def __init__(self, adjacency, n_nodes: int, n_genes: int, start: np.ndarray, settings: GraphSettings, features=None):
            super().__init__()
            d = settings.dims
            self.register_buffer("adjacency", adjacency, persistent=False)
            self.embedding = nn.Parameter(torch.randn(n_nodes, d) * 0.1)
            self.features = None if features is None else torch.as_tensor(features)
            self.project = None if features is None else nn.Linear(features.shape[1], d, bias=False)
            self.convolutions = nn.ModuleList(nn.Linear(d, d) for _ in range(settings.layers))
            self.dropout = nn.Dropout(settings.dropout)
            self.combine = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(settings.dropout), nn.Linear(d, d))
            self.decoder = nn.Parameter(torch.randn(n_genes, d) * 0.01)
            self.bias = nn.Parameter(torch.as_tensor(start, dtype=torch.float32).clone())

        def node_states(self):
            h = self.embedding if self.project is None else self.embedding + self.project(self.features)
            for convolution in self.convolutions:
                h = h + self.dropout(torch.tanh(convolution(torch.sparse.mm(self.adjacency, h))))
            return h

        def forward(self, members):
            """members: (perturbations x nodes) 0/1 matrix of each perturbation's targets ->
            (perturbations x measured genes) predicted change from control."""
            u = members @ self.node_states()
            z = u + self.combine(u)
            return z @ self.decoder.T + self.bias

    return GraphPerturbationHead


def _members(graph: GeneGraph, data, perturbations: list[str]):
    import torch

    m = torch.zeros(len(perturbations), len(graph.nodes))
    for row, p in enumerate(perturbations):
        for gene in data.targets(p):
            m[row, graph.index[gene]] = 1.0
    return m


def reachable(graph: GeneGraph, data, train: list[str], test: list[str], hops: int) -> list[str]:
    """The test perturbations whose every target is a node within `hops` of a training target."""
    near = graph.within({g for p in train for g in data.targets(p)}, hops)
    return [p for p in test if all(g in near for g in data.targets(p))]


def fit_graph_head(data, graph: GeneGraph, train: list[str], settings: GraphSettings, seed: int, features=None):
    """The head trained on `train`'s pseudobulk changes from control (full batch, Adam, seeded),
    the loss weighted 1 + de_weight on each perturbation's DE genes."""
    import torch

    missing = sorted({g for p in train for g in data.targets(p)} - set(graph.index))
    if missing:
        raise ValueError(f"training targets missing from the gene graph: {missing}")
    torch.manual_seed(seed)
    changes = torch.as_tensor(np.stack([data.means[p] - data.control_mean for p in train]), dtype=torch.float32)
    weights = torch.ones_like(changes)
    for row, p in enumerate(train):
        weights[row, data.de_genes[p]] += settings.de_weight
    head = _head_class()(graph.adjacency(), len(graph.nodes), changes.shape[1], changes.mean(0).numpy(), settings, features)
    members = _members(graph, data, train)
    optimiser = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    head.train()
    for _ in range(settings.steps):
        optimiser.zero_grad()
        loss = (weights * (head(members) - changes) ** 2).mean()
        loss.backward()
        optimiser.step()
    return head.eval()


@dataclass
class GraphPrediction:
    """The head's predictions of held-out perturbations (control mean + predicted change; the
    training mean for those out of reach, listed in `fell_back`), with, from an ensemble or MC
    dropout, each output's spread over members or passes (None from a single model), and the
    first model's node states (an embedding space for OOD scores)."""

    mean: dict[str, np.ndarray]
    fell_back: list[str]
    spread: dict[str, np.ndarray] | None = None
    node_states: np.ndarray | None = None


def graph_predictions(
    data,
    graph: GeneGraph,
    train: list[str],
    test: list[str],
    settings: GraphSettings,
    seed: int,
    features=None,
    members: int = 1,
    passes: int = 0,
) -> GraphPrediction:
    """The head fitted on `train`, predicting `test` (see GraphPrediction). `members` > 1: a deep
    ensemble, each member trained from its own seed, the prediction their mean; `passes` > 0:
    MC dropout, one model (trained with settings.dropout) predicting `passes` times with dropout
    on. Perturbations out of the graph's reach (see `reachable`) get the training mean and no
    spread."""
    import torch

    train_mean = np.mean([data.means[p] for p in train], axis=0)
    predicted = reachable(graph, data, train, test, settings.layers)
    out = GraphPrediction({p: train_mean for p in test}, [p for p in test if p not in predicted])
    if not predicted:
        return out
    members_seeds = [seed] if passes else [seed + 1000 * m for m in range(max(members, 1))]
    heads = [fit_graph_head(data, graph, train, settings, s, features) for s in members_seeds]
    targets = _members(graph, data, predicted)
    with torch.no_grad():
        out.node_states = heads[0].node_states().numpy()
        if passes:
            heads[0].train()  # dropout on, as in training
            torch.manual_seed(seed)
            draws = np.stack([heads[0](targets).numpy() for _ in range(passes)])
        else:
            draws = np.stack([head(targets).numpy() for head in heads])
    changes = draws.mean(0)
    out.mean.update({p: data.control_mean + change for p, change in zip(predicted, changes)})
    if len(draws) > 1:
        spread = draws.std(0, ddof=1)
        out.spread = dict(zip(predicted, spread))
    return out

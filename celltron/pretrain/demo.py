"""The README's main job: build the bundled PBMC 3k corpus, pretrain the debug Geneformer on it,
export the model, draw the loss curve, and compare masked-gene accuracy with a baseline."""

from __future__ import annotations

from pathlib import Path

from celltron.corpus.demo import build_demo_corpus, stream_one_epoch
from celltron.model_zoo import FAMILIES
from celltron.pretrain.config import load_config, replace
from celltron.pretrain.data import PretrainDataModule, corpus_tokenizer
from celltron.pretrain.evaluate import masked_accuracy, most_frequent_token
from celltron.pretrain.run import pretrain


def run_demo(out, config_path, max_steps: int | None = None, progress: bool = True) -> dict:
    out = Path(out)
    corpus = build_demo_corpus(out / "corpus", progress=progress)
    cells, seconds = stream_one_epoch(corpus)
    print(f"corpus: {corpus.location} ({corpus.manifest['n_cells']} cells); one epoch streamed at {cells / seconds:,.0f} cells/s")
    config = load_config(config_path)
    changes = {"data": {"corpus": str(corpus.location)}, "logging": {"progress_bar": progress}}
    if max_steps:
        changes["trainer"] = {"max_steps": max_steps}
    config = replace(config, **changes)
    result = pretrain(config, out / "pretrain", resume="auto")
    tokenizer = corpus_tokenizer(corpus, config.tokenizer.scheme, config.tokenizer.max_len, config.trainer.seed)
    data = PretrainDataModule(corpus, config.model.family, tokenizer, config.data, config.trainer.seed)

    model = FAMILIES[config.model.family].model_class.from_pretrained(result.export)
    scores = masked_accuracy(model, data, most_frequent_token(data))
    print(f"\npretrained {result.steps} steps of {config.model.family} ({config.model.size}) on CPU")
    print(
        f"  masked-gene accuracy on the validation split: {scores['accuracy']:.2%} "
        f"(always guessing the most frequent gene: {scores['baseline_accuracy']:.2%}; {scores['masked_tokens']} masked genes)"
    )
    print(f"  metrics:    {result.out / 'metrics.csv'}")
    print(f"  loss curve: {result.loss_curve}")
    print(f"  checkpoint: {result.checkpoint}")
    print(f"  model:      {result.export}   (import celltron; transformers.AutoModelForMaskedLM.from_pretrained(...))")
    return {"result": result, **scores}

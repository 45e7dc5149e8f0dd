"""`celltron <verb>`: parses arguments and calls library functions, nothing more."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from celltron.config import Option, add_options, apply_overrides, from_dict, given_values, replace
from celltron.corpus.constants import MIN_MAPPED_FRACTION
from celltron.corpus.options import BuildOptions
from celltron.errors import ConfigError, UserError
from celltron.finetune.config import CROSSMODAL_TASKS, FinetuneConfig, load_finetune_config
from celltron.lab.options import EmbedOptions, max_len_flag
from celltron.launch.cluster import ClusterSpec, load_cluster
from celltron.pretrain.config import PretrainConfig, load_config
from celltron.ranges import devices, name_weight, number
from celltron.tokenizers.schemes import SCHEMES

# celltron's own classes only (MissingInputError and OutputExistsError are UserErrors): any other exception is a bug and
# keeps its traceback
USER_ERRORS = (UserError,)

# exit codes: a scheduler tells a finished run (0) from one a signal stopped early (75, EX_TEMPFAIL:
# "try again", i.e. --resume auto). trainer.stop_at_step is a stop the config asked for (fixed-length
# jobs), so it exits 0; whether the whole run finished is told by its export/ folder.
EXIT_USER_ERROR, EXIT_STOPPED, EXIT_INTERRUPTED = 2, 75, 130
OVERWRITE_HELP = (
    "replace an existing {what} that celltron did not write (one it wrote holds a .celltron-folder marker and "
    "is replaced without this flag); never the current directory, the source or its run directory"
)
EXIT_CODES = """exit codes:
  0    done (pretrain / finetune: also a run that ended at trainer.stop_at_step, as its config asked;
       the run is complete once RUN/export/ exists)
  1    corpus validate found invalid shards; or an unexpected error (with its traceback)
  2    a user error, printed in one line naming the file or option and the fix
  75   pretrain / finetune stopped early by SIGTERM or SIGUSR1 after saving a checkpoint; continue with --resume auto
  130  interrupted with Ctrl-C; nothing half-written was left"""


MAPPED_HELP = (
    "refuse an input unless this share of its counts is on genes that map to Ensembl IDs (and, where "
    "cells are tokenised, have a token in the vocabulary); default %(default)s"
)


# The options that set config fields: type, range, choices and help come from the typed configs
# (celltron.config), so a flag cannot disagree with the field it sets.
BUILD_OPTIONS = [
    Option("species", help="human or mouse for every input (default: inferred per input)"),
    Option("layer"),
    Option("gene_column"),
    Option("min_mapped_fraction", metavar="SHARE"),
    Option("obs_keys"),
    Option("min_genes"),
    Option("min_counts"),
    Option("max_mito_fraction"),
    Option("seed"),
    Option("val_fraction"),
    Option("shard_size_mb"),
    Option("chunk_nnz"),
    Option("compression"),
    Option("genome", help="genome build of ATAC peaks (hg38, mm10, GRCh38, ...) when the inputs do not say"),
    Option("atac_bin_size", metavar="BASES"),
    Option("mosaic"),
]
DEVICES = Option("trainer.devices", type=devices, help="devices per node (a number or 'auto')")
PRECISION = Option("trainer.precision", help="as Lightning's Trainer: 32, bf16-mixed (GPUs), fp16-mixed, 32-true")
PRETRAIN_OPTIONS = [
    Option("data.corpus", flag="--corpus"),
    Option("trainer.max_steps"),
    DEVICES,
    Option("trainer.num_nodes", help="nodes of the run (each runs --devices processes)"),
    Option("trainer.strategy", help="ddp, fsdp (wrapping each Transformer layer) or DeepSpeed ZeRO 1-3 (GPUs)"),
    PRECISION,
]
ADAPT_OPTIONS = [  # one or the other
    Option("model.freeze_layers", flag="--freeze", metavar="N_LAYERS"),
    Option("model.lora_rank", flag="--lora", metavar="RANK"),
]
# `celltron finetune TASK` -> the config section of its options
TASK_SECTIONS = {"perturbation": "perturbation", "drug-response": "drug", "annotate": "annotate", "cross-modal": "crossmodal"}
TASKS = tuple(TASK_SECTIONS.values())
FINETUNE_STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed_stage_1", "deepspeed_stage_2")
FINETUNE_OPTIONS = [
    Option("data.path", flag="--data", help="the lab's data: .h5ad of raw counts (drug-response ic50: the GDSC IC50 CSV)"),
    Option("data.layer"),
    Option("data.gene_column"),
    Option("data.species"),
    Option("data.min_mapped_fraction", metavar="SHARE"),
    Option("trainer.max_steps"),
    DEVICES,
    # the fine-tuning loop evaluates the whole model in one process: ZeRO-3's sharded weights cannot
    Option("trainer.strategy", choices=FINETUNE_STRATEGIES, help="ddp, fsdp or DeepSpeed ZeRO 1-2 (GPUs)"),
    PRECISION,
    Option("perturbation.perturbation_key"),
    Option(
        "{task}.control",
        sections=("perturbation", "drug"),
        help="label of control cells (perturbation: in --perturbation-key; drug-response expression: in the drug column)",
    ),
    Option("{task}.label_key", sections=("annotate", "crossmodal")),
    Option(
        "{task}.encoder",
        sections=("perturbation", "annotate"),
        help="tuned (trains with the head) or frozen (the encoder's views computed once, the head alone trains)",
    ),
    Option(
        "{task}.head",
        sections=("perturbation", "drug", "annotate", "crossmodal"),
        help="anchored (best baseline + weighted model residual, weight by inner CV) or plain (the model alone)",
    ),
    Option("perturbation.headline", metavar="METRIC"),
    Option("perturbation.coexpression_reference", metavar="H5AD"),
    Option("perturbation.responsive_min_de", metavar="N"),
    Option("perturbation.graph_head"),
    Option("perturbation.graph_grn", metavar="TSV"),
    Option("perturbation.graph_features"),
    Option("perturbation.graph_control"),
    Option(
        "{task}.intervals",
        sections=("perturbation", "drug", "annotate"),
        help="the model's predictive intervals: ensemble (members from different seeds), mc_dropout or none "
        "(perturbation: the gene-graph head's, and none also switches off the best baseline's and the model head's; "
        "drug-response ic50: the drug model's; annotate: the model's probabilities averaged over the passes or "
        "members, with their disagreement per cell)",
    ),
    Option("{task}.interval_level", sections=TASKS, metavar="LEVEL"),
    Option(
        "{task}.split",
        sections=("perturbation", "drug", "crossmodal"),
        help="perturbation: heldout | simulation | leave_one_out; drug-response ic50: random | cell_line | drug, "
        "expression: heldout_combination | heldout_drug; cross-modal: random | batch",
    ),
    Option("{task}.test_fraction", sections=TASKS, help="share of the task's units held out (perturbations, pairs, cells)"),
    Option("{task}.seeds", sections=TASKS, help="one split and one run per seed; metrics aggregate over them"),
    Option("drug.mode"),
    Option("drug.drug_list"),
    Option("drug.smiles"),
    Option("drug.expression"),
    Option("drug.cell_line_key"),
    Option("drug.drug_key"),
    Option("drug.dose_key"),
    Option("drug.cell_type_key"),
    Option("drug.target_grn", metavar="TSV"),
    Option("drug.target_table", metavar="FILE"),
    Option("crossmodal.source"),
    Option("crossmodal.target"),
    Option("crossmodal.batch_key"),
    Option("crossmodal.query"),
    Option("crossmodal.umap"),
    Option("crossmodal.train_only", metavar="CELLS.txt"),
    Option(
        "crossmodal.peers",
        choices=("totalvi", "multivi"),
        help="scvi-tools peers on the same splits (needs celltron[scvi]): totalvi (predict), multivi (align, chromatin)",
    ),
    Option("crossmodal.peer_epochs"),
]
EMBED_OPTIONS = [
    Option("key", help="obsm (and varm) key the embeddings are written under"),
    Option("pool"),
    Option("layer"),
    Option("layers", metavar="LAYER"),
    Option("max_len", type=max_len_flag, metavar="N|all"),
    Option("batch_size"),
    Option("block_cells"),
    Option("gene_embeddings"),
    Option("devices"),
    Option("device"),
    Option("precision"),
    Option("input_layer"),
    Option("gene_column"),
    Option("species"),
    Option("min_mapped_fraction", metavar="SHARE"),
    Option("seed"),
    Option("progress"),
]
CLUSTER_OPTIONS = [
    *(Option(name) for name in ("backend", "nodes", "gpus_per_node", "port", "job_name")),
    *(Option(name, help=f"SLURM {name}") for name in ("partition", "account", "qos")),
    Option("time", help="SLURM time limit, HH:MM:SS (or D-HH:MM:SS)"),
]


def _key_values(pairs: list[str], what: str) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"{what} expects KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def _corpus_build(args) -> int:
    given = given_values(args, BUILD_OPTIONS)
    if args.weight:
        given["weights"] = dict(args.weight)
    # flags given on the command line override the config file, which overrides the defaults
    base = BuildOptions.from_yaml(args.config) if args.config else BuildOptions()
    options = dataclasses.replace(base, progress=not args.no_progress, **given)
    modalities = _key_values(args.modality, "--modality")
    if modalities or _multimodal_inputs(args.inputs):
        return _corpus_build_multimodal(args, options, modalities)
    from celltron.corpus.build import build_corpus

    manifest = build_corpus(args.inputs, args.out, options, overwrite=args.overwrite)
    print(f"built {args.out}: {manifest['n_cells']} cells, {len(manifest['genes']['ensembl_id'])} genes")
    _print_sources(manifest)
    return 0


def _multimodal_inputs(inputs: list[str]) -> bool:
    """Whether the inputs hold several modalities: a MuData .h5mu, or a 10x .h5 with features
    beyond gene expression (RNA + proteins from feature barcoding, RNA + peaks from Multiome)."""
    from celltron.corpus.readers import tenx_feature_types

    return any(
        p.endswith(".h5mu") or (p.endswith(".h5") and Path(p).is_file() and len(tenx_feature_types(Path(p))) > 1) for p in inputs
    )


def _corpus_build_multimodal(args, options, modalities: dict[str, str]) -> int:
    from celltron.corpus.build_multimodal import build_multimodal_corpus

    manifest = build_multimodal_corpus(args.inputs, args.out, options, overwrite=args.overwrite, modalities=modalities)
    parts = ", ".join(
        f"{m} {r['n_features']} {'genes' if m == 'rna' else 'antigens' if m == 'adt' else 'bins'} ({r['n_cells_measured']} cells)"
        for m, r in manifest["modalities"].items()
    )
    print(f"built {args.out}: {manifest['n_cells']} cells; {parts}")
    _print_sources(manifest)
    for source in manifest["sources"]:
        unknown = source.get("adt", {}).get("unknown")
        if unknown:
            print(
                f"  {source['path']}: {len(unknown)} protein names not in the antigen table, kept as given: {', '.join(unknown)}"
            )
    if "atac" in manifest["modalities"]:
        atac = manifest["modalities"]["atac"]
        print(f"  atac: genome {atac['genome']}, bins of {manifest['build']['atac_bin_size']} bases")
    return 0


def _print_sources(manifest: dict) -> None:
    for source in manifest["sources"]:
        print(
            f"  {source['path']}: {source['n_cells_kept']}/{source['n_cells_in']} cells kept "
            f"({source['n_empty_dropped']} empty, {source['n_qc_dropped']} failed QC); "
            f"{source['n_genes_unmapped']} genes unmapped holding {source['unmapped_counts']} counts"
        )


def _open(args):
    from celltron.corpus.store import Corpus

    return Corpus(args.corpus, _key_values(args.storage_option, "--storage-option"))


def _corpus_info(args) -> int:
    summary = _open(args).summary()
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"corpus {summary['location']} (schema v{summary['schema_version']}, built {summary['created']})")
    print(
        f"  cells: {summary['n_cells']}  "
        + "  ".join(f"{k}: {v['n_cells']} in {v['n_shards']} shards" for k, v in summary["splits"].items())
    )
    print(
        f"  genes: {summary['n_genes']} " + str(summary["genes_per_species"]) + f"; medians: {summary['gene_median']['method']}"
    )
    print(f"  obs columns: {summary['obs_columns']}")
    for modality, about in summary.get("modalities", {}).items():
        extra = f", genome {about['genome']}" if "genome" in about else ""
        print(f"  modality {modality}: {about['n_features']} features, measured in {about['n_cells_measured']} cells{extra}")
    for source in summary["sources"]:
        print(
            f"  source {source['path']} ({source['species']}): {source['n_cells_kept']}/{source['n_cells_in']} cells, weight {source['weight']}"
        )
    return 0


def _corpus_validate(args) -> int:
    corpus = _open(args)
    if args.rekey:  # validates first, and refuses a corpus with any other problem
        print(f"{args.corpus}: valid; re-recorded the checksums of {corpus.rekey_checksums()} shard(s)")
        return 0
    problems = corpus.validate()
    for problem in problems:
        print(f"invalid shard {problem}", file=sys.stderr)
    if not problems:
        print(f"{args.corpus}: valid")
    return 1 if problems else 0


def _priors_build(args) -> int:
    from celltron.pretrain.priors import build_priors

    tables = _key_values(args.table, "--table")
    manifest = build_priors(
        args.out,
        args.corpus,
        args.scheme,
        grn=args.grn,
        grn_species=args.grn_species,
        coexpression=args.coexpression,
        tables=tables,
        dims=args.dims,
        max_cells=args.max_cells,
        max_len=args.max_len,
        overwrite=args.overwrite,
        storage_options=_key_values(args.storage_option, "--storage-option"),
    )
    vocab = manifest["vocab"]
    print(f"priors for {vocab['name']} ({vocab['size']} tokens) in {args.out}:")
    for name, record in manifest["priors"].items():
        print(f"  {name}: {record['file']} {tuple(record['shape'])}, {record['tokens_with_prior']} tokens with a prior")
    named = ", ".join(f"{name}: {Path(args.out) / record['file']}" for name, record in manifest["priors"].items())
    print(f"use them in a genecompass pretraining config: model.priors: {{{named}}}")
    return 0


def _tokenize(args) -> int:
    from celltron.tokenizers.dataset import tokenize_to_dataset

    if args.coverage:
        _print_coverage(args)
    if args.hvg is None and (args.hvg_flavor or args.hvg_batch_key):
        raise ConfigError("--hvg-flavor and --hvg-batch-key go with --hvg N")
    if args.out is None:
        if not args.coverage:
            raise ConfigError("--out is required (or pass --coverage to only report shared-token coverage)")
        return 0
    summary = tokenize_to_dataset(
        args.input,
        args.scheme,
        args.out,
        obs_keys=tuple(args.obs_keys or ()),
        split=args.split,
        max_len=args.max_len,
        seed=args.seed,
        layer=args.layer,
        gene_column=args.gene_column,
        species=args.species,
        storage_options=_key_values(args.storage_option, "--storage-option"),
        progress=not args.no_progress,
        hvg=args.hvg,
        hvg_flavor=args.hvg_flavor or "seurat_v3",
        hvg_batch_key=args.hvg_batch_key,
        hvg_span=args.hvg_span,
        min_mapped_fraction=args.min_mapped_fraction,
        threads=args.threads,
    )
    print(
        f"tokenized {summary['cells']} cells ({summary['tokens']} tokens) into {args.out} "
        f"in {summary['seconds']:.2f} s = {summary['cells_per_second']:,.0f} cells/s on {summary['threads']} thread(s)"
    )
    return 0


def _print_coverage(args) -> None:
    from celltron.corpus.store import Corpus
    from celltron.tokenizers.ortholog import coverage, group_by_species, ortholog_vocab

    if args.scheme != "ortholog":
        raise ConfigError("--coverage reports shared cross-species tokens: use it with --scheme ortholog")
    corpus = Corpus(args.input, _key_values(args.storage_option, "--storage-option"))
    genes = corpus.manifest["genes"]
    vocab = ortholog_vocab(group_by_species(genes["ensembl_id"], genes["species"]))
    report = coverage(genes["ensembl_id"], genes["species"], genes["count_sum"], vocab)
    for species, row in report.items():
        print(
            f"{species}: {row['genes']} genes, {row['genes_shared']:.1%} on shared tokens "
            f"holding {row['counts_shared']:.1%} of counts"
        )


def _demo(args) -> int:
    from celltron.pretrain.demo import run_demo

    run_demo(args.out, args.config, args.max_steps, progress=not args.no_progress)
    return 0


def _models(args) -> int:
    from celltron.model_zoo import list_models

    rows = list_models()
    print(f"{'family':<12}{'size':<13}{'layers':>7}{'hidden':>8}{'heads':>7}{'ffn':>7}{'vocab':>8}{'parameters':>15}")
    for row in rows:
        print(
            f"{row['family']:<12}{row['size']:<13}{row['layers']:>7}{row['hidden']:>8}{row['heads']:>7}"
            f"{row['intermediate']:>7}{row['vocab']:>8}{row['parameters']:>15,}"
        )
    print("parameters counted with the vocabulary shown; genecompass vocabularies are built per corpus (50,000 assumed)")
    return 0


def _convert(args) -> int:
    from celltron.model_zoo.registry import convert

    out = convert(args.family, args.source, args.out, overwrite=args.overwrite, dictionary=args.dictionary)
    print(f"converted {args.family} checkpoint {args.source} -> {out}")
    return 0


def _pretrain_config(args):

    config = load_config(args.config, args.set)
    return replace(config, "flags", **given_values(args, PRETRAIN_OPTIONS))


def _pretrain(args) -> int:
    from celltron.pretrain.run import pretrain

    result = pretrain(_pretrain_config(args), args.out, resume=args.resume, init_from=args.init_from)
    code = EXIT_STOPPED if result.stopped_by == "signal" else 0  # every rank: srun and torchrun see one answer
    if not result.is_global_zero:
        return code
    if result.interrupted:
        why = "by a signal" if result.stopped_by == "signal" else "(trainer.stop_at_step)"
        print(f"stopped at step {result.steps} {why}; checkpoint {result.checkpoint}; continue with --resume auto")
        return code
    print(f"pretrained {result.steps} steps; run directory {result.out}")
    print(f"  metrics:    {result.out / 'metrics.csv'}")
    print(f"  loss curve: {result.loss_curve}")
    print(f"  checkpoint: {result.checkpoint}")
    print(f"  model:      {result.export}  (transformers.AutoModel.from_pretrained after `import celltron`)")
    return 0


def _finetune_config(args):

    _check_cross_task(args)
    default = Path(f"configs/finetune/{args.task.replace('-', '_')}.yaml")
    if args.config or default.exists():
        config = load_finetune_config(args.config or default, args.set)
    else:  # outside the repository: the typed defaults
        config = from_dict(FinetuneConfig, apply_overrides({}, args.set), "defaults")
    given = given_values(args, [*FINETUNE_OPTIONS, *ADAPT_OPTIONS], task=TASK_SECTIONS[args.task])
    if args.task == "cross-modal":
        cross = given.setdefault("crossmodal", {})
        cross["task"] = args.cross_task
        if args.modality:
            cross["modalities"] = tuple(args.modality)
    return replace(config, "flags", **given)


def _check_cross_task(args) -> None:
    """`cross-modal` takes its task (predict, align, annotate); the other tasks take none."""
    if args.task == "cross-modal" and args.cross_task is None:
        raise ConfigError(f"celltron finetune cross-modal: name the task, one of {', '.join(CROSSMODAL_TASKS)}")
    if args.task != "cross-modal" and (args.cross_task is not None or args.modality):
        given = f"'{args.cross_task}'" if args.cross_task else "--modality"
        raise ConfigError(f"celltron finetune {args.task}: {given} is for `celltron finetune cross-modal` only")


def _finetune(args) -> int:
    from celltron.training.examples import RunStopped

    config = _finetune_config(args)
    try:
        if args.task == "drug-response":
            from celltron.finetune.drug.ic50 import run_drug_response

            metrics = run_drug_response(config, args.out, baselines_only=args.baselines_only, model=args.model)
        elif args.task == "cross-modal":
            from celltron.finetune.crossmodal.run import run_crossmodal

            metrics = run_crossmodal(config, args.out, model=args.model, baselines_only=args.baselines_only)
        elif args.task == "annotate":
            from celltron.finetune.annotate import run_annotate

            metrics = run_annotate(config, args.model, args.out, baselines_only=args.baselines_only, resume=args.resume)
        else:
            from celltron.finetune.perturbation.run import run_perturbation

            metrics = run_perturbation(config, args.model, args.out, baselines_only=args.baselines_only, resume=args.resume)
    except RunStopped as stop:
        print(stop)
        return EXIT_STOPPED if stop.stopped_by == "signal" else 0
    if metrics is not None:
        print(f"wrote {args.out}/metrics.json, predictions and plots")
    return 0


def _grn(args) -> int:
    from celltron.finetune.grn.run import run_grn

    if args.model is None and args.truth is None:
        raise ConfigError("celltron grn: give --model (to infer edges) and/or --truth (to score them beside the baselines)")
    result = run_grn(
        args.model,
        args.data,
        args.out,
        args.method,
        args.tfs,
        args.truth,
        args.layer,
        args.gene_column,
        args.species,
        args.max_cells,
        args.top_genes,
        args.seed,
        device=args.device,
        precision=args.precision,
        min_mapped_fraction=args.min_mapped_fraction,
        n_folds=args.folds,
        head=args.head,
        tokens=args.tokens,
        **({"anchor_weights": args.anchor_weights} if args.anchor_weights is not None else {}),
    )
    print(
        f"wrote {args.out}/edges.tsv ({result['n_tfs']} TFs x {result['n_targets']} targets, {result['n_cells']} cells)"
        + (f" and {args.out}/metrics.json" if args.truth else "")
    )
    return 0


def _embed(args) -> int:
    from celltron.lab.embed import embed_file

    options = EmbedOptions(**given_values(args, EMBED_OPTIONS))
    summary = embed_file(args.model, args.data, args.out, options)
    print(
        f"wrote {args.out}: obsm[{options.key!r}] for {summary['cells']} cells"
        + (f", varm[{options.key!r}] gene embeddings" if summary["gene_embeddings"] else "")
        + (f" ({summary['empty_cells']} cells with no known gene are NaN)" if summary["empty_cells"] else "")
    )
    return 0


def _evaluate_embedding(args) -> int:
    from celltron.finetune.embedding_eval import BATCH_METRICS, run_embedding_evaluation

    run_embedding_evaluation(
        args.data,
        args.key,
        args.label_key,
        args.out,
        args.batch_key,
        umap=not args.no_umap,
        folds=args.folds,
        seed=args.seed,
        neighbors=args.neighbors,
        layer=args.layer,
        max_cells=args.max_cells,
        batch_metrics=tuple(args.batch_metrics or BATCH_METRICS),
        inner_folds=args.inner_folds,
        choose_by=args.choose_by,
    )
    print(f"wrote {args.out}/metrics.json" + ("" if args.no_umap else f" and {args.out}/umap.png"))
    return 0


def _export(args) -> int:
    from celltron.pretrain.run import export_checkpoint

    print(f"exported {args.checkpoint} -> {export_checkpoint(args.checkpoint, args.out, args.run_dir, overwrite=args.overwrite)}")
    return 0


def _publish(args) -> int:
    from celltron.hub.publish import describe, publish

    result = publish(
        args.source,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        force=args.force,
        dry_run=args.dry_run,
        token_env=args.token_env,
        out=args.out,
        run_dir=args.run_dir,
        base_model=args.base_model,
        license=args.license,
        metrics=args.metrics,
        overwrite=args.overwrite,
    )
    print(describe(result))
    return 0


def _launch(args) -> int:
    from celltron.launch.submit import launch

    given = given_values(args, CLUSTER_OPTIONS)
    spec = load_cluster(args.cluster, hosts=args.hosts.split(",") if args.hosts else None, **given)
    written = launch(spec, args.config, args.out, args.pretrain_args, dry_run=args.dry_run, node_rank=args.node_rank)
    for path in written["files"]:
        print(f"wrote {path}")
    for command in written["commands"]:
        print(command)
    if written["job_id"]:
        print(f"submitted SLURM job {written['job_id']}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celltron", description=__doc__, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    corpus = verbs.add_parser("corpus", help="build, inspect and validate corpora").add_subparsers(dest="action", required=True)

    build = corpus.add_parser("build", help="convert raw-count inputs into a sharded Zarr corpus")
    build.add_argument(
        "inputs",
        nargs="*",
        help=".h5ad files, 10x .h5 files, 10x mtx directories; multi-modal: MuData .h5mu files, 10x .h5 files with "
        "several feature types",
    )
    build.add_argument(
        "--modality",
        action="append",
        metavar="NAME=FILE",
        help="one file per modality of the same cells (rna, adt, atac), joined on obs names; repeat per modality",
    )
    build.add_argument("--out", required=True, help="corpus directory to create")
    build.add_argument("--config", help="YAML file of build options (configs/corpus/*.yaml); flags override it")
    add_options(build, BuildOptions, BUILD_OPTIONS)
    build.add_argument(
        "--weight", action="append", type=name_weight, help="NAME=W sampling weight of an input, recorded in the manifest"
    )
    build.add_argument("--overwrite", action="store_true", help="replace an existing corpus once the new one is complete")
    build.add_argument("--no-progress", action="store_true")
    build.set_defaults(run=_corpus_build)

    for name, run, text in (
        ("info", _corpus_info, "summarise a corpus"),
        ("validate", _corpus_validate, "re-check checksums and schema"),
    ):
        sub = corpus.add_parser(name, help=text)
        sub.add_argument("corpus", help="corpus directory or URL (s3://, gs://, file://)")
        sub.add_argument("--storage-option", action="append", help="KEY=VALUE for remote stores (e.g. endpoint_url=...)")
        if name == "info":
            sub.add_argument("--json", action="store_true")
        else:
            sub.add_argument(
                "--rekey",
                action="store_true",
                help="re-record the checksums of a corpus built before they "
                "were independent of how a relative --out was spelled (validate says when)",
            )
        sub.set_defaults(run=run)

    tokenize = verbs.add_parser("tokenize", help="tokenize a corpus or .h5ad into a Hugging Face datasets dataset")
    tokenize.add_argument("input", help="corpus directory/URL or .h5ad file")
    tokenize.add_argument("--scheme", required=True, choices=SCHEMES)
    tokenize.add_argument("--out", help="dataset directory to create (datasets.save_to_disk layout)")
    tokenize.add_argument("--obs-keys", nargs="*", help="obs columns to carry into the dataset")
    tokenize.add_argument("--split", default="train", choices=["train", "val"], help="corpus split to tokenize")
    tokenize.add_argument("--max-len", type=number(int, ">= 1"), help="tokens per cell (default: the scheme's)")
    tokenize.add_argument("--seed", type=number(int, ">= 0"), default=0, help="seeds scGPT's tie spreading and sampling")
    tokenize.add_argument("--layer", default="X", help="h5ad counts: X, raw, or a layer name")
    tokenize.add_argument("--gene-column", help="h5ad var column with gene IDs/symbols")
    tokenize.add_argument("--species", choices=["human", "mouse"])
    tokenize.add_argument("--min-mapped-fraction", type=float, metavar="SHARE", default=MIN_MAPPED_FRACTION, help=MAPPED_HELP)
    tokenize.add_argument(
        "--threads",
        type=number(int, ">= 1"),
        help="threads tokenising blocks (default: every available core; the dataset is the same for any number)",
    )
    tokenize.add_argument(
        "--hvg",
        type=number(int, ">= 1"),
        metavar="N",
        help="scgpt only: keep the N highly variable genes, as scGPT's Preprocessor (scanpy's "
        "highly_variable_genes) selects them among the genes its vocabulary covers; chosen over "
        "the .h5ad's cells or a corpus's training split (also for --split val)",
    )
    tokenize.add_argument(
        "--hvg-flavor",
        choices=["seurat_v3", "seurat_v3_paper", "seurat", "cell_ranger"],
        help="HVG flavor (default seurat_v3, on raw counts; seurat and cell_ranger on log1p counts per 10,000)",
    )
    tokenize.add_argument(
        "--hvg-batch-key",
        metavar="OBS_COLUMN",
        help="select HVGs per batch of this obs column and merge them, as scanpy's batch_key",
    )
    tokenize.add_argument(
        "--hvg-span", type=number(float, "> 0"), default=0.3, help="loess span of seurat_v3 (larger for very few cells)"
    )
    tokenize.add_argument("--coverage", action="store_true", help="report shared-token coverage of a corpus (ortholog scheme)")
    tokenize.add_argument("--storage-option", action="append", help="KEY=VALUE for remote corpora")
    tokenize.add_argument("--no-progress", action="store_true")
    tokenize.set_defaults(run=_tokenize)

    priors = verbs.add_parser("priors", help="prior-knowledge matrices for GeneCompass models").add_subparsers(
        dest="action", required=True
    )
    priors_build = priors.add_parser(
        "build", help="GRN, co-expression or a lab's gene table as matrices aligned to a run's vocabulary (model.priors)"
    )
    priors_build.add_argument("corpus", help="the pretraining corpus (directory or URL): its genes make the vocabulary")
    priors_build.add_argument(
        "--scheme", default="ortholog", choices=SCHEMES, help="the run's tokenizer.scheme (default ortholog)"
    )
    priors_build.add_argument("--max-len", type=number(int, ">= 1"), help="the run's tokenizer.max_len, if set")
    priors_build.add_argument("--out", required=True, help="folder to write (NAME.npy files and priors.json)")
    priors_build.add_argument("--grn", metavar="FILE", help="TF-target table in TRRUST format: its spectral embedding")
    priors_build.add_argument(
        "--grn-species", choices=["human", "mouse"], help="species of the --grn table's genes (default: inferred)"
    )
    priors_build.add_argument("--coexpression", action="store_true", help="low-rank gene-gene correlation of the training cells")
    priors_build.add_argument(
        "--table", action="append", metavar="NAME=FILE", help="a gene x d CSV/TSV (first column gene symbols or Ensembl IDs)"
    )
    priors_build.add_argument("--dims", type=number(int, ">= 1"), default=64, help="width of the grn and coexpression matrices")
    priors_build.add_argument(
        "--max-cells", type=number(int, ">= 2"), default=50_000, help="training cells read for coexpression"
    )
    priors_build.add_argument("--overwrite", action="store_true", help="replace --out even if celltron did not write it")
    priors_build.add_argument("--storage-option", action="append", help="KEY=VALUE for remote corpora")
    priors_build.set_defaults(run=_priors_build)

    pretrain = verbs.add_parser(
        "pretrain",
        help="pretrain a model on a corpus (Lightning; DDP, FSDP or DeepSpeed)",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pretrain.add_argument("config", help="run config (configs/pretrain/*.yaml)")
    add_options(pretrain, PretrainConfig, PRETRAIN_OPTIONS)
    pretrain.add_argument("--out", default="runs/pretrain", help="run directory")
    pretrain.add_argument(
        "--resume",
        help="'auto' (the newest intact checkpoint in --out; damaged ones are skipped, named in a "
        "warning) or a checkpoint path (refused if damaged)",
    )
    pretrain.add_argument("--init-from", help="model folder (exported or converted) to continue pretraining from")
    pretrain.add_argument("--set", action="append", default=[], help="section.field=value, e.g. optim.lr=3e-4")
    pretrain.set_defaults(run=_pretrain)

    finetune = verbs.add_parser(
        "finetune",
        help="fine-tune a pretrained model on a lab's AnnData, beside the baselines",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    finetune.add_argument("task", choices=list(TASK_SECTIONS))
    finetune.add_argument(
        "cross_task",
        nargs="?",
        choices=CROSSMODAL_TASKS,
        metavar="CROSS_TASK",
        help=f"cross-modal: {', '.join(CROSSMODAL_TASKS)}",
    )
    finetune.add_argument(
        "--modality",
        action="append",
        metavar="NAME=FILE",
        help="cross-modal: one file per modality of the same cells (rna, adt, atac), joined on obs names; repeat per modality "
        "(instead of --data PAIRED.h5mu)",
    )
    finetune.add_argument("--model", help="pretrained model folder (export, or `celltron convert`) or Hub id")
    finetune.add_argument("--out", default="runs/finetune", help="output directory (metrics.json, predictions.h5ad, plots)")
    finetune.add_argument("--config", help="run config (default configs/finetune/TASK.yaml)")
    add_options(finetune.add_mutually_exclusive_group(), FinetuneConfig, ADAPT_OPTIONS)
    finetune.add_argument("--baselines-only", action="store_true", help="compute and report only the baselines")
    add_options(finetune, FinetuneConfig, FINETUNE_OPTIONS)
    finetune.add_argument("--resume", help="'auto': continue each seed's run from its newest checkpoint")
    finetune.add_argument("--set", action="append", default=[], help="section.field=value, e.g. optim.lr=3e-4")
    finetune.set_defaults(run=_finetune)

    grn = verbs.add_parser("grn", help="infer a TF -> target network from a pretrained model; score it against a truth")
    grn.add_argument("--model", help="pretrained model folder or Hub id (without: baselines only)")
    grn.add_argument("--data", required=True, help="the lab's .h5ad of raw counts")
    grn.add_argument("--out", default="runs/grn")
    grn.add_argument("--method", default="embedding", choices=["embedding", "attention", "in-silico"])
    grn.add_argument("--tfs", help="TF list, one symbol per line (default: TRRUST's TFs of the species)")
    grn.add_argument("--truth", help="TRRUST-format TSV (TF, target, ...) to score the edges against")
    grn.add_argument("--layer", default="X")
    grn.add_argument("--gene-column")
    grn.add_argument("--species", choices=["human", "mouse"])
    grn.add_argument("--min-mapped-fraction", type=float, metavar="SHARE", default=MIN_MAPPED_FRACTION, help=MAPPED_HELP)
    grn.add_argument("--max-cells", type=number(int, ">= 0"), default=1000, help="cells sampled (seeded); 0: every cell")
    grn.add_argument("--top-genes", type=number(int, ">= 1"), default=2000, help="targets: the most variable genes")
    grn.add_argument("--seed", type=number(int, ">= 0"), default=0, help="seeds the cell sample and the held-out split")
    grn.add_argument(
        "--folds",
        type=number(int, ">= 2"),
        default=3,
        help="with --truth: TFs and targets are each dealt into this many folds; fold i is scored on its "
        "held-out TFs x held-out targets",
    )
    grn.add_argument(
        "--head",
        default="anchored",
        choices=["anchored", "plain"],
        help="with --model and --truth: anchored (default) scores the best baseline's ranking blended with the "
        "model's, the model's weight chosen on each fold's training edges; plain scores the model's own ranking",
    )
    grn.add_argument(
        "--anchor-weights",
        type=float,
        nargs="+",
        metavar="W",
        help="the anchored head's candidate weights for the model, each in [0, 1] (0: the baseline alone); "
        "chosen by inner TF x target blocks of each fold's training block: a weight above the smallest is taken "
        "only when its gain on the inner held-out blocks is beyond its 95%% bootstrap interval; default 0 0.25 0.5 0.75 1",
    )
    grn.add_argument(
        "--tokens",
        default="candidates",
        choices=["candidates", "tokenizer"],
        help="with --model: candidates (default) builds each cell's tokens from its detected genes, candidate TFs "
        "first, then candidate targets, then the rest, up to the tokenizer's length; tokenizer uses its own cut",
    )
    grn.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    grn.add_argument("--precision", default="auto", choices=["auto", "32", "bf16"], help="auto: bf16 on CUDA, fp32 on CPU")
    grn.set_defaults(run=_grn)

    embedding = verbs.add_parser(
        "evaluate-embedding", help="zero-shot scores of cell embeddings in an .h5ad beside a PCA baseline"
    )
    embedding.add_argument("--data", required=True, help=".h5ad with the embedding in obsm and raw counts (for the baseline)")
    embedding.add_argument(
        "--key",
        required=True,
        nargs="+",
        help="obsm entry of the embedding, e.g. X_celltron; several (variants of one model: layers, pooling, "
        "--max-len): each outer fold chooses one by inner cross-validation on its training cells",
    )
    embedding.add_argument("--label-key", required=True, help="obs column of cell labels, e.g. cell_type")
    embedding.add_argument("--batch-key", help="obs column of batches: adds scib-metrics' batch-integration metrics")
    embedding.add_argument("--out", default="runs/embedding", help="output directory (metrics.json, umap.png)")
    embedding.add_argument(
        "--folds", type=number(int, ">= 2"), default=5, help="stratified k-fold cross-validation of the kNN classifier"
    )
    embedding.add_argument("--seed", type=number(int, ">= 0"), default=0)
    embedding.add_argument(
        "--neighbors", type=number(int, ">= 1"), default=15, help="k of the kNN classifier, graph connectivity and UMAP"
    )
    embedding.add_argument("--layer", default="X", help="raw counts for the PCA baseline: X, raw, or a layer name")
    embedding.add_argument("--max-cells", type=number(int, ">= 1"), help="evaluate a seeded sample of this many cells")
    embedding.add_argument(
        "--batch-metrics",
        nargs="+",
        help="scib-metrics to compute (default all: silhouette_label clisi "
        "silhouette_batch ilisi kbet graph_connectivity; kbet is the slowest)",
    )
    embedding.add_argument(
        "--inner-folds", type=number(int, ">= 2"), default=3, help="with several --key: folds of the inner cross-validation"
    )
    embedding.add_argument(
        "--choose-by",
        default="accuracy",
        choices=["accuracy", "macro_f1"],
        help="with several --key: the score they are chosen by",
    )
    embedding.add_argument("--no-umap", action="store_true", help="skip the UMAP plot")
    embedding.set_defaults(run=_evaluate_embedding)

    embed = verbs.add_parser("embed", help="cell (and gene) embeddings of a lab's .h5ad, written into a copy of it")
    embed.add_argument("--model", required=True, help="pretrained model folder or Hub id")
    embed.add_argument("--data", required=True, help="the lab's .h5ad of raw counts (read in blocks: larger than memory is fine)")
    embed.add_argument("--out", required=True, help="the .h5ad to write (a copy of --data with obsm[KEY]; may be --data itself)")
    add_options(embed, EmbedOptions, EMBED_OPTIONS)
    embed.set_defaults(run=_embed)

    export = verbs.add_parser("export", help="export a pretraining checkpoint to a Hugging Face folder")
    export.add_argument("checkpoint", help="step=N.ckpt file or DeepSpeed checkpoint folder")
    export.add_argument("--out", required=True)
    export.add_argument("--run-dir", help="the run directory (default: the checkpoint's grandparent)")
    export.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format(what="--out folder"))
    export.set_defaults(run=_export)

    publish = verbs.add_parser(
        "publish", help="write a model card and upload a model folder (or checkpoint) to the Hugging Face Hub"
    )
    publish.add_argument("source", help="exported model folder, step=N.ckpt file or DeepSpeed checkpoint folder")
    publish.add_argument("--repo-id", required=True, help="Hub repository ORG/NAME (created if missing)")
    publish.add_argument("--revision", help="branch to publish to (default main; created if missing)")
    publish.add_argument("--private", action="store_true", help="create the repository private")
    publish.add_argument("--commit-message")
    publish.add_argument("--force", action="store_true", help="replace a revision that already holds files")
    publish.add_argument("--dry-run", action="store_true", help="write README.md, print the files and the card, upload nothing")
    publish.add_argument(
        "--token-env",
        default="HF_TOKEN",
        help="environment variable holding the write token "
        "(default HF_TOKEN, else the `hf auth login` token); the token is never printed",
    )
    publish.add_argument("--out", help="Hub-ready folder to write (default: the model folder itself; RUN/hub for a checkpoint)")
    publish.add_argument("--run-dir", help="the pretraining run folder (default: found beside the source)")
    publish.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format(what="--out (or RUN/hub) folder"))
    publish.add_argument("--base-model", help="Hub id of the model this one was initialised from (card front matter)")
    publish.add_argument("--license", default="apache-2.0", help="licence id for the card (default apache-2.0)")
    publish.add_argument(
        "--metrics", action="append", default=[], help="a fine-tuning metrics.json to report on the card (repeatable)"
    )
    publish.set_defaults(run=_publish)

    launch = verbs.add_parser("launch", help="write (and submit) the commands of a multi-node pretraining run")
    launch.add_argument("config", help="run config (configs/pretrain/*.yaml)")
    launch.add_argument("--cluster", help="cluster spec (configs/launch/*.yaml); flags override it")
    add_options(launch, ClusterSpec, CLUSTER_OPTIONS)
    launch.add_argument("--hosts", help="comma-separated node host names (first: rendezvous / master)")
    launch.add_argument("--out", default="runs/pretrain", help="shared run directory (checkpoints, logs, export)")
    launch.add_argument("--node-rank", type=number(int, ">= 0"), help="torchrun: run this node's command here")
    launch.add_argument("--dry-run", action="store_true", help="write and print, submit nothing")
    launch.set_defaults(run=_launch, pretrain_args=[])  # after `--`: more `celltron pretrain` arguments

    models = verbs.add_parser("models", help="list model families and named sizes with parameter counts")
    models.set_defaults(run=_models)

    convert = verbs.add_parser("convert", help="convert an official Geneformer or scGPT checkpoint into a celltron folder")
    # which families have a converter is the registry's to say (listing it here would load torch for --help)
    convert.add_argument("family", metavar="FAMILY", help="model family with a checkpoint converter: geneformer or scgpt")
    convert.add_argument("source", help="checkpoint folder (or scGPT best_model.pt)")
    convert.add_argument("--out", required=True, help="model folder to create")
    convert.add_argument(
        "--dictionary", choices=["v1", "v2"], help="geneformer token dictionary (default: from the vocabulary size)"
    )
    convert.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format(what="--out folder"))
    convert.set_defaults(run=_convert)

    demo = verbs.add_parser("demo", help="build the bundled PBMC corpus and pretrain the debug Geneformer on it (CPU, ~1 min)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--config", default="configs/pretrain/geneformer_debug.yaml")
    demo.add_argument("--max-steps", type=number(int, ">= 1"))
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=_demo)
    return parser


def _one_line(error: Exception) -> str:
    """The error's own message. A DataLoader worker re-raises a worker's error as the same class
    whose message is "Caught X in DataLoader worker process N. Original Traceback ...": the
    user's message is the traceback's last line, after the class name."""
    text = str(error)
    if "\n" not in text or not text.startswith("Caught "):
        return text
    last = text.rstrip().splitlines()[-1]
    name, sep, message = last.partition(": ")
    return message if sep and name.split(".")[-1] == type(error).__name__ else last


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on = []
    if "--" in argv:  # `celltron launch ... -- --corpus s3://...`: arguments for every pretrain process
        cut = argv.index("--")
        argv, passed_on = argv[:cut], argv[cut + 1 :]
    args = _parser().parse_args(argv)
    if passed_on:
        if args.verb != "launch":
            raise SystemExit(f"celltron {args.verb}: unexpected arguments after --: {passed_on}")
        args.pretrain_args = passed_on
    try:
        return args.run(args)
    except USER_ERRORS as error:
        print(f"celltron: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        # every writer renames complete files into place and removes its temporary ones on the way out
        print("celltron: interrupted; nothing half-written was left", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

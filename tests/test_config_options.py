"""One typed loader for every config, and command-line options made from the config fields: a
flag carries its field's type, range, choices and help, sets exactly that field, and a YAML
value is read as the field's type."""

from __future__ import annotations

import pytest

from celltron import cli
from celltron.config import Option, add_options, field_docs, given_values, load_config, replace
from celltron.errors import ConfigError
from celltron.finetune.config import FinetuneConfig
from celltron.pretrain.config import PretrainConfig


def _parse(verb_args: list[str]):
    return cli._parser().parse_args(verb_args)


def test_every_option_of_the_cli_names_a_real_field():
    # building the parser resolves every Option against its config class (a typo raises)
    parser = cli._parser()
    assert parser.prog == "celltron"


def test_a_flag_takes_its_range_from_the_field(capsys):
    with pytest.raises(SystemExit) as stop:
        _parse(["finetune", "perturbation", "--test-fraction", "1.5"])
    assert stop.value.code == 2
    assert "allowed: (0, 1)" in capsys.readouterr().err


def test_a_flag_takes_its_choices_from_the_field(capsys):
    with pytest.raises(SystemExit):
        _parse(["pretrain", "x.yaml", "--strategy", "horovod"])
    err = capsys.readouterr().err
    assert "deepspeed_stage_3_offload" in err  # every strategy the config accepts is offered


def test_help_comes_from_the_field_docstring(capsys):
    with pytest.raises(SystemExit):
        _parse(["finetune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "obs column of cell-type labels. (config: annotate.label_key / crossmodal.label_key)" in out
    assert "(config: perturbation.seeds / drug.seeds / annotate.seeds / crossmodal.seeds)" in out


@pytest.mark.parametrize(
    ("task", "section"), [("perturbation", "perturbation"), ("drug-response", "drug"), ("annotate", "annotate")]
)
def test_task_flags_set_the_tasks_own_section(task, section, tmp_path):
    args = _parse(["finetune", task, "--seeds", "3", "4", "--test-fraction", "0.3", "--devices", "2", "--lora", "4"])
    config = cli._finetune_config(args)
    assert getattr(config, section).seeds == (3, 4)
    assert getattr(config, section).test_fraction == 0.3
    assert config.trainer.devices == 2 and config.model.lora_rank == 4
    untouched = FinetuneConfig()
    for other in {"perturbation", "drug", "annotate", "crossmodal"} - {section}:
        assert getattr(config, other).seeds == getattr(untouched, other).seeds


def test_cross_modal_flags_name_the_task_and_the_files():
    args = _parse(
        ["finetune", "cross-modal", "align", "--modality", "rna=a.h5ad", "--modality", "atac=b.h5ad", "--target", "atac"]
        + ["--label-key", "Ident", "--split", "batch", "--batch-key", "Batch", "--seeds", "0", "1", "2", "--no-umap"]
    )
    section = cli._finetune_config(args).crossmodal
    assert (section.task, section.modalities, section.target) == ("align", ("rna=a.h5ad", "atac=b.h5ad"), "atac")
    assert (section.label_key, section.split, section.batch_key, section.seeds, section.umap) == (
        "Ident",
        "batch",
        "Batch",
        (0, 1, 2),
        False,
    )
    assert cli._finetune_config(_parse(["finetune", "annotate", "--label-key", "x"])).crossmodal.label_key == ""


def test_flags_win_over_the_config_file_and_absent_flags_leave_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  max_steps: 7\n  precision: bf16-mixed\noptim:\n  lr: 3e-4\n")
    args = _parse(["pretrain", str(path), "--max-steps", "9", "--corpus", "c"])
    config = cli._pretrain_config(args)
    assert (config.trainer.max_steps, config.trainer.precision, config.data.corpus) == (9, "bf16-mixed", "c")
    assert config.optim.lr == 3e-4 and isinstance(config.optim.lr, float)  # YAML reads 3e-4 as a string


def test_yaml_values_are_read_as_the_field_type_or_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  precision: 32\n  max_steps: '12'\n")
    config = load_config(PretrainConfig, path)
    assert config.trainer.precision == "32" and config.trainer.max_steps == 12
    path.write_text("trainer:\n  max_steps: 1.5\n")
    with pytest.raises(ConfigError, match=r"run.yaml \[trainer\] max_steps: 1.5 is not a valid int"):
        load_config(PretrainConfig, path)
    path.write_text("trainer:\n  strategy: horovod\n")
    with pytest.raises(ConfigError, match=r"\[trainer\] strategy: 'horovod' is not one of"):
        load_config(PretrainConfig, path)


def test_replace_refuses_an_unknown_field():
    with pytest.raises(ConfigError, match=r"flags \[trainer\]: unknown field\(s\) \['max_step'\]"):
        replace(PretrainConfig(), "flags", trainer={"max_step": 3})


def test_field_docs_read_grouped_and_inline_descriptions():
    from celltron.training.config import TrainerSection

    docs = field_docs(TrainerSection)
    assert docs["max_steps"] == "optimiser steps of the run."
    assert docs["val_every"] == docs["checkpoint_every"] == "in steps."


def test_options_of_a_flat_config_set_its_fields():
    import argparse

    from celltron.corpus.options import BuildOptions

    parser = argparse.ArgumentParser()
    options = [Option("obs_keys"), Option("max_mito_fraction"), Option("compression")]
    add_options(parser, BuildOptions, options)
    args = parser.parse_args(["--obs-keys", "cell_type", "donor", "--compression", "zstd"])
    assert given_values(args, options) == {"obs_keys": ("cell_type", "donor"), "compression": "zstd"}


def _options_of(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _options_of(sub)
        elif action.dest.startswith("config__"):
            yield action


def test_every_option_made_from_a_field_has_help():
    empty = [action.option_strings[0] for action in _options_of(cli._parser()) if not action.help.split("(config:")[0].strip()]
    assert empty == []


def test_a_task_flag_given_to_a_task_without_that_field_is_refused():
    args = _parse(["finetune", "annotate", "--split", "heldout"])
    with pytest.raises(ConfigError, match="--split does not apply to annotate"):
        cli._finetune_config(args)


def test_fine_tuning_refuses_zero_3():
    with pytest.raises(ConfigError, match="ZeRO-3"):
        replace(FinetuneConfig(), trainer={"strategy": "deepspeed_stage_3"})


def test_values_inside_lists_and_mappings_are_read_as_their_type(tmp_path):
    from celltron.corpus.options import BuildOptions

    path = tmp_path / "build.yaml"
    path.write_text("weights: {a.h5ad: '0.5'}\nobs_keys:\n")
    options = BuildOptions.from_yaml(path)
    assert options.weights == {"a.h5ad": 0.5} and options.obs_keys == ()
    path.write_text("weights: {a.h5ad: '-1'}\n")
    with pytest.raises(ConfigError, match=r"weights\['a.h5ad'\]: -1.0 is out of range"):
        BuildOptions.from_yaml(path)
    path = tmp_path / "run.yaml"
    path.write_text("annotate:\n  seeds: [1.5]\n")
    with pytest.raises(ConfigError, match=r"seeds\[0\]: 1.5 is not a valid int"):
        load_config(FinetuneConfig, path)


def test_a_list_flag_given_without_values_clears_the_list():
    args = _parse(["corpus", "build", "x.h5ad", "--out", "c", "--obs-keys"])
    assert given_values(args, cli.BUILD_OPTIONS)["obs_keys"] == ()


def test_flat_options_show_their_default_in_help(capsys):
    with pytest.raises(SystemExit):
        _parse(["corpus", "build", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(config: val_fraction; default 0.01)" in out

"""What a newcomer sees while a run trains: no framework tips or foreign deprecation warnings, and
a progress bar that counts steps (a streaming corpus has no epoch length, which Lightning's own
bar shows as "Epoch 0/-2")."""

from __future__ import annotations

import warnings

from celltron.pretrain.config import load_config, replace
from celltron.pretrain.run import pretrain
from celltron.training.console import quiet_framework_noise
from tests.pretrain.conftest import CONFIGS


def test_a_run_prints_no_framework_noise_and_counts_steps(demo_corpus, tmp_path, capfd):
    config = load_config(CONFIGS / "pretrain" / "geneformer_debug.yaml")
    config = replace(
        config,
        data={"corpus": str(demo_corpus.location)},
        trainer={"max_steps": 2, "log_every": 1, "val_every": 2},
        logging={"progress_bar": True, "wandb": False},
    )
    result = pretrain(config, tmp_path / "run")
    shown = "".join(capfd.readouterr())
    assert result.steps == 2
    assert "training, 2 steps" in shown or "training to step 2" in shown
    for noise in ("Tip:", "litlogger", "/-2", "v_num", "Deprecat", "weights_only", "Setting accelerator to CPU"):
        assert noise not in shown, noise


def test_our_own_warnings_still_show():
    quiet_framework_noise()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_framework_noise()  # the filters are installed again on top of "default"
        warnings.warn_explicit("celltron's own deprecation", DeprecationWarning, "x.py", 1, module="celltron.corpus")
    assert [str(w.message) for w in caught] == ["celltron's own deprecation"]

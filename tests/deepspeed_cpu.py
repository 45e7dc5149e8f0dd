"""DeepSpeed through Lightning on CPU, for tests only: CELLTRON_DEEPSPEED_CPU=tests.deepspeed_cpu:CPUDeepSpeedStrategy
(with the repository root on PYTHONPATH) makes celltron's trainer use it on CPU.

Lightning's DeepSpeedStrategy refuses a CPU accelerator, checks CUDA device indices, and hands
DeepSpeed `device_rank=None` on CPU. This subclass skips the first two and passes the local rank,
which lets ZeRO 1/2/3 train, checkpoint, resume and export over gloo on CPU (as
tests/pretrain/test_distributed.py does). It also skips compiling DeepSpeed's shared-memory
communication op (~100 s per fresh machine; gloo does the communication). It relies on Lightning internals, so
it lives in the test suite, behind an explicit switch, and never on the GPU path.
"""

from __future__ import annotations

import argparse
import importlib

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # without DeepSpeedStrategy's CUDA check

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer

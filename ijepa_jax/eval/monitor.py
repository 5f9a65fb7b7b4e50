"""The evaluation monitor of a pretraining run: k-NN (and optionally a quick linear probe) on subsets of
the evaluation splits, from the live target parameters, every `eval.every_epochs` (train's loop)."""

from __future__ import annotations

import dataclasses

from ijepa_jax import encoder_export, evaluate
from ijepa_jax.eval import features as features_lib


class Monitor:
    """k-NN (and optionally a quick linear probe) on subsets, during pretraining, from the live target params."""

    def __init__(self, config, mesh, model_name: str, patch_size: int, crop_size: int):
        e = config.eval
        self.config, self.mesh = config, mesh
        self.train_src, self.test_src = evaluate.eval_sources(
            config, e.monitor_test_samples_per_class, e.monitor_train_samples_per_class
        )
        encoder = encoder_export.unrolled_encoder(model_name, patch_size)
        self.enc = evaluate.EncoderUnderTest("monitor", encoder, None, patch_size, crop_size)
        self.extractor = features_lib.make_extractor(encoder, config.data.mean, config.data.std, mesh)
        self.protocols = tuple(p for p in e.monitor_protocols.split(",") if p)

    def __call__(self, target_params) -> dict:
        enc = dataclasses.replace(self.enc, params=encoder_export.unstack_blocks(target_params))

        def split(src, name):
            return evaluate.features_of(self.config, enc, src, name, None, self.mesh, self.extractor)

        train_f, train_y, _ = split(self.train_src, self.config.eval.train_split)
        test_f, test_y, _ = split(self.test_src, self.config.eval.test_split)
        results = evaluate.run_protocols(self.config, (train_f, train_y), (test_f, test_y),
                                         len(self.train_src.class_names), self.protocols)
        return {f"eval/{k}": v for k, v in evaluate.summary_rows(results).items()}

"""Frozen-feature evaluation of the TARGET encoder: linear probe, k-NN, low-shot (and, opt-in, attentive).

    python -m ijepa_jax.evaluate --config configs/cifar100.py:vit_tiny --workdir runs/c100 [--step N]
    python -m ijepa_jax.evaluate --config configs/cifar100.py:vit_tiny --encoder encoder.msgpack

The dataset and protocol settings come from `--config` (`data.*`, `eval.*`),
the architecture from the checkpoint or exported file. Every protocol also
runs on a randomly initialised encoder of the same architecture (the
baseline; `--baseline=false` skips it). Results go to OUT/results.json and
TensorBoard scalars to OUT/tensorboard, OUT being WORKDIR/eval by default.
The attentive probe (`--protocols=linear,knn,attentive`) trains on the last
layer's patch tokens, kept in host memory (float16), not cached on disk: they
come from the pooled features' pass, or from a pass of their own when those
come from the cache. `finetune` (eval/finetune.py) trains the whole encoder
and a linear head for `eval.finetune_epochs` on the labelled images.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from ijepa_jax import bad_input, compilation_cache, config_lib, encoder_export, files, sharding
from ijepa_jax.data import sources
from ijepa_jax.eval import features as features_lib
from ijepa_jax.eval import attentive, finetune, knn, probe

PROTOCOLS = ("linear", "knn", "lowshot")  # the default
# Opt-in: attentive trains a head on every patch token, finetune the whole encoder.
ALL_PROTOCOLS = PROTOCOLS + ("attentive", "finetune")


@dataclasses.dataclass
class EncoderUnderTest:
    tag: str  # names the feature cache and the results
    encoder: object  # unrolled float32 vit.Encoder
    params: object
    patch_size: int
    crop_size: int
    normalization: tuple | None = None  # (mean, std) the encoder was trained with; None: config.data's

    @functools.cached_property
    def digest(self) -> str:
        """The weights' identity (features_lib.params_digest), hashed once per encoder."""
        return features_lib.params_digest(self.params)


def from_workdir(workdir: str, step: int | None = None, which: str = "target") -> EncoderUnderTest:
    """A run's target (EMA) encoder, as the reference evaluates, or with `which='online'` its online one."""
    params, config, step = encoder_export.restore_target_encoder(workdir, step, which)
    encoder = encoder_export.unrolled_encoder(config.model.name, config.model.patch_size)
    tag = f"step{step}" if which == "target" else f"step{step}_{which}"
    return EncoderUnderTest(tag, encoder, params, config.model.patch_size, config.data.crop_size)


def from_export(path: str) -> EncoderUnderTest:
    encoder, params, info = encoder_export.load_encoder(path)
    tag = "export_" + features_lib.cache_key(path=os.path.abspath(path), mtime=os.path.getmtime(path))
    normalization = (tuple(info["mean"]), tuple(info["std"])) if "mean" in info else None
    return EncoderUnderTest(tag, encoder, params, info["patch_size"], info["crop_size"], normalization)


def random_init(like: EncoderUnderTest, seed: int) -> EncoderUnderTest:
    """An encoder of the same architecture at its reference initialisation."""
    params = like.encoder.init(jax.random.key(seed), np.zeros((1, like.crop_size, like.crop_size, 3), np.float32))
    return dataclasses.replace(like, tag=f"random_seed{seed}", params=params["params"])


def eval_sources(config, test_samples_per_class: int | None = None, train_samples_per_class: int | None = None):
    """(train, test) sources of the evaluation splits, subset as `eval.*_samples_per_class` say."""
    e = config.eval
    out = []
    for split, per_class in (
        (e.train_split, e.train_samples_per_class if train_samples_per_class is None else train_samples_per_class),
        (e.test_split, e.test_samples_per_class if test_samples_per_class is None else test_samples_per_class),
    ):
        data = ml_collections.ConfigDict(config.data.to_dict())
        data.max_samples_per_class = per_class
        out.append(sources.make_source(data, split=split, seed=config.seed))
    return tuple(out)


def image_size_for(config, enc: EncoderUnderTest) -> int:
    size = config.eval.image_size if config.eval.image_size > 0 else enc.crop_size
    if size % enc.patch_size:
        raise ValueError(
            f"eval.image_size={size} is not divisible by the encoder's patch size {enc.patch_size}: images are "
            f"resized (shorter side) and centre-cropped to this size; set --config.eval.image_size to a multiple "
            f"of {enc.patch_size}, e.g. {size // enc.patch_size * enc.patch_size or enc.patch_size}."
        )
    return size


def normalization_of(config, enc: EncoderUnderTest) -> tuple:
    """The (mean, std) images are normalised with: the exported encoder's own, else the config's."""
    return enc.normalization or (tuple(config.data.mean), tuple(config.data.std))


def features_of(config, enc: EncoderUnderTest, source, split: str, cache_dir: str | None, mesh, extractor=None,
                tokens_out: dict | None = None):
    """(features (N, 4, D), labels, from_cache) of one split, computed once and cached. With `tokens_out`
    (and a tokens extractor) a split that is computed leaves its patch tokens in tokens_out['tokens']."""
    size = image_size_for(config, enc)
    batch = config.eval.batch_size
    batch += (-batch) % jax.device_count()
    mean, std = normalization_of(config, enc)
    extractor = extractor or features_lib.make_extractor(enc.encoder, mean, std, mesh)

    def compute():
        out, labels = features_lib.extract_features(extractor, enc.params, source, size, batch, mesh,
                                                    name=f"{enc.tag} {split}")
        if tokens_out is not None:
            out, tokens_out["tokens"] = out
        return out, labels

    if cache_dir is None:
        return (*compute(), False)
    d = config.data
    key = features_lib.cache_key(
        source=d.source, root=d.root, tfds=d.tfds_name, classes=d.classes, split=split, size=size,
        n=len(source), mean=list(mean), std=list(std), seed=config.seed,
        encoder=enc.digest,  # the tag alone cannot tell two runs' step N apart
    )
    return features_lib.cached(os.path.join(cache_dir, f"{enc.tag}_{split}_{key}.npz"), compute)


def tokens_of(config, enc: EncoderUnderTest, source, split: str, mesh, extractor=None):
    """(tokens (N, T, D) float16, labels) of one split: the last layer's patch tokens, not cached."""
    mean, std = normalization_of(config, enc)
    batch = config.eval.batch_size
    batch += (-batch) % jax.device_count()
    extractor = extractor or features_lib.make_extractor(enc.encoder, mean, std, mesh, tokens=True)
    (_, tokens), labels = features_lib.extract_features(extractor, enc.params, source, image_size_for(config, enc),
                                                        batch, mesh, name=f"{enc.tag} {split} tokens")
    return tokens, labels


def run_protocols(config, train, test, num_classes: int, protocols, tokens=None, num_heads: int = 0) -> dict:
    """Every requested protocol on cached (features, labels) pairs; each result carries its wall time.
    'attentive' needs `tokens`: (train tokens, test tokens) in the same order, and the encoder's `num_heads`."""
    e = config.eval
    (train_f, train_y), (test_f, test_y) = train, test
    settings = probe.ProbeSettings.from_config(e)
    results = {}
    if "knn" in protocols:
        t = time.time()
        results["knn"] = knn.knn_classify(train_f[:, -1], train_y, test_f[:, -1], test_y, num_classes,
                                          k=e.knn_k, temperature=e.knn_temperature)
        results["knn"]["seconds"] = time.time() - t
    if "linear" in protocols:
        results["linear"] = {}
        for variant in probe.VARIANTS:
            t = time.time()
            results["linear"][variant] = probe.linear_probe(train_f, train_y, test_f, test_y, num_classes,
                                                            variant, settings)
            results["linear"][variant]["seconds"] = time.time() - t
    if "lowshot" in protocols:
        chosen = results.get("linear", {}).get(e.lowshot_variant)
        lr = chosen["lr"] if chosen else settings.lrs[len(settings.lrs) // 2]
        wd = chosen["weight_decay"] if chosen else settings.weight_decays[0]
        results["lowshot"] = {}
        for n in e.lowshot_per_class:
            t = time.time()
            r = probe.low_shot(train_f, train_y, test_f, test_y, num_classes, n, e.lowshot_seeds,
                               e.lowshot_variant, lr, wd, settings)
            results["lowshot"][f"{n}_per_class"] = {**r, "seconds": time.time() - t}
    if "attentive" in protocols:
        if tokens is None:
            raise ValueError("the attentive protocol needs the patch tokens (run_protocols(tokens=...))")
        t = time.time()
        results["attentive"] = attentive.attentive_probe(tokens[0], train_y, tokens[1], test_y, num_classes,
                                                         num_heads, attentive.AttentiveSettings.from_config(e))
        results["attentive"]["seconds"] = time.time() - t
    return results


def evaluate(config, enc: EncoderUnderTest, out_dir: str, protocols=PROTOCOLS) -> dict:
    """Features of both splits (cached under out_dir), then every protocol."""
    mesh = sharding.make_mesh()
    train_src, test_src = eval_sources(config)
    cache_dir = os.path.join(out_dir, "feature_cache")
    t = time.time()
    want_tokens = "attentive" in protocols
    extractor = features_lib.make_extractor(enc.encoder, *normalization_of(config, enc), mesh, tokens=want_tokens)
    enc = dataclasses.replace(enc, params=jax.device_put(enc.params, sharding.replicated(mesh)))
    splits, tokens = [], []
    for src, split in ((train_src, config.eval.train_split), (test_src, config.eval.test_split)):
        kept = {} if want_tokens else None  # the tokens of a computed split come with its features
        f, y, hit = features_of(config, enc, src, split, cache_dir, mesh, extractor, tokens_out=kept)
        if want_tokens and "tokens" not in kept:  # the features came from the cache: a pass for the tokens
            kept["tokens"], tokens_y = tokens_of(config, enc, src, split, mesh, extractor)
            if not np.array_equal(tokens_y, y):
                raise ValueError(f"the cached features' labels of {split!r} differ from the images': remove "
                                 f"{cache_dir}")
        splits.append((f, y, hit))
        tokens.append(kept["tokens"] if want_tokens else None)
    (train_f, train_y, hit_a), (test_f, test_y, hit_b) = splits
    tokens = tuple(tokens) if want_tokens else None
    extraction_s = time.time() - t
    results = run_protocols(config, (train_f, train_y), (test_f, test_y), len(train_src.class_names), protocols,
                            tokens=tokens, num_heads=enc.encoder.num_heads)
    if "finetune" in protocols:
        t = time.time()
        size = image_size_for(config, enc)
        results["finetune"] = finetune.finetune(
            enc.encoder, enc.params, features_lib.centre_crops(train_src, size), features_lib.centre_crops(test_src, size),
            len(train_src.class_names), *normalization_of(config, enc), mesh,
            finetune.FinetuneSettings.from_config(config.eval))
        results["finetune"]["seconds"] = time.time() - t
    results["features"] = {
        "train_images": len(train_y), "test_images": len(test_y), "classes": len(train_src.class_names),
        "dim": int(train_f.shape[-1]), "image_size": image_size_for(config, enc), "seconds": extraction_s,
        "from_cache": bool(hit_a and hit_b),
    }
    return results


def summary_rows(results: dict) -> dict:
    """Flat {name: top-1} for tables and TensorBoard."""
    rows = {}
    if "knn" in results:
        rows[f"knn_k{results['knn']['k']}"] = results["knn"]["top1"]
    for variant, r in results.get("linear", {}).items():
        rows[f"linear_{variant}"] = r["top1"]
    for name, r in results.get("lowshot", {}).items():
        rows[f"lowshot_{name}"] = r["top1_mean"]
    for protocol in ("attentive", "finetune"):
        if protocol in results:
            rows[protocol] = results[protocol]["top1"]
    return rows


def format_table(all_results: dict) -> str:
    names = list(all_results)
    rows = {n: summary_rows(r) for n, r in all_results.items()}
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    lines = [f"{'top-1 (%)':<26}" + "".join(f"{n:>14}" for n in names)]
    for k in keys:
        lines.append(f"{k:<26}" + "".join(f"{100 * rows[n].get(k, float('nan')):>14.2f}" for n in names))
    return "\n".join(lines)


def write_results(out_dir: str, all_results: dict) -> str:
    path = files.write_text(files.path(out_dir) / "results.json", json.dumps(all_results, indent=2))
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(files.path(out_dir) / "tensorboard")) as tb:
        for name, results in all_results.items():
            for key, value in summary_rows(results).items():
                tb.add_scalar(f"eval/{name}/{key}", value, 0)
    return path


FLAGS = flags.FLAGS


def define_flags(fv) -> None:
    """The command's flags (on flags.FLAGS from __main__, or a test's FlagValues)."""
    config_flags.DEFINE_config_file(
        "config", None, "Config file (data and eval settings), CONFIG:ARG.", lock_config=True, flag_values=fv
    )
    flags.DEFINE_string("workdir", "", "A pretraining run's --workdir (its latest checkpoint, or --step).", flag_values=fv)
    flags.DEFINE_integer("step", -1, "Checkpoint step (-1: the latest).", flag_values=fv)
    flags.DEFINE_string("encoder", "", "An exported encoder (tools/export_encoder) instead of --workdir.", flag_values=fv)
    flags.DEFINE_string("protocols", ",".join(PROTOCOLS),
                        "Comma-separated: linear, knn, lowshot; opt-in: attentive (a head on the patch tokens), finetune.",
                        flag_values=fv)
    flags.DEFINE_bool(
        "baseline", True, "Also evaluate a randomly initialised encoder of the same architecture.", flag_values=fv
    )
    flags.DEFINE_string("out", "", "Output folder (default WORKDIR/eval).", flag_values=fv)
    flags.DEFINE_enum("which", "target", ["target", "online"],
                      "With --workdir: the target (EMA) encoder, as the reference probes, or the online one.",
                      flag_values=fv)
    flags.DEFINE_bool("traceback", False, "Show the full stack trace of a bad input.", flag_values=fv)
    flags.mark_flags_as_required(["config"], flag_values=fv)


def main(argv) -> None:
    """Through bad_input.run_command: a bad config, checkpoint, export or dataset is one line."""
    del argv
    config = FLAGS.config
    config_lib.validate_eval(config)
    if bool(FLAGS.workdir) == bool(FLAGS.encoder):
        raise ValueError("Give exactly one of --workdir (a pretraining run) or --encoder (an exported file).")
    protocols = tuple(p for p in FLAGS.protocols.split(",") if p)
    unknown = set(protocols) - set(ALL_PROTOCOLS)
    if unknown or not protocols:
        raise ValueError(f"--protocols={FLAGS.protocols!r}: unknown {sorted(unknown)}; choose from {ALL_PROTOCOLS}.")
    out_dir = FLAGS.out or os.path.join(FLAGS.workdir or os.path.dirname(os.path.abspath(FLAGS.encoder)), "eval")
    bad_input.path_to_write(out_dir, "--out" if FLAGS.out else "the results folder")
    compilation_cache.use(config.compilation_cache_dir)
    if FLAGS.workdir:
        with bad_input.reading_checkpoint(FLAGS.workdir):
            enc = from_workdir(FLAGS.workdir, None if FLAGS.step < 0 else FLAGS.step, FLAGS.which)
    else:
        enc = from_export(FLAGS.encoder)
    candidates = {enc.tag: enc}
    if FLAGS.baseline:
        baseline = random_init(enc, config.seed)
        candidates[baseline.tag] = baseline
    all_results = {}
    for name, candidate in candidates.items():
        print(f"== {name}", flush=True)
        all_results[name] = evaluate(config, candidate, out_dir, protocols)
        print(format_table({name: all_results[name]}), flush=True)
    path = write_results(out_dir, all_results)
    print(format_table(all_results))
    print(f"wrote {path}")


if __name__ == "__main__":
    bad_input.run_command(main, define_flags)

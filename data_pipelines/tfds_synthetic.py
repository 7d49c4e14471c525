"""The synthetic faces dataset as a TensorFlow Datasets builder (ArrayRecord output, no TensorFlow needed).

Why: users of big_vision / scenic expect datasets behind ``tfds`` - ``builder.download_and_prepare()`` and then
``tfds.data_source(...)`` into grain. This builder writes the same clips as ``python -m data_pipelines.synthetic``
(``synthetic.render_clip`` of the same seed, split and index, JPEG-encoded at the same quality) in TFDS's own
format; the project's trainer keeps reading its own shards (``data_pipelines.synthetic`` / ``build``), which
carry the full per-clip ground truth, resume and parallel writing.

Works with ``tensorflow-datasets==4.9.10`` and no TensorFlow installed, within these limits (measured; README
'Data' has the details):

* frames must be handed to TFDS already encoded: ``tfds.features.Image`` encodes numpy frames with
  ``tf.image.encode_jpeg`` (``ModuleNotFoundError: No module named 'tensorflow'``), so ``_generate_examples``
  yields JPEG bytes (``records.encode_jpeg``); ``tfds.features.Video`` cannot even be constructed
  (``tf.dtypes.as_dtype`` in its ``__init__``), hence ``Sequence(Image)``;
* reading decodes every frame to numpy (OpenCV/PIL inside TFDS); ``decoders={"frames": tfds.decode.SkipDecoding()}``
  fails on data sources (``AttributeError: 'SkipDecoding' object has no attribute 'decode_batch_example_np'``);
* TFDS writes each split in one process (no ``--workers``, no resume): fine for the default 2,170 clips, slow for
  much more;
* for grain worker processes the builder class must be importable (it is: this module), not defined in
  ``__main__`` (the workers re-register it: ``ValueError: Dataset with name ... already registered``).

Usage::

    from data_pipelines import tfds_synthetic
    builder = tfds_synthetic.SyntheticFaces(config="posed", data_dir="~/tensorflow_datasets", file_format="array_record")
    builder.download_and_prepare()
    source = builder.as_data_source("train")        # or tfds.data_source("synthetic_faces/posed", split="train", ...)
    source[0]  # {"frames": [uint8 [S, S, 3], ...], "label": 3, "expression": 3, "identity": "train-00000", ...}

Labels: ``label`` is the class index, -1 in the unlabelled ``pretrain`` split; ``expression`` is the class the clip
actually shows (in pretrain too, drawn at random): ground truth for analysis, not a training label there.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import records, synthetic


@dataclasses.dataclass(eq=False)
class SyntheticFacesConfig(tfds.core.BuilderConfig):
    """The settings of ``synthetic.build_dataset`` that decide the clips (same names, same defaults)."""

    seed: int = 0
    num_pretrain: int = 1400
    train_per_class: int = 60
    val_per_class: int = 20
    test_per_class: int = 30
    frames: int = 32
    size: int = 160
    quality: int = 90
    scenario: str = "wild"

    def counts(self) -> dict[str, int]:
        n = len(synthetic.CLASS_NAMES)
        return {"pretrain": self.num_pretrain, "train": self.train_per_class * n, "val": self.val_per_class * n,
                "test": self.test_per_class * n}


class SyntheticFaces(tfds.core.GeneratorBasedBuilder):
    """Procedurally drawn talking faces with seven dynamic expressions (see ``data_pipelines.synthetic``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: the clips of data_pipelines.synthetic."}
    BUILDER_CONFIGS = [
        SyntheticFacesConfig(name="wild", description="DFEW-like nuisance: talking, head motion, clutter."),
        SyntheticFacesConfig(name="posed", scenario="posed",
                             description="Lab recording: still, silent, plain backdrop, full-intensity apex."),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        synthetic.get_scenario(cfg.scenario)  # an unknown scenario fails here, naming the known ones
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "frames": tfds.features.Sequence(
                    tfds.features.Image(shape=(cfg.size, cfg.size, 3), encoding_format="jpeg")),
                "label": tfds.features.Scalar(np.int64, doc="class index; -1 in the unlabelled pretrain split"),
                "expression": tfds.features.ClassLabel(names=list(synthetic.CLASS_NAMES)),
                "identity": tfds.features.Text(),
                "clip_id": tfds.features.Text(),
                "intensity": tfds.features.Scalar(np.float32),
                "apex_frame": tfds.features.Scalar(np.int64, doc="frame of the expression's peak; -1 for neutral"),
            }),
            supervised_keys=("frames", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the clips are drawn
        return {split: self._generate_examples(split) for split, n in self.builder_config.counts().items() if n}

    def _generate_examples(self, split: str):
        cfg = self.builder_config
        for task in synthetic.split_tasks(cfg.seed, split, cfg.counts()[split], split != "pretrain", cfg.frames,
                                          cfg.size, cfg.quality, cfg.scenario):
            video, meta = synthetic.render_clip(task)
            clip_id = f"{task.split}/{task.index:06d}"
            yield clip_id, {
                "frames": [records.encode_jpeg(f, cfg.quality) for f in video],
                "label": -1 if task.label is None else task.label,
                "expression": meta["expression"],
                "identity": meta["identity"],
                "clip_id": clip_id,
                "intensity": meta["intensity"],
                "apex_frame": -1 if meta["apex_frame"] is None else meta["apex_frame"],
            }

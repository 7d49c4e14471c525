"""TensorFlow Datasets builders (ArrayRecord output, no TensorFlow needed): the synthetic faces, and DFEW, MAFW and
FERV39k from a manual-download folder.

Why: users of big_vision / scenic expect datasets behind ``tfds`` - ``builder.download_and_prepare()`` (what
``tfds build`` runs) and then ``tfds.data_source(...)`` into grain. These builders are a front door over the project's
own code, not a second implementation: :class:`SyntheticFaces` writes the clips of ``python -m
data_pipelines.synthetic`` (``synthetic.render_clip`` of the same seed, split and index, JPEG-encoded at the same
quality); :class:`Dfew`, :class:`Mafw` and :class:`Ferv39k` plan with ``build_plans.plan_from_annotations`` and
convert with ``clip_conversion.convert_clip``, so their frames are the bytes ``python -m data_pipelines.build``
stores. The trainer keeps reading the project's own dataset folders: they store each clip once for all folds (TFDS
has no index-list splits, so each fold here is a config holding every clip again: 5x the disk for DFEW/MAFW), keep
the per-clip ground truth and skipped-input report, and are written in parallel and resumably.

Works with ``tensorflow-datasets==4.9.10`` and no TensorFlow installed, within these limits (measured; README
'Data' has the details):

* frames must be handed to TFDS already encoded: ``tfds.features.Image`` encodes numpy frames with
  ``tf.image.encode_jpeg`` (``ModuleNotFoundError: No module named 'tensorflow'``), so ``_generate_examples``
  yields JPEG bytes (``records.encode_jpeg``); ``tfds.features.Video`` cannot even be constructed
  (``tf.dtypes.as_dtype`` in its ``__init__``), hence ``Sequence(Image)``;
* reading decodes every frame to numpy (OpenCV/PIL inside TFDS); ``decoders={"frames": tfds.decode.SkipDecoding()}``
  fails on data sources (``AttributeError: 'SkipDecoding' object has no attribute 'decode_batch_example_np'``);
* TFDS writes each split in one process (no ``--workers``, no resume): fine for the default 2,170 synthetic clips,
  slow for the real datasets, which ``data_pipelines.build --workers N`` converts on N cores;
* the file format must be ArrayRecord: TFDS's default, TFRecord, fails at the end of each split
  (``ModuleNotFoundError: Failed to finalize writing of split "pretrain": No module named 'tensorflow'``), so these
  builders default to ``file_format="array_record"`` (``tfds build`` passes a format only when given one);
* a builder class inside a package needs ``importlib_resources`` (``DatasetBuilder.code_path``), which
  tensorflow-datasets 4.9.10 declares only for Python < 3.9: ``requirements.txt`` pins it;
* for grain worker processes the builder class must be importable (it is: this module), not defined in
  ``__main__`` (the workers re-register it: ``ValueError: Dataset with name ... already registered``).

Usage::

    from data_pipelines import tfds_builders
    builder = tfds_builders.SyntheticFaces(config="posed", data_dir="~/tensorflow_datasets")
    builder.download_and_prepare()
    source = builder.as_data_source("train")        # or tfds.data_source("synthetic_faces/posed", split="train", ...)
    source[0]  # {"frames": [uint8 [S, S, 3], ...], "label": 3, "expression": 3, "identity": "train-00000", ...}

Synthetic labels: ``label`` is the class index, -1 in the unlabelled ``pretrain`` split; ``expression`` is the class
the clip actually shows (in pretrain too, drawn at random): ground truth for analysis, not a training label there.

DFEW / MAFW / FERV39k (configs ``fold1`` .. ``fold5`` with splits train/test (+ val where the split folder has it);
FERV39k: one config ``default``)::

    builder = tfds_builders.Dfew(config="fold1", data_dir=DATA_DIR)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=MANUAL_DIR))

with ``MANUAL_DIR`` laid out as in ``MANUAL_DOWNLOAD_INSTRUCTIONS``. Inputs that cannot be converted (missing or
empty clip folders, unreadable frames) are skipped with one log line each, as ``data_pipelines.build`` lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from data_pipelines import build_plans, clip_conversion, records, synthetic
from data_pipelines.sources import official_csv


class _ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS's default file format (TFRecord) needs TensorFlow to write; ArrayRecord does not (module docstring)."""

    def __init__(self, *, file_format: str | None = None, **kwargs):
        super().__init__(file_format=file_format or "array_record", **kwargs)


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


class SyntheticFaces(_ArrayRecordBuilder):
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


# ---------------------------------------------------------------------------------------------------------------
# DFEW, MAFW, FERV39k from a manual-download folder
# ---------------------------------------------------------------------------------------------------------------

PATH_REMAP_FILE = "path_remap.txt"


@dataclasses.dataclass(eq=False)
class AnnotatedFramesConfig(tfds.core.BuilderConfig):
    """One fold (``fold`` = 1..K; None for single-split datasets) and the stored frame size/quality, which mean what
    ``python -m data_pipelines.build --short_side / --jpeg_quality`` mean."""

    fold: int | None = None
    short_side: int = 160
    jpeg_quality: int = 90


class _AnnotatedFrames(_ArrayRecordBuilder, skip_registration=True):
    """Official annotation CSVs over frame folders; subclasses name the layout (``official_csv.OFFICIAL_LAYOUTS``)."""

    LAYOUT = ""
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: the clips of python -m data_pipelines.build."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
The dataset's licence forbids redistribution: request it from its authors, then lay out the manual folder as
  annotations/      the official split folder (what `python -m data_pipelines.build NAME --annotations` takes:
                    split01..split05/{{train,test}}.csv, or train.csv/test.csv for FERV39k)
  ...               the clip frame folders the CSVs point to (any layout)
  {PATH_REMAP_FILE}    optional, one OLD=NEW per line: the CSVs hold the authors' absolute paths (e.g.
                    /mnt/data1/brain/AC/Dataset/DFEW=DFEW); a relative NEW is taken inside the manual folder
Relative clip paths in the CSVs are taken inside the manual folder too.
"""

    @classmethod
    def _fold_configs(cls, layout: str) -> list[AnnotatedFramesConfig]:
        folds = official_csv.OFFICIAL_LAYOUTS[layout].num_folds
        if not folds:
            return [AnnotatedFramesConfig(name="default", description="official train/test split")]
        return [AnnotatedFramesConfig(name=f"fold{k}", fold=k, description=f"official split{k:02d}")
                for k in range(1, folds + 1)]

    def _info(self) -> tfds.core.DatasetInfo:
        layout = official_csv.OFFICIAL_LAYOUTS[self.LAYOUT]
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "frames": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")),
                "label": tfds.features.ClassLabel(names=list(layout.class_names)),
                "clip_id": tfds.features.Text(),
                "source": tfds.features.Text(doc="the clip's path in the manual folder"),
            }),
            supervised_keys=("frames", "label"),
        )

    def _split_generators(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        try:
            plan = build_plans.plan_from_annotations(self._plan_args(manual))
        except build_plans.BuildConfigError as e:  # the layout is wrong: say what is expected
            raise build_plans.BuildConfigError(f"{self.name}: manual folder {manual}: {e}\n\n"
                                               f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}") from None
        prefix = f"fold{self.builder_config.fold}/" if self.builder_config.fold else ""
        splits = {name[len(prefix):]: ids for name, ids in plan.splits.items()
                  if name.startswith(prefix) and "/" not in name[len(prefix):]}
        inputs = {inp.clip_id: inp for inp in plan.inputs}
        for problem in plan.skipped:
            logging.warning("%s: skipped %s: %s", self.name, problem["input"], problem["reason"])
        return {split: self._generate_examples([inputs[c] for c in ids]) for split, ids in splits.items()}

    def _plan_args(self, manual: str) -> argparse.Namespace:
        remaps = []
        remap_file = os.path.join(manual, PATH_REMAP_FILE)
        if os.path.exists(remap_file):
            with open(remap_file, encoding="utf-8") as f:
                for line in f:
                    old, sep, new = line.strip().partition("=")
                    if sep and not line.lstrip().startswith("#"):
                        remaps.append(f"{old}={os.path.join(manual, os.path.expanduser(new))}")
        return argparse.Namespace(name=self.LAYOUT, annotations=os.path.join(manual, "annotations"),
                                  path_remap=remaps, classes=None, targets=None, unlabeled=False, root=manual,
                                  dataset_name=self.LAYOUT)

    def _generate_examples(self, inputs):
        cfg = self.builder_config
        options = clip_conversion.FrameOptions(
            short_side=cfg.short_side, jpeg_quality=cfg.jpeg_quality,
            frame_ext=official_csv.OFFICIAL_LAYOUTS[self.LAYOUT].frame_ext, fixed_crop=False, face_crop=False,
            face_margin=None, face_detect_every=None, max_frames=None, frame_stride=1)
        for inp in inputs:
            try:
                rec, _ = clip_conversion.convert_clip(inp, options)
            except clip_conversion.ClipSkipped as e:
                logging.warning("%s: skipped %s: %s", self.name, inp.path, e)
                continue
            yield inp.clip_id, {"frames": list(rec.frames), "label": inp.label, "clip_id": inp.clip_id,
                                "source": inp.path}


class Dfew(_AnnotatedFrames):
    """DFEW (7 classes, 5 folds) from its frame folders and official split CSVs."""

    LAYOUT = "dfew"
    BUILDER_CONFIGS = _AnnotatedFrames._fold_configs("dfew")


class Mafw(_AnnotatedFrames):
    """MAFW single-expression set (11 classes, 5 folds) from its PNG frame folders and official split CSVs."""

    LAYOUT = "mafw"
    BUILDER_CONFIGS = _AnnotatedFrames._fold_configs("mafw")


class Ferv39k(_AnnotatedFrames):
    """FERV39k (7 classes, one train/test split) from its frame folders and official split CSVs."""

    LAYOUT = "ferv39k"
    BUILDER_CONFIGS = _AnnotatedFrames._fold_configs("ferv39k")

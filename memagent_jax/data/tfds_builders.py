"""TFDS builders writing array_record files, readable without TensorFlow.

Three builders (``tfds.core.GeneratorBasedBuilder``), each taking its local inputs as builder
keyword arguments (nothing is downloaded):

- `RulerHotpotqa` ("ruler_hotpotqa"): configs ``n50`` .. ``n25600``; any N via a config name
  ``n{N}[_s{seed}][_q{max_questions}]``. Input: ``path`` (HotpotQA distractor JSON), optional
  ``filter_fn``. Stores paragraph *indices* per question plus ``pool.json`` in the dataset
  folder; `load_dataset` renders contexts on access.
- `MemagentRows` ("memagent_rows"): any config name. Input: ``path`` (.parquet / .jsonl rows).
- `RulerSynthetic` ("ruler_synthetic"): configs ``{task}_{target_tokens}`` for the evaluation
  grid; any ``{task}_{target_tokens}[_s{seed}][_k{num_samples}]``. Inputs: ``tokenizer``,
  optional ``essays_dir``, ``squad_path``.

The inputs are not part of the config name: building the same name with another file (or
tokenizer) into the same ``data_dir`` reuses the old files unless ``overwrite=True``.

Public entry points: ``build_dataset(name, config, data_dir, **inputs) -> path`` and
``load_dataset(name, config, data_dir) -> random-access source`` of sample dicts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from memagent_jax.data import hotpotqa as hq
from memagent_jax.data import memagent_rows, ruler_synthetic

_VERSION = tfds.core.Version("1.0.0")
POOL_FILE = "pool.json"


def _text() -> tfds.features.Text:
    return tfds.features.Text()


def _texts() -> tfds.features.Sequence:
    """A variable-length list of strings (e.g. the answers)."""
    return tfds.features.Sequence(tfds.features.Text())


@dataclasses.dataclass(eq=False)
class RulerHotpotqaConfig(tfds.core.BuilderConfig):
    """num_docs (N) documents per question; seed of the per-question shuffle; question cap."""

    num_docs: int = 200
    seed: int = 0
    max_questions: int | None = None


@dataclasses.dataclass(eq=False)
class RulerSyntheticConfig(tfds.core.BuilderConfig):
    """One RULER task at one target length: num_samples samples from seed."""

    task: str = "niah_single_1"
    target_tokens: int = 8192
    num_samples: int = 128
    seed: int = 0


def hotpotqa_config(
    num_docs: int, seed: int = 0, max_questions: int | None = None
) -> RulerHotpotqaConfig:
    """The config named ``n{N}[_s{seed}][_q{max}]``."""
    name = f"n{num_docs}" + (f"_s{seed}" if seed else "")
    name += f"_q{max_questions}" if max_questions else ""
    return RulerHotpotqaConfig(
        name=name, num_docs=num_docs, seed=seed, max_questions=max_questions
    )


def synthetic_config(
    task: str, target_tokens: int, seed: int = 0, num_samples: int = 128
) -> RulerSyntheticConfig:
    """The config named ``{task}_{target}[_s{seed}][_k{num_samples}]``."""
    ruler_synthetic.metric_for(task)  # validates the task name
    name = f"{task}_{target_tokens}" + (f"_s{seed}" if seed else "")
    name += f"_k{num_samples}" if num_samples != 128 else ""
    return RulerSyntheticConfig(
        name=name, task=task, target_tokens=target_tokens, num_samples=num_samples, seed=seed
    )


def _parse_hotpotqa(name: str) -> RulerHotpotqaConfig:
    m = re.fullmatch(r"n(\d+)(?:_s(\d+))?(?:_q(\d+))?", name)
    if not m:
        raise ValueError(
            f"ruler_hotpotqa config {name!r}: want 'n{{N}}[_s{{seed}}][_q{{max_questions}}]', "
            "e.g. 'n200'"
        )
    return hotpotqa_config(int(m[1]), int(m[2] or 0), int(m[3]) if m[3] else None)


def _parse_synthetic(name: str) -> RulerSyntheticConfig:
    m = re.fullmatch(r"(\w+?)_(\d+)(?:_s(\d+))?(?:_k(\d+))?", name)
    if not m:
        raise ValueError(
            f"ruler_synthetic config {name!r}: want "
            "'{task}_{target_tokens}[_s{seed}][_k{num_samples}]', e.g. 'niah_single_1_8192'"
        )
    return synthetic_config(m[1], int(m[2]), int(m[3] or 0), int(m[4] or 128))


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of builders whose inputs are local files: no download checksums.

    TFDS looks for a checksums file next to the builder's module through `code_path`, which for a
    builder inside a package needs the optional `importlib_resources` package; these builders
    download nothing, so there is no checksums file to find.
    """

    code_path = None


class RulerHotpotqa(_LocalBuilder):
    """RULER-HotpotQA from a local HotpotQA distractor file (see `memagent_jax.data.hotpotqa`)."""

    VERSION = _VERSION
    BUILDER_CONFIGS = [hotpotqa_config(n) for n in hq.EVAL_NUM_DOCS]

    def __init__(
        self,
        *,
        path: str | None = None,
        filter_fn: Callable[[dict], bool] | None = None,
        split: str = "test",
        **kwargs: Any,
    ):
        self._path, self._filter_fn, self._split = path, filter_fn, split
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="RULER-HotpotQA: paragraph indices per question (render with pool.json).",
            features=tfds.features.FeaturesDict({
                "id": _text(), "question": _text(), "answers": _texts(),
                "doc_indices": tfds.features.Tensor(shape=(None,), dtype=np.int64),
                "num_docs": np.int32,
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        if not self._path:
            raise ValueError(
                "ruler_hotpotqa needs path=<local HotpotQA distractor-format JSON file>"
            )
        cfg: RulerHotpotqaConfig = self.builder_config
        items = hq.load_hotpotqa(self._path)
        pool, records = hq.make_records(
            items, cfg.num_docs, seed=cfg.seed, filter_fn=self._filter_fn,
            max_questions=cfg.max_questions,
        )
        with open(os.path.join(os.fspath(self.data_path), POOL_FILE), "w", encoding="utf-8") as f:
            json.dump(pool, f, ensure_ascii=False)
        return {self._split: self._generate_examples(records)}

    def _generate_examples(self, records: Sequence[dict[str, Any]]):
        for k, r in enumerate(records):
            yield k, dict(r, doc_indices=np.asarray(r["doc_indices"], np.int64))


class MemagentRows(_LocalBuilder):
    """MemAgent rows (.parquet / .jsonl) from a local file; any config name."""

    VERSION = _VERSION
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="default")]

    def __init__(self, *, path: str | None = None, split: str = "test", **kwargs: Any):
        self._path, self._split = path, split
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="MemAgent released rows: question, answers, context, num_docs.",
            features=tfds.features.FeaturesDict({
                "id": _text(), "question": _text(), "answers": _texts(), "context": _text(),
                "num_docs": np.int32,
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        if not self._path:
            raise ValueError(
                "memagent_rows needs path=<local .parquet or .jsonl MemAgent row file>"
            )
        return {self._split: self._generate_examples(memagent_rows.read_rows(self._path))}

    def _generate_examples(self, samples: Sequence[dict[str, Any]]):
        yield from enumerate(samples)


class RulerSynthetic(_LocalBuilder):
    """RULER synthetic tasks (see `memagent_jax.data.ruler_synthetic`) for one tokenizer."""

    VERSION = _VERSION
    BUILDER_CONFIGS = [
        synthetic_config(t, n) for t in ruler_synthetic.TASKS for n in ruler_synthetic.EVAL_LENGTHS
    ]

    def __init__(
        self,
        *,
        tokenizer: Any = None,
        essays_dir: str | None = None,
        squad_path: str | None = None,
        split: str = "test",
        **kwargs: Any,
    ):
        if isinstance(tokenizer, (str, os.PathLike)):  # tokenizer=DIR from the command line
            from memagent_jax.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self._tokenizer, self._split = tokenizer, split
        self._essays_dir, self._squad_path = essays_dir, squad_path
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="RULER synthetic task samples fitted to a target token length.",
            features=tfds.features.FeaturesDict({
                "id": _text(), "task": _text(), "question": _text(), "answers": _texts(),
                "context": _text(), "depth": np.float32, "num_tokens": np.int32,
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        if self._tokenizer is None:
            raise ValueError(
                "ruler_synthetic needs tokenizer=DIR (tokenizer.json or tokenizer.model) or an "
                "object with encode(text) -> list[int]"
            )
        return {self._split: self._generate_examples()}

    def _generate_examples(self):
        cfg: RulerSyntheticConfig = self.builder_config
        samples = ruler_synthetic.generate_many(
            cfg.task, cfg.target_tokens, self._tokenizer, cfg.num_samples, seed=cfg.seed,
            essays_dir=self._essays_dir, squad_path=self._squad_path)
        yield from enumerate(samples)


BUILDERS: dict[str, tuple[type[_LocalBuilder], Callable[[str], tfds.core.BuilderConfig]]] = {
    "ruler_hotpotqa": (RulerHotpotqa, _parse_hotpotqa),
    "memagent_rows": (MemagentRows, lambda name: tfds.core.BuilderConfig(name=name)),
    "ruler_synthetic": (RulerSynthetic, _parse_synthetic),
}


ConfigArg = str | tfds.core.BuilderConfig | None


def _builder(name: str, config: ConfigArg, data_dir: str, **inputs: Any) -> _LocalBuilder:
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(BUILDERS)}")
    cls, parse = BUILDERS[name]
    if isinstance(config, str) and config not in cls.builder_configs:
        config = parse(config)
    return cls(config=config, data_dir=os.fspath(data_dir), **inputs)


def build_dataset(
    name: str,
    config: ConfigArg,
    data_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    **inputs: Any,
) -> str:
    """Prepare dataset `name`/`config` as array_record files under `data_dir`; returns its folder.

    `inputs` are the builder's local inputs (path=..., tokenizer=..., filter_fn=..., split=...);
    `tokenizer` may be a folder. An already prepared dataset is reused unless `overwrite`. A
    build that fails leaves no folder behind that it created.
    """
    existed = _existing_dirs(Path(data_dir))
    try:
        builder = _builder(name, config, os.fspath(data_dir), **inputs)
        mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
        if overwrite:
            mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(download_mode=mode),
        )
    except BaseException:
        _remove_new_dirs(Path(data_dir), existed)
        raise
    return os.fspath(builder.data_path)


def _existing_dirs(root: Path, depth: int = 4) -> set[Path]:
    """Folders under `root` (and `root`) down to `depth` levels: name/config/version/..."""
    if not root.is_dir():
        return set()
    found, level = {root}, [root]
    for _ in range(depth):
        level = [c for d in level for c in d.iterdir() if c.is_dir()]
        found.update(level)
    return found


def _remove_new_dirs(root: Path, existed: set[Path]) -> None:
    """Removes the top-most folders under `root` (or `root` itself) that `existed` lacks."""
    import shutil

    for d in sorted(_existing_dirs(root), key=lambda p: len(p.parts)):
        if d not in existed and d.exists() and (d == root or d.parent in existed):
            shutil.rmtree(d, ignore_errors=True)


def _to_python(x: Any) -> Any:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        return [_to_python(v) for v in x] if x.dtype == object else x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (list, tuple)):
        return [_to_python(v) for v in x]
    if isinstance(x, dict):
        return {k: _to_python(v) for k, v in x.items()}
    return x


class SampleSource:
    """Random-access source of sample dicts over a TFDS array_record split (len, __getitem__).

    With a `pool`, records hold ``doc_indices`` and contexts are rendered on access.
    """

    def __init__(self, source: Sequence[Any], pool: Sequence[str] | None = None):
        self._source, self._pool = source, pool

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        rec = _to_python(self._source[i % len(self)])
        return hq.render_sample(rec, self._pool) if self._pool is not None else rec

    def __repr__(self) -> str:
        return f"SampleSource({self._source!r}, {len(self)} samples)"


def load_dataset(
    name: str, config: ConfigArg, data_dir: str | os.PathLike[str], *, split: str | None = None
) -> SampleSource:
    """The prepared dataset `name`/`config` as a random-access source of sample dicts."""
    builder = _builder(name, config, os.fspath(data_dir))
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{name}/{builder.builder_config.name} is not prepared under {data_dir}; "
            f"run build_dataset({name!r}, {builder.builder_config.name!r}, data_dir, ...) first"
        )
    splits = list(builder.info.splits.keys())
    if split is None:
        if len(splits) != 1:
            raise ValueError(f"{name}: choose a split among {splits}")
        split = splits[0]
    source = builder.as_data_source(split=split)
    pool = None
    if name == "ruler_hotpotqa":
        with open(os.path.join(os.fspath(builder.data_path), POOL_FILE), encoding="utf-8") as f:
            pool = json.load(f)
    return SampleSource(source, pool)

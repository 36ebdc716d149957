"""What every evaluation harness shares: model and decoding options, sharding, and resumable generation.

A harness (``eval.vg``, ``eval.vipbench``, ...) owns what is particular to its benchmark: a loader that
validates the whole input before anything is generated, the :class:`~gpt4roi_sft.infer.RegionRequest` of
each item, the payload stored per answer, and the scoring. Everything around generation lives here:

- :class:`HarnessConfig`: the fields every harness config has (subclass it, ``kw_only``);
- :func:`add_model_args`, :func:`add_shard_args`, :func:`config_kwargs`, :func:`setup_run`: the command-line
  options behind those fields, and turning parsed options into them;
- :func:`captioner_for` / :func:`captioner_from_args`: the model the options name, loaded on first use only,
  decoding on the fast path (static KV cache, compiled decode step; ``--eager`` for plain ``generate``);
- :func:`shard`, :func:`open_store`, :func:`merge_shards`, :func:`require_complete`: one resumable
  :class:`~eval.prediction_store.PredictionStore` per shard (``OUT/<name>`` for one process,
  ``OUT/shards/<stem>.shard-III-of-KKK<suffixes>`` for several) and their merge;
- :func:`generate_missing`: answer what a store lacks, batch by batch (longest prompts first, ``--batch-size
  auto`` sized from free device memory, when the captioner can plan: :meth:`RegionCaptioner.plan`).

Every store the kit opens is tied to what produces its answers (:func:`run_setup`): the fingerprints of the
model and adapter weights (:func:`gpt4roi_sft.provenance.weights_fingerprint`), the decode settings, the
template, the harness's own settings (prompt, mode) and the SHA-256 of its input files. Resuming into a store
written by another setup is a one-line error naming what changed; ``--overwrite`` starts it afresh. The model
must exist whenever answers may be generated, even if every answer is already stored. A harness adopts all of
it with one call, :func:`open_store` (``inputs={"annotations": path}``, ``settings={"prompt": ...}``), and
puts :func:`provenance` of the store in its reports.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from dataclasses import asdict
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, TypeVar, Union

from eval.prediction_store import PredictionStore, describe_changes
from gpt4roi_sft.errors import ConfigError, DataError
from gpt4roi_sft.infer import GPT4ROI_TEMPERATURE, Captioner, DecodeSettings, RegionRequest
from gpt4roi_sft.provenance import describe_model, file_sha256

logger = logging.getLogger(__name__)

Item = TypeVar("Item")


@dataclass(kw_only=True)
class HarnessConfig:
    """The fields every harness config has: where results go, which model generates them and how."""

    out: Path
    model: Optional[Path] = None
    adapter: Optional[Path] = None
    template: str = "gpt4roi_v0"
    batch_size: Union[int, str] = "auto"  # prompts per batch, or "auto": from free device memory
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    eager: bool = False  # plain `generate` instead of the static-cache, compiled decode path
    shard_id: int = 0
    num_shards: int = 1
    overwrite: bool = False  # a store written by another setup starts afresh instead of being refused


# ---------------------------------------------------------------------------------------- command line
def batch_size_arg(text: str) -> Union[int, str]:
    """``--batch-size``: a positive number of prompts, or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def add_model_args(parser: argparse.ArgumentParser, *, batch_size: Union[int, str] = "auto",
                   max_new_tokens: int = 128) -> None:
    """``--model --adapter --template --batch-size --eager --max-new-tokens --do-sample --temperature
    --strip-prefix --seed``."""
    parser.add_argument("--model", type=Path, help="model directory (gpt4roi_sft.load_model)")
    parser.add_argument("--adapter", type=Path, help="LoRA adapter directory, merged into the model in memory")
    parser.add_argument("--template", default="gpt4roi_v0")
    parser.add_argument("--batch-size", type=batch_size_arg, default=batch_size,
                        help="prompts per batch, or 'auto' (default): as many as free GPU memory holds, at most 256 "
                             "(8 on the CPU)")
    parser.add_argument("--eager", action="store_true",
                        help="decode with plain generate (dynamic KV cache, nothing compiled) instead of the static "
                             "KV cache with a compiled decode step")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--do-sample", action="store_true", help="sample (GPT4RoI: temperature 0.2) instead of greedy")
    parser.add_argument("--temperature", type=float, default=GPT4ROI_TEMPERATURE)
    parser.add_argument("--strip-prefix", action="store_true", help="keep the text after the first ': ' (GPT4RoI's eval)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling (with --do-sample)")
    parser.add_argument("--overwrite", action="store_true",
                        help="when --out holds results of another model or setting, discard them and start afresh "
                             "(results of this same setup are kept and resumed either way)")


def add_shard_args(parser: argparse.ArgumentParser) -> None:
    """``--shard-id I --num-shards K`` (each process answers every K-th item) and ``--merge``."""
    parser.add_argument("--shard-id", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--merge", action="store_true", help="join the shards' predictions and score them")
    parser.add_argument("--score-only", action="store_true",
                        help="score the predictions already in --out (all --num-shards shards); needs no model or GPU")


def merge_word_to_flag(argv: Sequence[str]) -> List[str]:
    """``merge --out ...`` (the merge step written as a sub-command) -> ``--out ... --merge``."""
    argv = list(argv)
    return argv[1:] + ["--merge"] if argv[:1] == ["merge"] else argv


def decode_settings_from_args(args: argparse.Namespace) -> DecodeSettings:
    return DecodeSettings(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                          temperature=args.temperature, strip_prefix=args.strip_prefix)


def config_kwargs(args: argparse.Namespace) -> dict:
    """The :class:`HarnessConfig` fields from options added by :func:`add_model_args` (and :func:`add_shard_args`)."""
    kwargs = dict(out=args.out, model=args.model, adapter=args.adapter, template=args.template,
                  batch_size=args.batch_size, decode=decode_settings_from_args(args), eager=args.eager,
                  overwrite=args.overwrite)
    if hasattr(args, "shard_id"):
        kwargs.update(shard_id=args.shard_id, num_shards=args.num_shards)
    return kwargs


def setup_run(args: argparse.Namespace) -> None:
    """What every harness main does after parsing: logging, option checks, the sampling seed."""
    from gpt4roi_sft.console import setup_cli_logging

    setup_cli_logging()
    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be at least 1")
    if hasattr(args, "shard_id"):
        check_shard(args.shard_id, args.num_shards)
    if args.do_sample:
        import torch

        torch.manual_seed(args.seed)


# ------------------------------------------------------------------------------------------- the model
class LazyCaptioner:
    """The captioner of ``config.model`` (+ ``config.adapter``, merged in memory), loaded on first use.

    A finished (or merging) run never pays for loading the model; without ``--model`` the first call
    is a :class:`ConfigError`. It decodes on the fast path unless ``config.eager``.
    """

    def __init__(self, config: HarnessConfig):
        self.config = config
        self._captioner = None

    @property
    def captioner(self):
        if self._captioner is None:
            c = self.config
            if c.model is None:
                raise ConfigError("--model is required to generate predictions")
            from gpt4roi_sft.fast_decode import FastDecoding
            from gpt4roi_sft.infer import load_captioner

            self._captioner = load_captioner(str(c.model), c.template, c.decode,
                                             adapter_dir=str(c.adapter) if c.adapter else None,
                                             fast=None if c.eager else FastDecoding())
        return self._captioner

    def __call__(self, requests: Sequence[RegionRequest]) -> List[str]:
        return self.captioner(requests)

    @property
    def needs_masks(self) -> bool:
        """Whether requests must carry masks (a mask-aware ``region_mode``); reading it loads the model."""
        return getattr(self.captioner, "needs_masks", False)

    def plan(self, requests: Sequence[RegionRequest], batch_size: Union[int, str]) -> List[List[int]]:
        return self.captioner.plan(requests, batch_size)


def captioner_for(config: HarnessConfig) -> Captioner:
    return LazyCaptioner(config)


def captioner_from_args(args: argparse.Namespace) -> Captioner:
    """The captioner named by :func:`add_model_args` options (loaded on first use)."""
    return LazyCaptioner(HarnessConfig(**config_kwargs(args)))


# -------------------------------------------------------------------------------------- shards, stores
def check_shard(shard_id: int, num_shards: int) -> None:
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ConfigError(f"--shard-id {shard_id} --num-shards {num_shards}: need 0 <= shard-id < num-shards")


def shard(items: Sequence[Item], shard_id: int, num_shards: int) -> List[Item]:
    """Items of shard ``shard_id`` of ``num_shards``: every ``num_shards``-th, by index."""
    check_shard(shard_id, num_shards)
    return list(items[shard_id::num_shards])


def store_path(out: Path, name: str, shard_id: int = 0, num_shards: int = 1) -> Path:
    """``out/name`` for one process; ``out/shards/<stem>.shard-III-of-KKK<suffixes>`` for shard III of KKK."""
    if num_shards == 1:
        return Path(out) / name
    stem, dot, rest = name.partition(".")
    return Path(out) / "shards" / f"{stem}.shard-{shard_id:03d}-of-{num_shards:03d}{dot}{rest}"


def run_setup(config: HarnessConfig, inputs: Optional[Mapping[str, Path]] = None,
              settings: Optional[Mapping[str, object]] = None, model_required: bool = True) -> tuple:
    """``(setup, produced_by)`` of a run: what is compared on resume, and the description beside it.

    ``setup``: the weights fingerprints of ``config.model`` and ``config.adapter``, the decode settings, the
    template, ``settings`` (the harness's own: prompt, mode, ...) and the SHA-256 of each file in ``inputs``.
    ``produced_by``: the model and adapter paths, fingerprints and the training step they were exported at.
    A model or adapter directory that does not exist is a :class:`ConfigError`; so is no ``--model`` at all
    when ``model_required`` (a run that may generate; a test that brings its own captioner passes ``False``).
    """
    if config.model is None and model_required:
        raise ConfigError("--model is required to generate predictions (or score what --out holds: --score-only)")
    model = describe_model(config.model, "model")
    adapter = describe_model(config.adapter, "adapter")
    setup = {
        "model": model["fingerprint"] if model else None,
        "adapter": adapter["fingerprint"] if adapter else None,
        "template": config.template,
        "decode": asdict(config.decode),
        "settings": dict(settings or {}),
        "inputs": {key: file_sha256(path) for key, path in (inputs or {}).items()},
    }
    return setup, {"model": model, "adapter": adapter}


def open_store(config: HarnessConfig, name: str, *, inputs: Optional[Mapping[str, Path]] = None,
               settings: Optional[Mapping[str, object]] = None, model_required: bool = True) -> PredictionStore:
    """The resumable store of this config's shard, tied to the run's :func:`run_setup`.

    A store written by another setup is refused with a one-line error naming what changed, or started afresh
    with ``config.overwrite``.
    """
    setup, produced_by = run_setup(config, inputs, settings, model_required)
    return PredictionStore(store_path(config.out, name, config.shard_id, config.num_shards), setup,
                           produced_by=produced_by, overwrite=config.overwrite)


def provenance(store: PredictionStore) -> dict:
    """``{"setup", "produced_by"}`` of a store: what reports write beside their scores."""
    return {"setup": store.metadata, "produced_by": store.produced_by}


def model_line(provenance: Optional[dict]) -> Optional[str]:
    """``model: PATH (weights 1a2b..., exported at step 700)``: which model the scores belong to."""
    about = ((provenance or {}).get("produced_by") or {})
    parts = []
    for what in ("model", "adapter"):
        m = about.get(what)
        if m:
            step = f", exported at step {m['step']}" if m.get("step") is not None else ""
            parts.append(f"{what}: {m['path']} (weights {m['fingerprint']}{step})")
    return "; ".join(parts) or None


def merge_shards(out: Path, name: str, num_shards: int) -> Dict[str, dict]:
    """Join the stores of all ``num_shards`` shards (first record of an id wins)."""
    records: Dict[str, dict] = {}
    for i in range(num_shards):
        path = store_path(out, name, i, num_shards)
        if not path.exists():
            raise DataError(f"{path}: shard {i} of {num_shards} has written nothing; run it before merging")
        for key, rec in PredictionStore(path).records.items():
            records.setdefault(key, rec)
    return records


def merged_provenance(out: Path, name: str, num_shards: int) -> dict:
    """:func:`provenance` shared by every shard's store; shards written by different setups are a :class:`DataError`."""
    first: Optional[PredictionStore] = None
    for i in range(num_shards):
        store = PredictionStore(store_path(out, name, i, num_shards))
        if first is None:
            first = store
        elif store.metadata != first.metadata:
            raise DataError(f"{store.path}: written by another setup than {first.path} "
                            f"({describe_changes(first.metadata, store.metadata or {})}); rerun that shard with the "
                            f"same options (and --overwrite)")
    return provenance(first) if first is not None else {"setup": None, "produced_by": None}


def require_complete(keys: Iterable[str], records: Dict[str, dict], out: Path) -> None:
    """A :class:`DataError` naming how many of ``keys`` have no record yet (a shard not run or not finished)."""
    missing = [k for k in keys if str(k) not in records]
    if missing:
        raise DataError(f"{out}: {len(missing)} sample(s) have no prediction yet (e.g. {missing[:5]}); "
                        f"run the missing shards first")


# ------------------------------------------------------------------------------------------ generation
def generate_missing(items: Sequence[Item], store: PredictionStore, captioner: Captioner, *,
                     key: Callable[[Item], str], request: Callable[[Item], RegionRequest],
                     payload: Callable[[Item, RegionRequest, str], dict], batch_size: Union[int, str],
                     desc: str) -> int:
    """Answer every item whose ``key`` is not in ``store``, batch by batch; return how many were answered.

    A captioner with a ``plan(requests, batch_size)`` method (:class:`~gpt4roi_sft.infer.RegionCaptioner`)
    orders the batches (longest prompts first) and sizes them (``"auto"``); any other callable gets the items
    in order, ``batch_size`` at a time (8 for ``"auto"``). Each batch is stored (and fsynced) before the next
    starts, so a killed run loses at most one batch.
    """
    from tqdm import tqdm

    todo = [it for it in items if key(it) not in store]
    if todo and len(todo) < len(items):
        logger.info("resuming: %d of %d items already done", len(items) - len(todo), len(items))
    if not todo:
        return 0
    requests = [request(it) for it in todo]
    plan = getattr(captioner, "plan", None)
    if plan is not None:
        batches = plan(requests, batch_size)
    else:
        rows = 8 if batch_size == "auto" else int(batch_size)
        batches = [list(range(start, min(start + rows, len(todo)))) for start in range(0, len(todo), rows)]
    with tqdm(total=len(todo), desc=desc, unit="item") as progress:
        for batch in batches:
            asked = [requests[i] for i in batch]
            answers = captioner(asked)
            if len(answers) != len(batch):
                raise RuntimeError(f"captioner returned {len(answers)} answers for {len(batch)} requests")
            store.append((key(todo[i]), payload(todo[i], r, a)) for i, r, a in zip(batch, asked, answers))
            progress.update(len(batch))
    return len(todo)

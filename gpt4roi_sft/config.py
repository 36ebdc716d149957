"""The training configuration: one typed schema, loaded from YAML and overridden by ``key=value``.

Every key a recipe may set is a dataclass field below; an unknown key or a value of the wrong type fails at
start-up with the key's dotted name, before any process spawns or any weight loads. ``validate_for_launch``
adds the checks that need the file system (data files, model and DeepSpeed config exist) and the
combinations that cannot work (QLoRA with ZeRO-3).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from gpt4roi_sft.conversation import TEMPLATES
from gpt4roi_sft.errors import ConfigError

FREEZE_PRESETS = ("none", "stage1", "stage2", "llm")
COMPILE_PARTS = ("decoder_layers", "region_encoder", "vision_layers")
DEFAULT_PACKED_MULTIPLE = 128
PRECISIONS = ("bf16", "fp32")
ENGINES = ("deepspeed", "torch")
SCHEDULERS = ("cosine", "linear", "constant")


@dataclass
class ModelSection:
    path: str = ""  # our saved dir, a llava-hf dir, an original-LLaVA dir, or an LLM dir (with vision_tower)
    vision_tower: Optional[str] = None  # CLIP directory when `path` is a bare LLM
    # None: flash_attention_2 if flash_attn imports, else sdpa; torch_varlen: packed rows through PyTorch's varlen
    # flash kernel (gpt4roi_sft.model.varlen_attention), sdpa elsewhere
    attn_implementation: Optional[str] = None
    gradient_checkpointing: bool = False
    # with gradient_checkpointing: checkpoint every n-th LLM decoder layer only (1: all; 2: half of them, about half
    # the activation memory of none for half the recompute); a trained vision tower stays checkpointed throughout
    checkpoint_every: int = 1
    freeze: str = "stage2"  # none: train all; stage1: region encoder only; stage2: all but the vision tower; llm: LLM frozen
    # Throughput levers (gpt4roi_sft.train.speedups); none changes what is computed, each is off until measured.
    liger_kernel: bool = False  # Liger's Triton RMSNorm, RoPE, SwiGLU and fused linear cross-entropy in the LLM (CUDA)
    compile: List[str] = field(default_factory=list)  # regional torch.compile: decoder_layers, region_encoder, vision_layers
    channels_last: bool = False  # region encoder convolutions on channels-last activations


@dataclass
class DataSection:
    train: str = ""  # "a.jsonl" or "a.jsonl:0.7,b.jsonl:0.3" (mixing ratios)
    image_root: str = ""  # image paths in the records are relative to it
    template: str = "gpt4roi_v0"  # a name in gpt4roi_sft.conversation.TEMPLATES
    max_length: int = 2048
    packing: bool = False
    pack_tokens: int = 0  # > 0: each micro-batch holds samples up to this many tokens (packed; implies packing)
    pad_to_multiple: Optional[int] = None  # row widths rounded up to a multiple; None: 128 when packing, else 1
    group_by_length: bool = False
    load_masks: bool = False
    skip_bad_records: bool = False
    validate_on_start: bool = True  # scan every record before training (fails fast on bad data)
    num_workers: int = 0

    @property
    def packed(self) -> bool:
        """Whether micro-batches are packed rows (``packing``, or a ``pack_tokens`` budget)."""
        return self.packing or self.pack_tokens > 0

    @property
    def row_multiple(self) -> int:
        """What row widths are rounded up to: ``pad_to_multiple``, else 128 for packed rows and 1 for padded ones."""
        if self.pad_to_multiple is not None:
            return self.pad_to_multiple
        return DEFAULT_PACKED_MULTIPLE if self.packed else 1


@dataclass
class TrainSection:
    output_dir: str = ""
    max_steps: int = -1  # optimizer steps; -1: derived from num_epochs
    num_epochs: float = 1.0
    micro_batch_size: int = 1  # per process
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "bf16"
    seed: int = 0
    save_steps: int = 500
    save_total_limit: int = 2
    log_steps: int = 1
    tensorboard: bool = True
    # deepspeed: ZeRO-1/2/3 on any number of processes (deepspeed.config); torch: one process without DeepSpeed,
    # the same update in fewer host operations (gpt4roi_sft.train.torch_engine)
    engine: str = "deepspeed"


@dataclass
class LoraSection:
    enabled: bool = False
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: str = "all-linear"  # "all-linear", or comma-separated module names (q_proj,v_proj), LLM only
    modules_to_save: List[str] = field(default_factory=lambda: ["region_encoder", "multi_modal_projector"])
    qlora: bool = False  # 4-bit (bitsandbytes NF4) frozen base


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero2.json"
    # Set on top of the JSON after its "auto" values: "zero_optimization.overlap_comm=false", value parsed as YAML.
    overrides: List[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path) -> None:
        from gpt4roi_sft.atomic import write_text_atomic

        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def data_sources(self) -> List[Tuple[str, float]]:
        """``data.train`` as [(path, ratio)], ratios as written (1.0 where none is given)."""
        return parse_data_sources(self.data.train)


def parse_data_sources(spec: str) -> List[Tuple[str, float]]:
    sources = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        path, ratio = part, 1.0
        head, sep, tail = part.rpartition(":")
        if sep and head:
            try:
                ratio = float(tail)
                path = head
            except ValueError:
                path, ratio = part, 1.0
        if ratio <= 0:
            raise ConfigError(f"data.train: mixing ratio of {path!r} must be positive, got {ratio}")
        sources.append((path, ratio))
    return sources


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; allow int -> float and a comma string -> list."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin in (list, List):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 2e-5 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls, data: Dict[str, Any], prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {key!r} (known keys under {prefix or 'the top level'}: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _check_choices(cfg: Config) -> None:
    for key, value, choices in (
        ("model.freeze", cfg.model.freeze, FREEZE_PRESETS),
        ("data.template", cfg.data.template, TEMPLATES),
        ("train.precision", cfg.train.precision, PRECISIONS),
        ("train.lr_scheduler", cfg.train.lr_scheduler, SCHEDULERS),
        ("train.engine", cfg.train.engine, ENGINES),
    ):
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
    for key, value in (
        ("train.micro_batch_size", cfg.train.micro_batch_size),
        ("train.gradient_accumulation_steps", cfg.train.gradient_accumulation_steps),
        ("train.save_steps", cfg.train.save_steps),
        ("train.save_total_limit", cfg.train.save_total_limit),
        ("data.max_length", cfg.data.max_length),
        ("train.log_steps", cfg.train.log_steps),
        ("lora.r", cfg.lora.r),
        ("model.checkpoint_every", cfg.model.checkpoint_every),
    ):
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if cfg.data.pad_to_multiple is not None and cfg.data.pad_to_multiple < 1:
        raise ConfigError(f"data.pad_to_multiple: must be >= 1, got {cfg.data.pad_to_multiple}")
    if cfg.data.pack_tokens < 0:
        raise ConfigError(f"data.pack_tokens: must be 0 (off) or a number of tokens, got {cfg.data.pack_tokens}")
    if 0 < cfg.data.pack_tokens < cfg.data.max_length:
        raise ConfigError(f"data.pack_tokens: {cfg.data.pack_tokens} is less than data.max_length={cfg.data.max_length}; "
                          "every sample must fit one micro-batch")
    if cfg.model.checkpoint_every > 1 and not cfg.model.gradient_checkpointing:
        raise ConfigError(f"model.checkpoint_every={cfg.model.checkpoint_every} needs model.gradient_checkpointing=true")
    unknown = sorted(set(cfg.model.compile) - set(COMPILE_PARTS))
    if unknown:
        raise ConfigError(f"model.compile: unknown part(s) {', '.join(unknown)}; choose from {', '.join(COMPILE_PARTS)}")
    for item in cfg.deepspeed.overrides:
        parse_deepspeed_override(item)
    if cfg.train.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate: must be positive, got {cfg.train.learning_rate}")
    if not 0 <= cfg.train.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio: must be in [0, 1), got {cfg.train.warmup_ratio}")
    if cfg.lora.qlora and not cfg.lora.enabled:
        raise ConfigError("lora.qlora: QLoRA trains LoRA adapters on a 4-bit base; set lora.enabled=true too")
    if cfg.train.engine == "torch":
        if cfg.lora.qlora:
            raise ConfigError("train.engine=torch: lora.qlora trains on train.engine=deepspeed only (its 4-bit base is "
                              "untested on the torch engine)")
        if cfg.deepspeed.overrides:
            raise ConfigError(f"deepspeed.overrides {cfg.deepspeed.overrides[0]!r}: train.engine=torch runs without "
                              "DeepSpeed, so it would change nothing; drop it or use train.engine=deepspeed")


def parse_override(item: str) -> Tuple[List[str], Any]:
    """``"train.max_steps=20"`` -> (["train", "max_steps"], 20); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    # Paths such as "a.jsonl:0.7" must stay strings even if YAML reads them otherwise.
    if isinstance(value, (dict,)):
        value = raw
    return parts, value


def parse_deepspeed_override(item: str) -> Tuple[List[str], Any]:
    """``"zero_optimization.overlap_comm=false"`` -> (["zero_optimization", "overlap_comm"], False).

    The value is read as JSON (so ``5e8`` is a number), else as YAML, else kept as the string.
    """
    key, sep, raw = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not sep or not parts:
        raise ConfigError(f"deepspeed.overrides: {item!r} must look like section.key=value")
    try:
        return parts, json.loads(raw)
    except json.JSONDecodeError:
        pass
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_deepspeed_overrides(ds_config: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """``ds_config`` (changed in place and returned) with every ``deepspeed.overrides`` item set."""
    for item in overrides:
        parts, value = parse_deepspeed_override(item)
        _set_path(ds_config, parts, value, f"deepspeed.overrides: {item!r}", "a section of the DeepSpeed config")
    return ds_config


def _set_path(tree: Dict[str, Any], parts: List[str], value: Any, where: str, section: str = "a section") -> None:
    """``tree[parts[0]][parts[1]]... = value``, making sections on the way; a leaf in the way is an error."""
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {part!r} is not {section}")
    node[parts[-1]] = value


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: Dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader itself refuses an unhashable key, with its position
            if key in seen:
                raise ConfigError(f"{self.name}: line {line}: duplicate key {key!r} (first given on line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_recipe(path: str) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte {exc.start}: {raw[exc.start]:#04x})") from None
    loader = _RecipeLoader(text)
    loader.name = str(path)  # what its messages name, as for a file stream
    try:
        data = loader.get_single_data() or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Read a YAML recipe (or start from defaults), apply ``key=value`` overrides, and type-check it all."""
    data: Dict[str, Any] = _read_recipe(path) if path else {}
    for item in overrides or []:
        parts, value = parse_override(item)
        _set_path(data, parts, value, f"override {item!r}")
    cfg = _build(Config, data, "")
    _check_choices(cfg)
    return cfg


def load_deepspeed_json(path: str) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed.config: file not found: {path}")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed.config: {path} is not valid JSON: {exc}") from None


def zero_stage(ds_config: Dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def validate_for_launch(cfg: Config) -> None:
    """Checks that need the file system and cross-section rules; all fail with the key's name."""
    if not cfg.model.path:
        raise ConfigError("model.path: required (a model directory)")
    if not Path(cfg.model.path).is_dir():
        raise ConfigError(f"model.path: directory not found: {cfg.model.path}")
    if cfg.model.vision_tower and not Path(cfg.model.vision_tower).is_dir():
        raise ConfigError(f"model.vision_tower: directory not found: {cfg.model.vision_tower}")
    if not cfg.data.train:
        raise ConfigError("data.train: required (one JSONL file or a comma-separated list)")
    for path, _ in cfg.data_sources():
        if not Path(path).is_file():
            raise ConfigError(f"data.train: file not found: {path}")
    if cfg.data.image_root and not Path(cfg.data.image_root).is_dir():
        raise ConfigError(f"data.image_root: directory not found: {cfg.data.image_root}")
    if not cfg.train.output_dir:
        raise ConfigError("train.output_dir: required")
    if Path(cfg.train.output_dir).exists() and not Path(cfg.train.output_dir).is_dir():
        raise ConfigError(f"train.output_dir: {cfg.train.output_dir} exists and is not a directory")
    if cfg.train.max_steps < 1 and cfg.train.num_epochs <= 0:
        raise ConfigError("train.max_steps or train.num_epochs must be positive")
    if cfg.train.engine == "deepspeed":
        check_deepspeed_combinations(cfg)
    check_first_images(cfg)


def check_deepspeed_combinations(cfg: Config) -> None:
    """What the DeepSpeed JSON's ZeRO stage rules out (read with ``deepspeed.overrides`` applied)."""
    ds = apply_deepspeed_overrides(load_deepspeed_json(cfg.deepspeed.config), cfg.deepspeed.overrides)
    if cfg.lora.qlora and zero_stage(ds) == 3:
        raise ConfigError(
            f"lora.qlora with {cfg.deepspeed.config} (ZeRO-3): 4-bit bitsandbytes weights cannot be partitioned "
            "by ZeRO-3; use ds_configs/zero2.json (or zero1) for QLoRA"
        )
    if cfg.model.liger_kernel and zero_stage(ds) == 3:
        raise ConfigError(
            f"model.liger_kernel with {cfg.deepspeed.config} (ZeRO-3): the fused linear cross-entropy reads the output "
            "head's weight outside its module, which ZeRO-3 partitions; use ds_configs/zero2.json (or zero1)"
        )


IMAGE_CHECK_RECORDS = 5


def check_first_images(cfg: Config, records: int = IMAGE_CHECK_RECORDS) -> None:
    """The images of the first ``records`` records of each ``data.train`` file exist under ``data.image_root``.

    A quick check, so a wrong image root fails at launch rather than after the model has loaded (the dataset's
    ``validate_on_start`` scan checks every record later). Lines that do not parse, as JSON or as UTF-8, are left to
    that scan, which names their file and line; the file is read as bytes, since a text-mode reader decodes ahead
    and would fail on bad bytes anywhere in its first buffer, with a traceback.
    """
    import itertools

    root = Path(cfg.data.image_root) if cfg.data.image_root else Path(".")
    for path, _ in cfg.data_sources():
        with open(path, "rb") as fh:
            for lineno, line in enumerate(itertools.islice(fh, records), start=1):
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                image = record.get("image") if isinstance(record, dict) else None
                if isinstance(image, str) and image and not (root / image).is_file():
                    raise ConfigError(f"data.image_root: {path} line {lineno} names image {image!r}, but "
                                      f"{root / image} does not exist (is data.image_root={cfg.data.image_root!r} "
                                      f"the folder the records' image paths are relative to?)")


def describe_keys() -> List[Tuple[str, str, Any]]:
    """(dotted key, type, default) for every key; used by the README and `train_sft.py --help-config`."""
    rows = []
    for section in dataclasses.fields(Config):
        sec_cls = typing.get_type_hints(Config)[section.name]
        hints = typing.get_type_hints(sec_cls)
        default_obj = sec_cls()
        for f in dataclasses.fields(sec_cls):
            rows.append((f"{section.name}.{f.name}", _type_name(hints[f.name]), getattr(default_obj, f.name)))
    return rows


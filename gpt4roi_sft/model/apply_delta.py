"""Apply GPT4RoI's released delta (``shilongz/GPT4RoI-7B-delta-V0``) to LLaMA-7B, one shard at a time.

    python -m gpt4roi_sft.model.apply_delta --base LLAMA_7B_DIR --delta GPT4ROI_DELTA_DIR --out GPT4RoI-7B \
        [--vision-tower CLIP_VIT_L_14_DIR] [--max-shard-size 2GB]

The arithmetic is GPT4RoI's ``scripts/apply_delta.py``: for every weight of the delta, ``delta + base`` in the
delta's dtype (the base cast to it); ``model.embed_tokens`` and ``lm_head`` hold 32006 rows in the delta and
32000 in LLaMA, so the base is added to the first 32000 rows and the six added rows are kept; the projector
(``model.mm_projector.*``) and region module (``model.spi_module.*``) are stored whole in the delta and copied.
Unlike that script nothing is loaded whole: tensors are read one by one (safetensors, or memory-mapped
``.bin`` shards) and written to safetensors shards of at most ``--max-shard-size``, so memory stays near one
output shard. Either directory may be sharded (``*.index.json``) or not, in either format. Rotary
``inv_freq`` buffers that old checkpoints carry are dropped (``transformers`` computes them).

The tokenizer written is GPT4RoI's training tokenizer rebuilt from the SentencePiece model
(:mod:`gpt4roi_sft.model.gpt4roi_tokenizer`): LLaMA's 32000 pieces followed by ``[PAD]``, ``<im_patch>``,
``<bbox>``, ``<point>``, ``<im_start>``, ``<im_end>`` (ids 32000..32005), as many tokens as the embedding has
rows. GPT4RoI's training script adds ``[PAD]`` only when the base tokenizer has no pad token, so a LLaMA/Vicuna
tokenizer that defines one yields 32005 tokens against 32006 rows (jshilong/GPT4RoI#16); here ``[PAD]``
is always the first added token. The output is an original-LLaVA-format directory that
:func:`gpt4roi_sft.load_model` opens in GPT4RoI's layout (``--vision-tower`` is written into its config, else
pass it when loading); ``python -m gpt4roi_sft.model.convert_gpt4roi`` turns it into this project's format.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import shutil
from typing import Dict, List, Optional, Tuple

import torch

from gpt4roi_sft.atomic import write_json_atomic
from gpt4roi_sft.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

ROW_KEYS = ("model.embed_tokens.weight", "lm_head.weight")  # vocabulary rows: delta may have more than base
WHOLE_PREFIXES = ("model.mm_projector.", "model.spi_module.")  # stored whole in the delta, no base counterpart
_SKIPPED = re.compile(r"\.rotary_emb\.inv_freq$")


class DeltaError(UserError, ValueError):
    """The base and the delta do not fit together (missing or extra weights, shapes)."""


def parse_size(text: str) -> int:
    """``"2GB"``, ``"500MB"``, ``"100KB"`` or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise ConfigError(f"--max-shard-size {text!r}: expected a size such as 2GB, 500MB or 100KB")
    scale = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30}
    return int(float(m.group(1)) * scale[m.group(2)])


class ShardedWeights:
    """The weight files of a checkpoint directory, read one tensor at a time.

    Safetensors are opened lazily (``safe_open``); ``.bin`` files are memory-mapped (``torch.load(mmap=True)``),
    so a tensor costs its own size and the rest of the shard stays on disk (only a legacy, non-zip ``.bin``
    is read whole, one shard at a time).
    """

    def __init__(self, path: str, what: str):
        self.path = os.fspath(path)
        self.what = what
        if not os.path.isdir(self.path):
            raise ConfigError(f"{what}: directory not found: {self.path}")
        self._mapped: Dict[str, dict] = {}
        self._open_name: Optional[str] = None
        self._open = None
        self.files, self.weight_map = self._index()

    def _index(self) -> Tuple[List[str], Dict[str, str]]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = os.path.join(self.path, index_name)
            if os.path.isfile(index_path):
                with open(index_path) as f:
                    weight_map = json.load(f).get("weight_map") or {}
                if not weight_map:
                    raise DeltaError(f"{index_path}: no weight_map")
                files = sorted(set(weight_map.values()))
                missing = [f for f in files if not os.path.isfile(os.path.join(self.path, f))]
                if missing:
                    raise DeltaError(f"{self.what} {self.path}: {index_name} lists {missing[0]}, which is missing "
                                     f"({len(missing)} file(s) missing; an interrupted download?)")
                return files, dict(weight_map)
        files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(self.path, "*.safetensors")))
        if not files:
            files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(self.path, "pytorch_model*.bin")))
        if not files:
            raise DeltaError(f"{self.what} {self.path}: no *.safetensors or pytorch_model*.bin weight files")
        weight_map = {}
        for name in files:
            for key in self._keys_in(name):
                weight_map[key] = name
        return files, weight_map

    def _keys_in(self, name: str) -> List[str]:
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(os.path.join(self.path, name), framework="pt") as f:
                return list(f.keys())
        return list(self._bin(name).keys())

    def _bin(self, name: str) -> dict:
        if name in self._mapped:
            return self._mapped[name]
        if self._open_name != name:
            path = os.path.join(self.path, name)
            try:  # memory-mapped: pages are read on use and belong to the page cache, so shards stay open
                self._mapped[name] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                return self._mapped[name]
            except RuntimeError:  # pre-zip serialisation cannot be memory-mapped: read it whole, one at a time
                logger.warning("%s is in PyTorch's legacy format; reading it whole", path)
                self._open = None
                self._open = torch.load(path, map_location="cpu", weights_only=True)
                self._open_name = name
        return self._open

    def keys_in(self, name: str) -> List[str]:
        """The keys stored in file ``name``, in the index's order."""
        return [k for k, f in self.weight_map.items() if f == name]

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str) -> torch.Tensor:
        name = self.weight_map[key]
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(os.path.join(self.path, name), framework="pt") as f:
                return f.get_tensor(key)
        return self._bin(name)[key]

    def close(self) -> None:
        self._mapped.clear()
        self._open, self._open_name = None, None


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps the freed tensors' pages in its arenas otherwise,
    and the process would grow with the model instead of staying near one shard)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class ShardWriter:
    """Safetensors shards of at most ``max_bytes`` (a larger tensor gets a shard of its own) plus the index."""

    def __init__(self, out_dir: str, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: List[List[str]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, os.path.join(self.out_dir, name), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0
        _release_freed_memory()

    def finish(self) -> int:
        """Write the last shard, give shards their final names and write the index; returns the shard count."""
        if self.pending:
            self._flush()
        n = len(self.shards)
        weight_map = {}
        for k, keys in enumerate(self.shards):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, f"shard-{k:05d}.safetensors"), os.path.join(self.out_dir, final))
            weight_map.update({key: final for key in keys})
        write_json_atomic(os.path.join(self.out_dir, "model.safetensors.index.json"),
                          {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return n


def apply_delta_tensor(key: str, delta: torch.Tensor, base: Optional[torch.Tensor]) -> torch.Tensor:
    """GPT4RoI's rule for one weight: ``delta + base`` (base cast to the delta's dtype); vocabulary rows beyond
    the base's kept as in the delta; projector and region weights (no base) copied."""
    if base is None:
        if key.startswith(WHOLE_PREFIXES):
            return delta
        raise DeltaError(f"delta weight {key!r} has no counterpart in the base (is --base the LLaMA-7B the delta "
                         "was made from?)")
    base = base.to(delta.dtype)
    if tuple(base.shape) == tuple(delta.shape):
        return delta + base
    if key in ROW_KEYS and delta.dim() == 2 and delta.shape[1] == base.shape[1] and delta.shape[0] >= base.shape[0]:
        out = delta.clone()
        out[: base.shape[0]] += base
        return out
    raise DeltaError(f"weight {key!r}: delta shape {tuple(delta.shape)} does not fit base shape {tuple(base.shape)}")


def gpt4roi_tokenizer(delta_dir: str, base_dir: str, rows: int):
    """GPT4RoI's training tokenizer for ``rows`` embedding rows, from the delta's ``tokenizer.model`` (else the
    base's); see :mod:`gpt4roi_sft.model.gpt4roi_tokenizer`. The delta's own tokenizer files, when they load, are
    only compared with it."""
    from transformers import AutoTokenizer

    from gpt4roi_sft.model.gpt4roi_tokenizer import (SENTENCEPIECE_FILE, TokenizerError, build_gpt4roi_tokenizer,
                                                     check_against)

    source = next((d for d in (delta_dir, base_dir) if os.path.isfile(os.path.join(d, SENTENCEPIECE_FILE))), None)
    if source is None:
        raise DeltaError(f"neither --delta nor --base has {SENTENCEPIECE_FILE} (LLaMA's SentencePiece model)")
    try:
        tok = build_gpt4roi_tokenizer(source, rows)
    except TokenizerError as exc:
        raise DeltaError(str(exc)) from None
    try:
        check_against(tok, AutoTokenizer.from_pretrained(delta_dir), f"--delta {delta_dir}")
    except (OSError, ValueError, TypeError):
        pass
    return tok


def _read_config(path: str, what: str) -> dict:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise ConfigError(f"{what}: no config.json in {path}")
    with open(cfg) as f:
        return json.load(f)


def apply_delta(base_dir: str, delta_dir: str, out_dir: str, max_shard_bytes: int = 2 << 30,
                vision_tower: Optional[str] = None) -> dict:
    """Write ``base + delta`` to ``out_dir`` (created; must not exist) and return a summary dict.

    The output is assembled in ``out_dir + ".partial"`` and renamed at the end, so ``out_dir`` is never half written.
    """
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir):
        raise ConfigError(f"--out {out_dir} exists; give a new directory")
    if vision_tower is not None and not os.path.isdir(vision_tower):
        raise ConfigError(f"--vision-tower: directory not found: {vision_tower}")
    config = _read_config(delta_dir, "--delta")
    base = ShardedWeights(base_dir, "--base")
    delta = ShardedWeights(delta_dir, "--delta")
    lost = sorted(k for k in base.weight_map if k not in delta and not _SKIPPED.search(k))
    if lost:
        raise DeltaError(f"base weight {lost[0]!r} is not in the delta ({len(lost)} in all): an incomplete delta, "
                         "or a base of another model")
    partial = out_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    writer = ShardWriter(partial, max_shard_bytes)
    rows, added, copied, skipped = None, 0, 0, 0
    from tqdm import tqdm

    for name in delta.files:
        for key in tqdm(delta.keys_in(name), desc=f"applying {name}", leave=False):
            if _SKIPPED.search(key):
                skipped += 1
                continue
            tensor = delta.get(key)
            merged = apply_delta_tensor(key, tensor, base.get(key) if key in base else None)
            del tensor
            copied += key not in base
            added += key in base
            if key == ROW_KEYS[0]:
                rows = merged.shape[0]
            writer.add(key, merged)
        delta.close()
    base.close()
    if rows is None:
        raise DeltaError(f"--delta {delta_dir}: no {ROW_KEYS[0]} weight")
    shards = writer.finish()
    tokenizer = gpt4roi_tokenizer(delta_dir, base_dir, rows)
    tokenizer.save_pretrained(partial)
    if config.get("vocab_size") != rows:
        logger.warning("config.json says vocab_size %s; the weights have %d rows (written)", config.get("vocab_size"), rows)
    config["vocab_size"] = rows
    if vision_tower is not None:
        config["mm_vision_tower"] = os.path.abspath(vision_tower)
    write_json_atomic(os.path.join(partial, "config.json"), config)
    os.replace(partial, out_dir)
    summary = {"out": out_dir, "weights_summed": added, "weights_copied": copied, "buffers_dropped": skipped,
               "vocab_rows": rows, "shards": shards}
    logger.info("wrote %s", summary)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt4roi_sft.model.apply_delta", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="LLaMA-7B in Hugging Face format (the delta's base)")
    parser.add_argument("--delta", required=True, help="GPT4RoI-7B-delta-V0 directory")
    parser.add_argument("--out", required=True, help="directory to create")
    parser.add_argument("--vision-tower", help="CLIP ViT-L/14 directory to record as mm_vision_tower")
    parser.add_argument("--max-shard-size", default="2GB", help="largest output shard (default 2GB)")
    args = parser.parse_args(argv)
    from gpt4roi_sft.console import setup_cli_logging

    setup_cli_logging()
    summary = apply_delta(args.base, args.delta, args.out, parse_size(args.max_shard_size), args.vision_tower)
    print(f"{summary['out']}: {summary['weights_summed']} weights summed, {summary['weights_copied']} copied, "
          f"{summary['vocab_rows']} vocabulary rows, {summary['shards']} shard(s)")
    return 0


if __name__ == "__main__":
    from gpt4roi_sft.errors import run_cli

    raise SystemExit(run_cli(main))

"""Up-front checks of user input (files and numbers), each failing with one `InputError` that names
the input and the fix, before anything large is loaded or anything is written.

- `check_text_file`: a document path is a readable file (not a directory, not missing);
  `read_text_document`: its text, which must be UTF-8.
- `check_model_dir`: config.json parses, the safetensors headers are whole (a truncated or corrupt
  file is caught here, naming it), every tensor is a float type (not a quantized checkpoint), and
  a sharded index only points at files inside the folder.
- `check_vocab`: every id the tokenizer can produce has a row in the model's embedding matrix.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from memagent_jax.errors import InputError

_MAX_HEADER = 100 << 20  # safetensors caps the JSON header at 100 MB
#: safetensors dtypes the loader reads (cast to the configured param dtype); any other dtype (I8,
#: U8, I32 of packed int4, F8_*) is a quantized checkpoint, which the decoder cannot run.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def check_text_file(path: str | os.PathLike[str], flag: str = "--doc") -> Path:
    """`path` as a Path if it is a file; InputError if it is missing or a directory."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{flag} is a directory, not a text file", p,
                         f"pass one text file ({flag} {p / 'document.txt'})")
    if not p.is_file():
        raise InputError(f"{flag}: no such file", p, f"pass an existing text file to {flag}")
    return p


def read_text_document(path: str | os.PathLike[str], flag: str = "--doc") -> str:
    """The text of a UTF-8 file (a leading BOM dropped); InputError naming the file and the first
    bad byte otherwise (a Latin-1 or UTF-16 file, or a binary one, read with replacement
    characters would give a plausible answer about a garbled document)."""
    p = check_text_file(path, flag)
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bad = raw.decode("utf-8", errors="replace").count("\ufffd")
        raise InputError(f"{flag} is not UTF-8 text ({e.reason} at byte {e.start}; {bad} undecodable "
                         "bytes or sequences)", p,
                         f"convert it to UTF-8, e.g. iconv -f latin1 -t utf-8 {p} > {p.stem}.utf8.txt") from None


def read_json_file(path: Path, what: str = "config.json") -> dict[str, Any]:
    """The JSON object in `path`; InputError naming the file, the line and the column otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{what} is not UTF-8 text ({e.reason} at byte {e.start})", path,
                         "restore the file from the checkpoint") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{what} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})",
                         path, "fix the file or restore it from the checkpoint") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} must hold a JSON object, got {type(data).__name__}", path,
                         "restore the file from the checkpoint")
    return data


def check_weight_dtype(name: str, dtype: str, file: str | os.PathLike[str] | None) -> None:
    """InputError unless the safetensors dtype of weight `name` is a float type (see FLOAT_DTYPES):
    casting int8/uint8/packed-int4 values to floats would run a garbage model without a word."""
    if str(dtype).upper() not in FLOAT_DTYPES:
        raise InputError(
            f"weight {name!r} has dtype {dtype}, not a float type: quantized checkpoints "
            "(int8/uint8/int4-packed, fp8; GPTQ, AWQ, bitsandbytes) are not supported", file,
            "use the unquantized checkpoint (float32, bfloat16 or float16 safetensors)")


def check_safetensors(path: Path) -> None:
    """InputError unless `path` has a whole safetensors header whose tensors lie inside the file."""
    fix = "the file is truncated or corrupt: download or export it again"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"not a safetensors file ({size} bytes, no header)", path, fix)
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise InputError(f"safetensors header of {n} bytes does not fit the {size}-byte file",
                             path, fix)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError("unreadable safetensors header (not JSON)", path, fix) from None
    if not isinstance(header, dict):
        raise InputError("unreadable safetensors header (not a JSON object)", path, fix)
    data_bytes = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise InputError(f"tensor {name!r} has no valid data_offsets in the header", path, fix)
        if offsets[1] > data_bytes:
            raise InputError(f"tensor {name!r} ends at byte {offsets[1]} of the data but the file "
                             f"holds {data_bytes} data bytes", path, fix)
        check_weight_dtype(name, entry.get("dtype", "?"), path)


def check_model_dir(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Check an HF model directory before loading it; returns its config.json.

    config.json must parse; model.safetensors.index.json (if any) must parse and name files inside
    the folder; every weight file must have a whole header. Missing files are left to the loader
    (its messages already name them).
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise InputError("no such model directory", d,
                         "pass an HF directory (config.json, safetensors, tokenizer files)")
    config_file = d / "config.json"
    if not config_file.is_file():
        raise InputError("no config.json in the model directory", d,
                         "pass an HF directory (config.json, safetensors, tokenizer files)")
    config = read_json_file(config_file)
    index = d / "model.safetensors.index.json"
    files: list[Path] = []
    if index.is_file():
        weight_map = read_json_file(index, "model.safetensors.index.json").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise InputError("model.safetensors.index.json has no weight_map of tensor -> file",
                             index, "restore the file from the checkpoint")
        root = d.resolve()
        for name in sorted(set(weight_map.values())):
            target = (d / name).resolve()
            if Path(name).is_absolute() or root not in target.parents:
                raise InputError(f"the weight map points outside the model folder ({name!r})", index,
                                 "weight files must be inside the model directory: fix the index")
            files.append(d / name)
    elif (d / "model.safetensors").is_file():
        files.append(d / "model.safetensors")
    for f in files:
        if f.is_file():
            check_safetensors(f)
    return config


def check_vocab(tokenizer: Any, model_vocab: int, tokenizer_dir: str | os.PathLike[str] | None,
                model_dir: str | os.PathLike[str] | None = None,
                fix: str = "use the tokenizer files saved with this checkpoint") -> None:
    """InputError when the tokenizer has ids the model has no embedding for (a wrong tokenizer:
    its ids past the embedding matrix would silently read wrong rows)."""
    if tokenizer.vocab_size > model_vocab:
        where = f" ({Path(model_dir) / 'config.json'})" if model_dir else ""
        raise InputError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model{where} embeds only "
            f"{model_vocab}: the tokenizer does not belong to this model", tokenizer_dir, fix)


def load_checked(model_dir: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str] | None = None,
                 **from_pretrained_kwargs: Any) -> tuple[Any, Any]:
    """(model, tokenizer) from an HF directory, with every check above done before the weights load.

    config.json is validated as the decoder reads it (unsupported settings name the file), the
    tokenizer (from `tokenizer_dir`, default the model's) must fit the model's vocabulary, and an
    unreadable weight file is an InputError naming the directory.
    """
    from memagent_jax.models import ModelConfig, from_pretrained
    from memagent_jax.tokenizer import load_tokenizer

    d = Path(model_dir)
    hf = check_model_dir(d)
    try:
        config = ModelConfig.from_hf_dict(hf)
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(str(e.args[0] if e.args else e), d / "config.json",
                         "use a Qwen2/Qwen3/Llama config.json as transformers writes it") from None
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else d
    tokenizer = load_tokenizer(tok_dir)
    check_vocab(tokenizer, config.vocab_size, tok_dir, d)
    try:
        model = from_pretrained(d, **from_pretrained_kwargs)
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise InputError(f"unreadable weights ({e})", d,
                         "the safetensors files are corrupt: download or export them again") from None
    return model, tokenizer


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0 (--temperature: 0 is greedy; below 0 would silently be greedy)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} is below 0: pass 0 (greedy) or more")
    return value


def probability(text: str) -> float:
    """argparse type: a number in (0, 1] (--top-p: 1 is off; 0 or above 1 would silently be
    greedy or off)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]: pass e.g. 0.95 (1 = off)")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (--top-k: 0 is off)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is below 0: pass 0 (off) or more")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports the flag, exit status 2)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number: pass 1 or more")
    return value

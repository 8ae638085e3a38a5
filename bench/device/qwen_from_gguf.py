"""Rebuild a Qwen2.5-Coder model on the GPU machine from GGUF parts (see ../shared/models/README.md).

  python3 -P bench/device/qwen_from_gguf.py KEY [--parts DIR] [--tok DIR] [--out DIR]

KEY is qwen05 or qwen15 (any short name works; it only sets the defaults; without KEY, the layout of
session.sh's `quality` stage: /tmp/q, .device/tok, /tmp/qwen05-hf):
  --parts  /tmp/q/KEY        gguf.part00, part01, ... (carried one per device call) and gguf.sha256
  --tok    .device/tok-KEY   tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json
  --out    /tmp/KEY-hf       the bf16 HF folder
Joins the parts into <parts>/model.gguf, checks its sha256 against <parts>/gguf.sha256, converts it
with transformers (bf16), adds the tokenizer files and prints the folder. Idempotent: a folder already
converted is printed at once; a joined GGUF whose hash matches is not joined again; the folder is
written beside its final name and renamed when complete, so an interrupted run leaves no half folder.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from pathlib import Path

# files that make a converted folder complete
COMPLETE = ("config.json", "tokenizer.json")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def is_converted(out: Path) -> bool:
    return all((out / name).exists() for name in COMPLETE) and any(out.glob("*.safetensors"))


def join_parts(parts_dir: Path) -> Path:
    """<parts>/model.gguf from gguf.part*, checked against gguf.sha256; exits with a reason otherwise."""
    want_file = parts_dir / "gguf.sha256"
    if not want_file.exists():
        sys.exit(f"no {want_file}: carry .device/<q>/gguf.sha256 with the parts")
    want = want_file.read_text().split()[0]
    gguf = parts_dir / "model.gguf"
    if gguf.exists() and sha256(gguf) == want:
        return gguf
    parts = sorted(parts_dir.glob("gguf.part*"))
    with open(gguf, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    digest = sha256(gguf)
    if digest != want:
        names = " ".join(p.name for p in parts)
        sys.exit(
            f"gguf sha256 mismatch from {len(parts)} parts ({names}; {gguf.stat().st_size} bytes): {digest} != {want}"
        )
    return gguf


def convert(gguf: Path, tok_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    if not (tok_dir / "tokenizer.json").exists():
        sys.exit(f"no tokenizer files in {tok_dir}: carry .device/tok-<key>/")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    for f in tok_dir.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("key", nargs="?", help="qwen05 or qwen15")
    p.add_argument("--parts", type=Path)
    p.add_argument("--tok", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    key = args.key
    parts = args.parts or (Path("/tmp/q") / key if key else Path("/tmp/q"))
    tok = args.tok or Path(".device") / (f"tok-{key}" if key else "tok")
    out = args.out or Path("/tmp") / f"{key or 'qwen05'}-hf"
    if not is_converted(out):
        t0 = time.time()
        convert(join_parts(parts), tok, out)
        print(f"converted {parts / 'model.gguf'} -> {out} in {time.time() - t0:.0f} s", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

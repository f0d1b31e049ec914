"""Does a merged run convert to GGUF with llama.cpp's own converter, carrying the tokenizer and the trained template?

    python benchmarks/interop.py                          # stories260K (real SentencePiece Llama), ../shared/data
    python benchmarks/interop.py --workdir /tmp/interop --keep

Needs ``pip install sentencepiece`` (the converter reads tokenizer.model with it) and pip access to PyPI: the
converter is llama.cpp's ``convert_hf_to_gguf.py`` with its ``gguf-py``, taken from the llama-cpp-python sdist
(``pip download --no-deps --no-binary :all: llama-cpp-python==VERSION``, cached in the work folder).

For each template (alpaca, and a custom ChatML template that writes no BOS): ``neftune train`` a few steps of
LoRA on stories260K with Alpaca records, ``neftune merge``, convert the merged folder, and read the GGUF back with
gguf-py. Checked: the vocabulary and SentencePiece scores equal tokenizer.model's, BOS/EOS ids equal the
tokenizer's, and the GGUF's chat template is the one training used. For contrast the same merged weights with the
tokenizer re-saved by the installed transformers' ``save_pretrained`` (what a run handed on before) are converted
too, and what that loses is reported. The GGUF's add_bos_token is shown: llama.cpp puts BOS in front of a rendered
chat prompt when it is set, also when the template writes none (transformers and vLLM add nothing there).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
LLAMA_CPP_PYTHON = "0.3.36"  # its vendor/llama.cpp holds the converter used here
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
RECIPE = """\
model: {{name_or_path: {model}}}
data: {{sources: [{{path: {data}}}], max_seq_len: 256, {template}}}
lora: {{r: 8, alpha: 16}}
train: {{max_steps: 3, micro_batch_size: 8, lr: 1.0e-3}}
output: {{dir: {out}}}
"""


def converter(cache: Path) -> Path:
    """The llama.cpp folder (convert_hf_to_gguf.py, conversion/, gguf-py/) from the llama-cpp-python sdist."""
    root = cache / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    spec = f"llama-cpp-python=={LLAMA_CPP_PYTHON}"
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", str(cache)]
    done = subprocess.run(pip, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"pip download {spec} failed: {done.stderr.strip().splitlines()[-1:]}")
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as sdist:
        for member in sdist.getmembers():
            wanted = member.name.startswith(prefix) and member.isfile()
            parts = member.name[len(prefix) :].split("/")
            if wanted and (parts[0] in ("conversion", "gguf-py") or parts == ["convert_hf_to_gguf.py"]):
                target = root.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(sdist.extractfile(member).read())
    return root


def neftune(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "neftune_cli", *args], check=True, capture_output=True, text=True)


def convert(llama_cpp: Path, model: Path, out: Path) -> tuple[bool, str]:
    script = str(llama_cpp / "convert_hf_to_gguf.py")
    command = [sys.executable, script, str(model), "--outfile", str(out), "--outtype", "f32"]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return done.returncode == 0, lines[-1] if lines else ""


def read_gguf(llama_cpp: Path, path: Path) -> dict:
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def value(key: str):
        field = reader.fields.get(key)
        if field is None:
            return None
        if len(field.data) == 1:
            part = field.parts[field.data[0]]
            return bytes(part).decode("utf-8") if field.types[0].name == "STRING" else part.tolist()[0]
        return [
            bytes(field.parts[i]).decode("utf-8") if field.types[-1].name == "STRING" else field.parts[i].tolist()[0]
            for i in field.data
        ]

    return {
        "model": value("tokenizer.ggml.model"),
        "tokens": value("tokenizer.ggml.tokens"),
        "scores": value("tokenizer.ggml.scores"),
        "bos": value("tokenizer.ggml.bos_token_id"),
        "eos": value("tokenizer.ggml.eos_token_id"),
        "add_bos": value("tokenizer.ggml.add_bos_token"),
        "chat_template": value("tokenizer.chat_template"),
        "tensors": len(reader.tensors),
    }


def check(gguf: dict, base: Path, template: str) -> list[str]:
    """What the GGUF gets wrong against tokenizer.model and the training template ([] when nothing)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    problems = []
    if gguf["tokens"] != [sp.id_to_piece(i) for i in range(sp.get_piece_size())]:
        problems.append("tokens differ from tokenizer.model")
    scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
    if gguf["scores"] is None or any(abs(a - b) > 1e-6 for a, b in zip(gguf["scores"], scores, strict=True)):
        problems.append("SentencePiece scores lost" if gguf["scores"] is None or len(set(gguf["scores"])) < 3
                        else "scores differ from tokenizer.model")
    if (gguf["bos"], gguf["eos"]) != (sp.bos_id(), sp.eos_id()):
        problems.append(f"bos/eos {gguf['bos']}/{gguf['eos']} != {sp.bos_id()}/{sp.eos_id()}")
    if gguf["chat_template"] != template:
        problems.append("no chat template" if gguf["chat_template"] is None else "another chat template")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    base = SHARED / "models" / "stories260K"
    if not base.is_dir():
        sys.exit(f"needs the shared reference data at {SHARED}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="neftune-interop-"))
    work.mkdir(parents=True, exist_ok=True)
    llama_cpp = converter(work / "cache")
    from transformers import AutoTokenizer

    from neftune_cli.data.templates import alpaca_jinja

    records = json.loads((SHARED / "alpaca" / "alpaca_data_first2k.json").read_text())[:64]
    (work / "alpaca.json").write_text(json.dumps(records))
    rows = []
    try:
        for name, options, template in (
            ("alpaca", "template: alpaca", alpaca_jinja(with_bos=True)),
            ("chatml", f"template: custom, chat_template: {json.dumps(CHATML)}", CHATML),
        ):
            run, merged = work / f"run-{name}", work / f"merged-{name}"
            recipe = work / f"{name}.yaml"
            recipe.write_text(RECIPE.format(model=base, data=work / "alpaca.json", template=options, out=run))
            started = time.perf_counter()
            neftune("train", str(recipe), "--overwrite")
            neftune("merge", str(run), "--out", str(merged), "--overwrite")
            resaved = work / f"resaved-{name}"  # the same weights, the tokenizer as save_pretrained writes it
            shutil.copytree(merged, resaved, dirs_exist_ok=True)
            for f in resaved.iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                    f.unlink()
            AutoTokenizer.from_pretrained(merged).save_pretrained(resaved)
            for label, folder in (("neftune run", merged), ("save_pretrained", resaved)):
                ok, last = convert(llama_cpp, folder, work / f"{folder.name}.gguf")
                gguf = read_gguf(llama_cpp, work / f"{folder.name}.gguf") if ok else {}
                problems = check(gguf, base, template) if ok else [last]
                rows.append((name, label, ok, problems, gguf.get("add_bos")))
            print(f"{name}: trained, merged, converted twice in {time.perf_counter() - started:.1f}s", flush=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    import transformers

    print(f"\nllama.cpp converter from llama-cpp-python {LLAMA_CPP_PYTHON}, transformers {transformers.__version__}")
    print("| template | tokenizer files | converts | GGUF vs tokenizer.model and training template | add_bos_token |")
    print("|---|---|---|---|---|")
    for name, label, ok, problems, add_bos in rows:
        print(f"| {name} | {label} | {'yes' if ok else 'no'} | {'; '.join(problems) or 'identical'} | {add_bos} |")


if __name__ == "__main__":
    main()

"""Random-weight models of real shapes (no download): right for speed and memory, shared by the benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# The Llama-2 tokenizer (make gpu-data carries it to a GPU box); any tokenizer with ids < 32000 does for speed.
TOKENIZER = SHARED / "tokenizers" / "llama2"

SHAPES = {
    "llama2-7b-random": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                         "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096},
    "llama3-8b-random": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                         "max_position_embeddings": 8192, "rope_theta": 500000.0},
    # TinyLlama-1.1B's shape: full fine-tuning on one GPU
    "llama-1b-random": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                        "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048},
    # for trying a benchmark end to end on a CPU
    "tiny-random": {"vocab_size": 32000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024},
}


def config_of(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, tie_word_embeddings=False)


def build(shape: str, dtype: torch.dtype, device: torch.device, attn_implementation: str = "sdpa"):
    """The model, random-initialised where it runs (on a GPU: seconds, and nothing written to disk)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # the same weights in every process: runs of the benchmark compare
    with device:
        return AutoModelForCausalLM.from_config(config_of(shape), dtype=dtype, attn_implementation=attn_implementation)


def tokenizer(folder: Path | None = None):
    """The tokenizer at `folder` (default the Llama-2 one in ../shared), else builtin:tiny-llama's (ids < 32000)."""
    from transformers import AutoTokenizer

    source = folder or TOKENIZER
    if not Path(source).is_dir():
        from neftune_cli.demo.builtin import resolve

        print(f"note: no {source}; using the tokenizer of builtin:tiny-llama")
        source = resolve("builtin:tiny-llama")
    return AutoTokenizer.from_pretrained(source)

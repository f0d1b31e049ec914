"""MFU arithmetic against PyTorch's own FLOP counter on a tiny model."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from neftune_cli.train.flops import flops_per_token, peak_flops, peak_memory_gb, peak_of
from neftune_cli.train.step import CausalLMLoss


@pytest.mark.parametrize("lora", [True, False])
def test_flops_per_token_matches_the_flop_counter(lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    # eager attention: its matmuls are counted (CPU SDPA kernels are invisible to the counter)
    config = LlamaConfig(hidden_size=128, num_attention_heads=4, num_hidden_layers=8, intermediate_size=256,
                         vocab_size=500, attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config)
    if lora:
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0))
    ids = torch.randint(0, 500, (4, 64))
    with FlopCounterMode(display=False) as counter:
        loss = CausalLMLoss(model, 0, "paper")(input_ids=ids, targets=ids).loss  # every position trained
        loss.backward()
    assert counter.get_total_flops() == pytest.approx(flops_per_token(model, 64) * ids.numel(), rel=0.03)


def test_no_mfu_without_a_known_gpu():
    assert peak_flops(torch.device("cpu")) is None and peak_memory_gb(torch.device("cpu")) is None
    assert peak_of("NVIDIA GeForce RTX 3050") is None and peak_of("Tesla T4") is None


# torch.cuda.get_device_name() as it reads on each part; variants of one chip have other peaks
@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
    ("NVIDIA A10G", 70e12), ("NVIDIA A10", 125e12), ("NVIDIA GeForce RTX 4090", 165e12), ("NVIDIA B200", 2250e12),
])
def test_each_device_gets_its_own_peak(name, peak):
    assert peak_of(name) == peak


def test_a_4bit_weight_counts_its_real_parameters():
    bnb = pytest.importorskip("bitsandbytes")
    from neftune_cli.train.flops import numel

    layer = bnb.nn.Linear4bit(128, 64, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    assert layer.weight.numel() == 64 * 128 // 2 and numel(layer.weight) == 64 * 128
    assert numel(torch.zeros(3, 5)) == 15

"""The training forward: embeddings, NEFTune noise, decoder, and a token-summed cross-entropy; and the eval loss.

We compute the input embeddings ourselves and pass ``inputs_embeds`` (as the paper's code does) instead of
hooking the embedding layer: the noise needs each example's length, which only the batch knows, and there is
no hook to forget to remove. Being one nn.Module, it is what DDP/FSDP wrap, so gradients sync as usual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from neftune_cli.train import parallel
from neftune_cli.train.noise import add_noise, noise_norms

# Tokens per chunk of the output head + loss: the fp32 logits of one chunk exist at a time (recomputed in
# backward), instead of (tokens x vocab) for the whole micro-batch.
LOSS_CHUNK = 4096


class CausalLMLoss(nn.Module):
    """Wraps a causal LM (plain or peft) and returns (summed token loss, trained tokens, noise norms)."""

    def __init__(self, model: nn.Module, noise_alpha: float | None, noise_scale: str):
        super().__init__()
        self.model = model
        self.noise_alpha = noise_alpha or 0.0
        self.noise_scale = noise_scale
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = causal.base_model  # e.g. LlamaModel: everything but the output head
        self.head = causal.get_output_embeddings()
        self.softcap = getattr(causal.config, "final_logit_softcapping", None)

    def forward(self, input_ids, targets, attention_mask=None, position_ids=None, generator=None):
        embeds = self.model.get_input_embeddings()(input_ids)
        norms = None
        if self.training and self.noise_alpha > 0:
            noisy = add_noise(embeds, self.noise_alpha, attention_mask=attention_mask, position_ids=position_ids,
                              scale=self.noise_scale, generator=generator)
            norms = noise_norms(noisy, embeds, attention_mask=attention_mask, position_ids=position_ids)
            embeds = noisy
        hidden = self.decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state
        # Only positions with a target need logits: prompts and pads never reach the output head.
        keep = targets != -100
        hidden, targets = hidden[keep], targets[keep]
        loss = hidden.sum().float() * 0.0  # keeps the graph whole when a micro-batch has nothing to train
        for start in range(0, targets.numel(), LOSS_CHUNK):
            h, y = hidden[start:start + LOSS_CHUNK], targets[start:start + LOSS_CHUNK]
            loss = loss + checkpoint(self._chunk_loss, h, y, use_reentrant=False)
        return loss, targets.numel(), norms

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return F.cross_entropy(logits, targets, reduction="sum")


@torch.no_grad()
def attention_stays_within_examples(lm_loss: CausalLMLoss) -> bool:
    """Does the decoder keep packed examples apart? (transformers derives the segments from position_ids;
    remote model code or an old version may not, and then examples would silently attend to each other.)

    Two rows share their second example and differ in the first; its hidden states must be identical.
    """
    was_training = lm_loss.training
    lm_loss.eval()
    device = lm_loss.head.weight.device
    first = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]], device=device)
    second = torch.tensor([[13, 14, 15, 16]] * 2, device=device)
    ids = torch.cat([first, second], dim=1)
    positions = torch.arange(4, device=device).repeat(2, 2)
    hidden = lm_loss.decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    lm_loss.train(was_training)
    return torch.allclose(hidden[0, 4:].float(), hidden[1, 4:].float(), atol=1e-3, rtol=1e-3)


def evaluate(lm_loss: CausalLMLoss, dataset, batch_of, batch_size: int, dist: parallel.Dist = parallel.SINGLE
             ) -> float:
    """Mean token loss over the eval set: eval mode (no dropout, no noise), no gradients; ranks share the batches."""
    lm_loss.train(False)
    total, count = 0.0, 0
    # FSDP: every rank runs every forward (they gather the shards together), a stand-in where its share is short
    starts = parallel.my_share(list(range(0, len(dataset), batch_size)), dist, pad=dist.fsdp)
    with torch.no_grad():
        for start in starts:
            indices = list(range(start or 0, min((start or 0) + batch_size, len(dataset))))
            loss, n, _ = lm_loss(**batch_of(dataset, indices))
            if start is not None:
                total, count = total + loss.item(), count + n
    lm_loss.train(True)
    total, count = parallel.sum_all([total, count], dist)
    return total / max(count, 1)

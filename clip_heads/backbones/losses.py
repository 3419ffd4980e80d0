"""The pairwise sigmoid loss SigLIP was trained with (Zhai et al., ICCV 2023), for fine-tuning.

CLIP-like families keep the symmetric InfoNCE (:func:`clip_heads.finetune.contrastive_loss`);
which one a model gets is its family's ``loss`` (:class:`~clip_heads.backbones.families.FamilySpec`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sigmoid_loss"]


def sigmoid_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, labels: torch.Tensor,
                 logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss over every image-text pair of a batch, same-class pairs as positives.

    ``-1/B * sum_ij log sigmoid(z_ij * (exp(logit_scale) * cos_ij + logit_bias))`` with
    ``z_ij = +1`` when image i and text j share a label, -1 otherwise: each pair is its own
    binary problem, so a repeated class is a positive for every one of its images (with distinct
    labels this is exactly the paper's loss, whose only positives are the diagonal).

    Parameters
    ----------
    image_embeds, text_embeds : (batch, dim), L2-normalised.
    labels : (batch,) class ids.
    logit_scale : the model's log-temperature (a parameter: it trains, uncapped).
    logit_bias : the model's bias (a parameter: it trains).
    """
    logits = image_embeds @ text_embeds.T * logit_scale.exp().reshape(()) + logit_bias.reshape(())
    sign = 2.0 * (labels[:, None] == labels[None, :]).to(logits.dtype) - 1.0
    return -F.logsigmoid(sign * logits).sum(1).mean()

"""Teacher-student losses on logits (or any outputs): what a quantized student is trained to match."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_top_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int = 1000) -> torch.Tensor:
    """OSTQuant's KL-Top (`kl_top`, post_attn form): per token, idx = the teacher's top-k vocabulary entries,
    sum_{i in idx} p_i (log p_i - log q_i) with p, q the FULL-vocabulary softmaxes of teacher and student (not
    renormalised over idx); averaged over tokens. k >= vocab gives the plain KL divergence."""
    v = teacher_logits.shape[-1]
    t = teacher_logits.reshape(-1, v).float()
    s = student_logits.reshape(-1, v).float()
    log_p = F.log_softmax(t, -1)
    log_q = F.log_softmax(s, -1)
    if k < v:
        idx = t.topk(k, dim=-1).indices
        log_p, log_q = log_p.gather(-1, idx), log_q.gather(-1, idx)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the whole vocabulary, averaged over tokens."""
    return kl_top_loss(student_logits, teacher_logits, k=teacher_logits.shape[-1])


def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error (block-output reconstruction)."""
    return F.mse_loss(student.float(), teacher.float())


LOSSES = {"kl_top": kl_top_loss, "kl": kl_loss, "mse": mse_loss}

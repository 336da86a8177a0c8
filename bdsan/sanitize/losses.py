"""Loss terms shared by the fine-tuning defenses."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F


def distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KD term, T²·KL(softmax(teacher/T) ‖ softmax(student/T)), batch mean."""
    t = temperature
    return t * t * F.kl_div(F.log_softmax(student_logits.float() / t, 1), F.softmax(teacher_logits.float() / t, 1),
                            reduction="batchmean")


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy with gradients off: the teacher that keeps a fine-tuned model's clean behaviour."""
    teacher = copy.deepcopy(model).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher

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


DISTILL_MODES = ("all", "suppress-target", "agree")


def teacher_targets(teacher_logits: torch.Tensor, labels: torch.Tensor, suspected: list[int], mode: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher logits, rows to distil on) for the clean-image distillation term.

    ``all``: the input model's outputs as they are. ``suppress-target``: its logit of each suspected target class
    set to −10⁴ on images whose true label is another class, so the student is not asked to keep the backdoored
    model's extra clean-image answers into the target. ``agree``: distil only on images the input model labels
    correctly.
    """
    if mode == "agree":
        return teacher_logits, teacher_logits.argmax(1) == labels
    if mode == "suppress-target":
        teacher_logits = suppress_targets(teacher_logits, suspected, labels)
    return teacher_logits, torch.ones(len(labels), dtype=torch.bool, device=labels.device)


def suppress_targets(teacher_logits: torch.Tensor, suspected: list[int], *labels: torch.Tensor) -> torch.Tensor:
    """A copy of ``teacher_logits`` with each suspected target's logit set to −10⁴ on the rows whose ``labels``
    (one tensor per source image: two for a mix of two images) are all another class."""
    if not suspected:
        return teacher_logits
    columns = torch.tensor(suspected, device=teacher_logits.device)
    off_target = torch.ones(len(teacher_logits), len(suspected), dtype=torch.bool, device=teacher_logits.device)
    for source in labels:
        off_target &= source.view(-1, 1) != columns.view(1, -1)  # rows × suspected targets
    teacher_logits = teacher_logits.clone()
    teacher_logits[:, columns] = teacher_logits[:, columns].masked_fill(off_target, -1e4)
    return teacher_logits


def cap_targets(teacher_logits: torch.Tensor, suspected: list[int], temperature: float,
                *sources: torch.Tensor) -> torch.Tensor:
    """Teacher logits whose softened probability (at ``temperature``) of each suspected target is at most the
    largest the teacher gives that class on the ``sources`` (its logits on the images a row was mixed from), the
    other classes scaled up to fill the rest; rows under the cap come back as they were (up to a shift)."""
    if not suspected:
        return teacher_logits
    columns = torch.tensor(suspected, device=teacher_logits.device)
    probs = F.softmax(teacher_logits.float() / temperature, 1)
    cap = torch.stack([F.softmax(s.float() / temperature, 1)[:, columns] for s in sources]).amax(0)
    capped = torch.minimum(probs[:, columns], cap)
    rest = 1 - probs[:, columns].sum(1, keepdim=True)
    probs = probs * ((1 - capped.sum(1, keepdim=True)) / rest.clamp_min(1e-12))
    probs[:, columns] = capped
    return temperature * probs.clamp_min(1e-30).log()


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy with gradients off: the teacher that keeps a fine-tuned model's clean behaviour."""
    teacher = copy.deepcopy(model).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher

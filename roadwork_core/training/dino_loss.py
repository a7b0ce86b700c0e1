"""DINO self-distillation loss on class-token prototypes, with teacher centering and sharpening.

As in DINO / DINOv2 (``dino_clstoken_loss.py``): the teacher's logits are centered (a running
mean kept as a registered buffer, EMA-updated with ``center_momentum``) and sharpened with a low
temperature; the student uses ``student_temp``. Every student crop is matched to every teacher
(global) crop except the same view. Teacher-side methods run under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOLoss"]


class DINOLoss(nn.Module):
    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(n_global, B, K) logits -> centered, sharpened softmax targets of the same shape."""
        return F.softmax((teacher_logits - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])  # (n_global * B, K)
        total = torch.cat([flat.sum(dim=0), flat.new_tensor([flat.shape[0]])])  # (K + 1,)
        if dist.is_available() and dist.is_initialized():  # data-parallel: the global batch's center
            dist.all_reduce(total)
        batch_center = (total[:-1] / total[-1]).unsqueeze(0)  # (1, K)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """Cross-entropy H(teacher, student) averaged over (teacher view, other student view) pairs.

        student_logits: (n_crops, B, K), the first n_global crops are the global views in the
        teacher's order; teacher_logits: (n_global, B, K). Updates the center after the loss.
        """
        n_global = teacher_logits.shape[0]
        if student_logits.shape[0] < n_global or student_logits.shape[1:] != teacher_logits.shape[1:]:
            raise ValueError(
                f"DINOLoss: student logits {tuple(student_logits.shape)} do not match teacher logits "
                f"{tuple(teacher_logits.shape)}; expected (n_crops >= n_global, B, K)."
            )
        targets = self.teacher_probs(teacher_logits, teacher_temp)  # (n_global, B, K)
        student_logp = F.log_softmax(student_logits / self.student_temp, dim=-1)  # (n_crops, B, K)
        total, n_pairs = student_logits.new_zeros(()), 0
        for t in range(n_global):
            for s in range(student_logits.shape[0]):
                if s == t:
                    continue
                total = total - (targets[t] * student_logp[s]).sum(dim=-1).mean()
                n_pairs += 1
        self.update_center(teacher_logits)
        return total / max(n_pairs, 1)

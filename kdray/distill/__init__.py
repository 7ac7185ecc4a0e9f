"""Distillation (paper, sections 2-4 and 6): the teacher stage (one net or an ensemble), the transfer
stage (soft targets cached at T), the student stage (soft + hard loss, with its hard-label
baseline), the losses (pure functions) and the per-class bias correction."""

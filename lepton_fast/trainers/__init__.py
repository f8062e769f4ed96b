"""Thin trainers composed from the lepton_fast ops (see each class's docstring)."""
from lepton_fast.trainers.alignment import coral_loss, mcc_loss
from lepton_fast.trainers.cross_domain import TERMS, CrossDomainTrainer, DistributionAlignment
from lepton_fast.trainers.distiller import KnowledgeDistiller

__all__ = ["TERMS", "CrossDomainTrainer", "DistributionAlignment", "KnowledgeDistiller", "coral_loss", "mcc_loss"]

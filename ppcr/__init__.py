"""PPCR: Progressive Prompt-guided Cross-modal Reasoning for referring image segmentation.

Pipeline, as laid out in the package:

    ppcr.data        REFER-format reader (RefCOCO/+/g), the SynRef generator, the torch Dataset
    ppcr.model       semantic stage (LLaVA + LoRA "semantic"), spatial stage (LoRA "spatial" + box head),
                     segmentation stage (SAM), and the PPCR model that chains them
    ppcr.losses      Eq. 7 of the paper
    ppcr.metrics     oIoU / mIoU / P@X / box accuracy, paired bootstrap
    ppcr.training    the staged recipe, training loop (accelerate) and evaluation
"""

__version__ = "0.1.0"

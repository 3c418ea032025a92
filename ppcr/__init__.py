"""PPCR: Progressive Prompt-guided Cross-modal Reasoning for referring image segmentation.

The package follows the pipeline; a module imports only from the ones above it (tests/test_layout.py):

    ppcr.metrics, ppcr.provenance, ppcr.viz   leaves: mask/box metrics, the commit and device, drawing
    ppcr.data        the REFER reader (RefCOCO/+/g), the SynRef generator, the torch datasets
    ppcr.model       the architecture: config, LLaVA + the two LoRA branches, SAM, the heads, the PPCR model
                     (steps 1-3: semantic, spatial, segmentation), Eq. 7, checkpoints, the shipped foundation's lookup
    ppcr.recipe      profiles: the data, the preset and every training stage's settings
    ppcr.training    the loop, the cached stages 0 (SAM), 1a (CLIP), 1 (LLaVA), 2-3 (referring segmentation)
    ppcr.foundation  trains the shipped small-preset foundation (stages 0-1)
    ppcr.evaluation  evaluate, predict, the probes
    ppcr.report      tables, statistics, learning curves, explorers: what the book shows
    ppcr.book        notebooks -> Jupyter Book
    ppcr.perf        benchmark and FLOP count
    ppcr.pipeline, ppcr.cli   the entry points
"""

__version__ = "0.1.0"

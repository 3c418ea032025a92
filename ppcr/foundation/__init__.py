"""The small preset's foundation (stages 0-1), trained once and shipped: `python -m ppcr.foundation train | verify`.

It sits above `ppcr.training` (it runs stages 0 and 1 through it) and nothing in training imports it; the lookup of
the shipped files that training needs is `ppcr.model.shipped`.
"""

"""Lightning recipes for hatplug's research questions: data modules, the classifier module, the CLI and the
ablation runner (``python -m recipes.ablate recipes/ablations/<name>.yaml --smoke``).
"""

from .module import ImageClassifier

__all__ = ["ImageClassifier"]

"""Every statistic of the study, one implementation and one convention each.

* :mod:`~drift.stats.sample`: which samples enter the statistics (:func:`select_samples`, :func:`common_sample`).
* :mod:`~drift.stats.bootstrap`: the resampling scheme and the percentile interval (:func:`resample`,
  :func:`percentile_interval`, :func:`bootstrap`), macro means over classes with within-class bootstrap intervals
  (:func:`aggregate`), and the normal band of figures (:func:`mean_band`).
* :mod:`~drift.stats.paired`: the paired Wilcoxon signed-rank test (:func:`paired_test`).
* :mod:`~drift.stats.auc`: the macro one-vs-rest ROC AUC (:func:`macro_auc`, :func:`macro_auc_rows`) and the area
  under a curve over a grid (:func:`area`).
* :mod:`~drift.stats.ranking`: rank reversal of architectures between methods (:func:`rank_reversal`), descriptive:
  its probabilities are P(top differs | these checkpoints, image resampling).
* :mod:`~drift.stats.systematic`: systematic drift against seed noise from replicated fine-tuning
  (:func:`systematic_drift`, :func:`systematic_contrast`), the macro mean of a paired change with its stratified t
  interval (:func:`macro_mean_test`) and its difference between studies with their fine-tuned models resampled
  (:func:`model_mean_contrast`) and the whole-chain energy test (:func:`energy_test`).
* :mod:`~drift.stats.contrast`: architecture contrasts, their interaction with the method, the reversal test and
  Holm's adjustment (the tests behind :mod:`drift.verdicts`).

Everything works on per-sample values (N,) as numpy arrays (torch tensors and lists are accepted and converted).
NaN values mark samples that could not be scored (degenerate maps, see :mod:`drift.metrics`): they are excluded and
counted, never imputed. Bootstraps are seeded: the same inputs and seed give the same interval. The rank-reversal
bootstrap resamples images, not values, and applies one resample to every method (and every architecture scored
on the same images), so that methods compared on the same images are compared on the same replicate.
"""

from .auc import area, macro_auc, macro_auc_rows
from .bootstrap import Aggregate, aggregate, bootstrap, mean_band, percentile_interval, resample
from .paired import PairedTest, paired_test
from .ranking import RankReversal, rank_reversal
from .sample import SELECTION_RULES, ArrayLike, common_sample, select_samples
from .systematic import (
    EnergyTest,
    MacroMean,
    SystematicContrast,
    SystematicDrift,
    energy_test,
    euclidean_instability,
    euclidean_label,
    macro_mean_test,
    model_mean_contrast,
    systematic_contrast,
    systematic_drift,
    systematic_form,
)

__all__ = [
    "SELECTION_RULES",
    "Aggregate",
    "EnergyTest",
    "MacroMean",
    "SystematicContrast",
    "SystematicDrift",
    "ArrayLike",
    "PairedTest",
    "RankReversal",
    "aggregate",
    "area",
    "bootstrap",
    "common_sample",
    "energy_test",
    "euclidean_instability",
    "euclidean_label",
    "macro_auc",
    "macro_mean_test",
    "model_mean_contrast",
    "macro_auc_rows",
    "mean_band",
    "paired_test",
    "percentile_interval",
    "rank_reversal",
    "resample",
    "select_samples",
    "systematic_contrast",
    "systematic_drift",
    "systematic_form",
]

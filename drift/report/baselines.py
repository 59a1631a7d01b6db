"""The controls of the drift numbers: drift beside its seed floor, the randomisation check, and whether the
reversal exceeds the seed noise (:mod:`drift.baselines`)."""

from __future__ import annotations

from ..baselines import floor_rows, randomisation_rows, verdict
from .document import Run, Section, Table, Text


def sections(run: Run) -> list[Section]:
    header, rows = floor_rows(run.reader)
    rheader, rrows = randomisation_rows(run.reader)
    sentence = verdict(run.reader)
    if not (rows or rrows):
        return []
    s = Section("baselines", "Is the drift real? Seed floor and randomisation check")
    if sentence:
        s.blocks.append(Text(sentence))
    if rows:
        s.blocks.append(Text(
            "The seed floor is the drift between the run's model and replicas of the same stage trained from the same "
            "starting point with other training seeds: what drift looks like with no change of stage. Each metric is "
            "read as an instability (1 - IoU or correlation; displacement as is), macro mean over classes on the "
            "drift table's images; ratio = drift / floor; the interval is a bootstrap of per-image drift minus floor "
            "(above 0: the drift exceeds the floor). The ranking by drift minus floor decides whether a reversal "
            "survives."))
        s.blocks.append(Table("tbl-floor", f"TL -> FT drift beside its seed floor ({run.cell})", header, rows))
    if rrows:
        s.blocks.append(Text(
            "Cascading randomisation (Adebayo et al., Sanity checks for saliency maps, 2018): the fine-tuned model's "
            "layers are re-initialised from the head downwards; each cut's maps are compared with the trained maps. "
            "Maps that stay similar at every cut (flagged) carry little information about the model, and so do their "
            "drift numbers."))
        s.blocks.append(Table("tbl-randomisation", "Randomisation check: mean Pearson r between the trained and the "
                              "randomised model's maps at each cut", rheader, rrows))
    return [s]

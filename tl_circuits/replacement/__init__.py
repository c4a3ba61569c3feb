"""The local replacement model of one prompt (DESIGN.md §1): the clean run and its
validation (:mod:`.context`), the splice hooks (:mod:`.splice`), the frozen linear model
and its adjoint (:mod:`.frozen`), what every node writes and at which column
(:mod:`.sources`), and feature interventions (:mod:`.interventions`)."""

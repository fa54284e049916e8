"""Experiments: poison -> train the attacked model -> every defense -> evaluate -> report,
one folder per attack (:mod:`.run`), the attack x defense matrix (:mod:`.sweep`) and its
table (:mod:`.leaderboard`); :mod:`.pipeline` holds the ``poison`` / ``train`` /
``evaluate`` API the CLI commands of the same names call."""

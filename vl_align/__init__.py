"""Stage 2: vision-language alignment on top of frozen vision towers and a frozen LLM.

One file per paper concept: ``qformer`` (BLIP-2's Q-Former), ``losses`` (ITC, ITM, ITG), ``alignment`` (the
P-Former alignment of W·Z to P(y)), ``tome`` (ToMe's matching), ``simvlg`` (SimVLG's merged-token connector and
front), ``elip`` (ELIP's text-guided pruning). ``fronts`` builds, saves and loads every front kind; ``objectives``
and ``generative`` hold the stage losses and batch builders; ``inputs`` what a step feeds a front (cached features
or pixels, P(y)); ``pairs``/``data``/``sources`` the image-text data; ``evaluation``/``retrieval``/``metrics`` the
held-out evaluations; ``vision`` the towers and their feature cache; ``export`` the transformers BLIP-2 export.
"""

"""Stage 1, the P-Former (arXiv 2307.07063): a sentence -> prompts P(y) that make a frozen LLM reproduce it,
trained on text alone.

``model`` the P-Former; ``losses`` L_vq and L_c; ``objective`` the batch builder (``Stage1Collator``) and the loss
(``stage1_loss``, with L_lm through ``llm.FrozenLLM.prefix_lm``); ``llm`` the frozen LLM with a prefix; ``data`` text
corpora; ``evaluation`` reconstruction quality; ``targets`` P(y) of captions, computed once and cached for stage 2.
"""

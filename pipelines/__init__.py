"""The app: the ``dvlp`` command table (``cli``), one runner per stage (``stage1``, ``stage2``, ``generative``,
``evaluate``, ``export``, ``ablate``), and the training parts they share (``training`` the loop, ``distributed``,
``optim``, ``checkpoint``, ``config``). The only package that imports DeepSpeed or torch.distributed."""

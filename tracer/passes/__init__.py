"""Stage 2, graph passes: functions Graph -> Graph run from one ordered list (``pipeline``):
clean-ups and fusions (``optimize``), RepVGG branch merging (``reparam``), channel-shuffle
absorption (``channel_perm``) and the layout pass (``layout``)."""

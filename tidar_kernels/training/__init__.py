"""Training: the dual objective, offline data, the trainer and the evaluation harness.

:mod:`.objective` (training layout, labels, loss), :mod:`.data` (corpus,
tokenizer training, packing, sampling), :mod:`.config` (run arguments and
recipes), :mod:`.distributed` (process groups, FSDP2), :mod:`.checkpointing`
(atomic trainer checkpoints), :mod:`.trainer` (the loop and its command line),
:mod:`.evaluate` (T/NFE and perplexity reports), :mod:`.demo`.
"""

"""The network side: which weights are prunable, per-sample gradients (the empirical Fisher), evaluation,
measurement, fine-tuning with masks.

| module | what |
|---|---|
| ``params`` | prunable parameters, flatten / write back, masks, ``MaskKeeper`` |
| ``samples`` | what the user's data is: datasets, DataLoaders, iterables of batches; tuple/dict inputs; logits of the output |
| ``fisher`` | per-sample gradients X (n×p) with ``torch.func`` (Eq. 3), chunked, row-sharded under ``torch.distributed`` |
| ``evaluate`` | top-1 accuracy, BatchNorm recalibration, CIFAR augmentation |
| ``measure`` | wall time and peak memory of one call, latency, cProfile by package function |
| ``finetune`` | ``train_epochs``: SGD with the pruned weights held at zero |
| ``loop`` | the SGD loop pieces sparse training and SMCP share (checks, epoch batches, cosine rate, step) |
| ``language`` | causal language models: Conv1D, decoder blocks, next-token loss, perplexity, measured throughput |
| ``sequential`` | the one calibration driver of the layer-wise methods: decoder block after decoder block |
| ``lm_structure`` | MLP neurons and key/value groups of a Llama-style decoder removed, block after block |
"""

from chita_minimal.utils import lazy_submodules

__getattr__ = lazy_submodules(__name__, ("params", "samples", "fisher", "evaluate", "measure", "finetune",
                                         "loop", "language", "sequential", "lm_structure"))

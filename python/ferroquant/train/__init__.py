"""Training with the quantization in the loop: `qat` (fake quantization that rounds exactly as
ferroquant stores weights and its CPU kernels round activations; prepare / convert), `fake_quant`
(the torch roundings), `loop` (the fine-tuning loop of `ferroquant finetune`)."""

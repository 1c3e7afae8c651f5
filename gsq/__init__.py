"""gsq: GSQ (Gumbel-Softmax quantization) of Mixture-of-Experts LLMs to 2-bit compressed-tensors checkpoints."""

__version__ = "0.1.0"

"""Kernels for the networks: max pooling, the patch convolution, a native CPU kernel.

``pooling`` (max pooling with a cheap backward pass), ``patch_conv`` (a
convolution as patches @ kernel), ``native`` (the RGB layer's convolution as a
compiled XLA:CPU kernel, C++ source in ``csrc/``) and ``conv`` (``PatchConv``,
the ``flax.linen.Conv`` drop-in over the two). Nothing here knows BatchNorm.
"""

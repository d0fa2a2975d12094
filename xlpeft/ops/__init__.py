"""Operations on an ``AdaptedModel`` built only on core's public API.

Modules (``core`` never imports this package at module level):

* ``files``: adapter directories (config JSON + safetensors) saved and loaded with checks.
* ``artefacts``: atomic directory replacement that never destroys data or foreign paths.
* ``weights``: checksummed config/safetensors I/O, validated before large allocations.
* ``peft``: read and write Hugging Face PEFT's LoRA directory layout.
* ``adapterhub``: read and write AdapterHub ``adapters`` directories (checked, nothing half-loaded).
* ``adapterhub_map``: AdapterHub ↔ xlpeft configs and tensors per method (bottleneck, invertible, LoRA, prefix, Compacter).
* ``hub``: backbones and adapters by Hugging Face Hub repo id (cache, offline) and pushing adapters.
* ``export``: offline merged export, the backbone with merged adapters as a plain HF model.
* ``report``: parameter accounting (trainable, changed, stored) against the backbone.
* ``sparsify``: SparseAdapter pruning of a named adapter at initialisation.
* ``sft_select``: the support of a sparse fine-tuning (LT-SFT top-K |Δθ|, FishMask Fisher, DiffPruning L0 gates), SFT sums.
* ``arithmetic``: weight-space combinations of same-config adapters (average, a + λ(b − c), TIES, DARE).
* ``setups``: saved compositions: a trained fusion layer, or a whole setup with its adapters.
"""

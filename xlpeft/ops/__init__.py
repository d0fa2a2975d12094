"""Operations on an ``AdaptedModel`` built only on core's public API.

Adapter files (``files``), the HF PEFT layout (``peft``), parameter reports
(``report``), SparseAdapter pruning (``sparsify``). ``core`` never imports
this package at module level.
"""

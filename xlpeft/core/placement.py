"""Stack order versus execution order for adapters placed at different points of a block.

A bottleneck adapter with AdapterHub's post-norm placement (``pfeiffer-seqbn``,
``original_ln_before=True``) acts at a sublayer's LayerNorm (place ``…ffn_ln``);
one with the default placement acts earlier, at the sublayer output (``…ffn``).
Points run in block order, so ``Stack(post_norm, default)`` would silently run
the second child first. Such a Stack is refused; the reverse order is what runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from xlpeft.core.composition import Setup, Stack, leaves
from xlpeft.errors import XlpeftValueError

POST_NORM_SUFFIX = "_ln"


def _stacks(setup: Setup) -> Iterable[Stack]:
    if isinstance(setup, str):
        return
    if isinstance(setup, Stack):
        yield setup
    for child in setup.children:
        yield from _stacks(child)


def check_stack_order(setup: Setup, places_of: Callable[[str], set[str]]) -> None:
    """Refuse a Stack whose child order contradicts the order its points run in.

    ``places_of(name)`` gives the point keys (``encoder-3-ffn_ln`` …) where an adapter acts.
    """
    for stack in _stacks(setup):
        seen: list[tuple[str, set[str]]] = []  # earlier children: (name, post-norm places as pre-norm keys)
        for child in stack.children:
            for name in leaves(child):
                places = places_of(name)
                for earlier, post in seen:
                    clash = sorted(post & places)
                    if clash:
                        raise XlpeftValueError(
                            f"{stack!r} runs {earlier!r} before {name!r}, but at {clash[0].replace('-', '.')} "
                            f"{earlier!r} sits after the LayerNorm (post-norm, SeqBn placement) and {name!r} "
                            f"before it, so {name!r} would run first. Give both the same placement (e.g. "
                            f"'pfeiffer-seqbn' for a task adapter under 'madx-language-seqbn') or swap the order"
                        )
                post = {k[: -len(POST_NORM_SUFFIX)] for k in places if k.endswith(POST_NORM_SUFFIX)}
                seen.append((name, post))

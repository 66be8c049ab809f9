"""The one vocabulary for the kinds of Fisher matrix, shared by every option, file and title.

==============  ===========================================================  ====================
word            the matrix                                                   the papers' words
==============  ===========================================================  ====================
``empirical``   ``F̃ = (1/m) Σ_n g_n g_nᵀ``, gradients of the data's labels   "empirical Fisher"
                                                                             (all three papers)
``mc``          Monte-Carlo Fisher: gradients of labels sampled from the     MBF paper's "true
                model, ``ŷ_n ~ p(·|x_n)`` (one per input unless stated)      Fisher" (MBF-True,
                                                                             KFAC); KPSVD paper's
                                                                             "true Fisher" as
                                                                             its code estimates it
``exact``       the true Fisher in closed form, ``(1/m) Σ_n J_nᵀ H_n J_n``   KPSVD and two-level
                (the GGN for these losses)                                   papers' "exact
                                                                             Fisher"
==============  ===========================================================  ====================

The old spellings ``true`` and ``sampled`` (for ``mc``) are refused by the Python API with the
new word in the message; the command line still reads ``--fisher true`` with a deprecation note.
This module imports nothing heavy, so that ``mbf-analyze --help`` stays fast.
"""

from __future__ import annotations

from mbf_analysis.errors import ConfigError

__all__ = ["FISHER_KINDS", "DESCRIPTIONS", "OLD_SPELLINGS", "check_fisher_kind"]

FISHER_KINDS: tuple[str, ...] = ("empirical", "exact", "mc")
"""Every kind, in the order tables and figures list them."""

DESCRIPTIONS: dict[str, str] = {
    "empirical": "empirical Fisher (EFM)",
    "exact": "exact Fisher (the true Fisher in closed form)",
    "mc": "Monte-Carlo Fisher (the true Fisher from sampled labels)",
}
"""How tables, help texts and figure titles name each kind."""

OLD_SPELLINGS: dict[str, str] = {"true": "mc", "sampled": "mc"}
"""Words earlier versions used → the word now."""


def check_fisher_kind(value: str, what: str, allowed: tuple[str, ...] = FISHER_KINDS) -> str:
    """Return ``value`` if it is one of ``allowed``.

    Raises:
        ConfigError: Naming ``what`` (e.g. ``"KFACConfig.fisher"``), the allowed words, and the
            new word when ``value`` is an old spelling.
    """
    if value in allowed:
        return value
    hint = ""
    if value in OLD_SPELLINGS and OLD_SPELLINGS[value] in allowed:
        hint = f" ({value!r} is now spelled {OLD_SPELLINGS[value]!r})"
    raise ConfigError(f"{what} must be one of {allowed}, got {value!r}{hint}.")

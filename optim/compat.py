"""Arguments of the optimizers memopt replaces, read the way their users mean them.

A user moving from galore-torch, fira or ``torch.optim.Muon`` brings their argument names.
Each one either means the same thing here and is translated, or raises a ``ValueError``
that says what to write instead; none is accepted and ignored.

- galore-torch / fira param groups: a group is low-rank when it names a ``rank``; so when
  any group given to the constructor names one, the groups that do not are plain AdamW.
  ``proj_type`` "std" is memopt's default side (the smaller one), "left" / "right" pick the
  side; fira's ``alpha`` is memopt's ``scale``.
- ``torch.optim.Muon``: ``adjust_lr_fn`` is memopt's ``adjust_lr`` (None means "original");
  its ``eps`` is accepted at its default 1e-7 (memopt's normalization uses that value);
  ``ns_coefficients`` raises (memopt's "newton_schulz" uses torch's default ones).
"""

from __future__ import annotations

from typing import Any

#: galore-torch's proj_type -> memopt's projector side ("auto": the smaller dimension).
PROJ_TYPE_SIDES = {"std": "auto", "left": "left", "right": "right"}


def lowrank_group(group: dict[str, Any], ranks_named: bool) -> dict[str, Any]:
    """A low-rank param group with galore-torch / fira keys translated (a new dict).

    ``ranks_named``: some group given to the constructor named a ``rank``, so a group that
    names none is plain AdamW (``rank=None``), as in galore-torch.
    """
    group = dict(group)
    if ranks_named and "rank" not in group:
        group["rank"] = None
    if "alpha" in group:
        raise ValueError(f"Invalid param group key 'alpha' ({group['alpha']!r}): fira's alpha "
                         "is memopt's 'scale'; write scale=... instead")
    if "proj_type" in group:
        proj_type = group.pop("proj_type")
        if proj_type not in PROJ_TYPE_SIDES:
            raise ValueError(
                f"Invalid proj_type: {proj_type!r}; memopt supports galore-torch's 'std' (its "
                "default: the smaller side), 'left' and 'right'; for 'reverse_std' pick the "
                "side yourself with projector_options={'side': 'left' or 'right'}")
        options = dict(group.get("projector_options") or {})
        side = options.setdefault("side", PROJ_TYPE_SIDES[proj_type])
        if side != PROJ_TYPE_SIDES[proj_type]:
            raise ValueError(f"proj_type={proj_type!r} contradicts projector_options side "
                             f"{side!r}; give one of them")
        group["projector_options"] = options
    return group


def muon_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Constructor or group arguments with ``torch.optim.Muon``'s names translated."""
    kwargs = dict(kwargs)
    if "adjust_lr_fn" in kwargs:
        value = kwargs.pop("adjust_lr_fn")
        if "adjust_lr" in kwargs:
            raise ValueError("give adjust_lr or torch.optim.Muon's adjust_lr_fn, not both")
        if callable(value):
            raise ValueError("Invalid adjust_lr_fn: a callable; memopt takes torch.optim.Muon's "
                             "names: adjust_lr='original', 'match_rms_adamw' or 'none'")
        kwargs["adjust_lr"] = "original" if value is None else value
    if "ns_coefficients" in kwargs:
        raise ValueError("Invalid argument ns_coefficients: memopt's orthogonalizer="
                         "'newton_schulz' uses torch.optim.Muon's default coefficients "
                         "(3.4445, -4.7750, 2.0315); for other ones write "
                         "orthogonalizer='polar_express'")
    eps = kwargs.pop("eps", 1e-7)
    if eps != 1e-7:
        raise ValueError(f"Invalid eps: {eps!r}: torch.optim.Muon's eps guards the "
                         "Newton-Schulz normalization, fixed here at its default 1e-7; "
                         "Adam's epsilon for the other parameters is adamw_eps")
    return kwargs

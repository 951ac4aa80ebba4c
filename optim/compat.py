"""Arguments of the optimizers memopt replaces, read the way their users mean them.

A user moving from galore-torch, fira or ``torch.optim.Muon`` brings their argument names.
Each one either means the same thing here and is translated, or raises a ``ValueError``
that says what to write instead; none is accepted and ignored.

- galore-torch / fira param groups: a group is low-rank when it names a ``rank``; so when
  any group given to the constructor names an integer rank, the groups that name none are
  plain AdamW. ``rank=None`` opts its own group out and nothing else.
  ``proj_type`` "std" is memopt's default side (the smaller one), "left" / "right" pick the
  side; fira's ``alpha`` is memopt's ``scale``.
- ``torch.optim.Muon``: ``adjust_lr_fn`` is memopt's ``adjust_lr`` (None means "original");
  its ``eps`` is accepted at its default 1e-7 (memopt's normalization uses that value),
  and ``ns_coefficients`` at its default (3.4445, -4.775, 2.0315), the coefficients of
  memopt's "newton_schulz"; other values raise.
- bitsandbytes: ``optim_bits`` is memopt's ``state_bits``; ``min_8bit_size`` (4096) and
  ``percentile_clipping`` (100, off) are accepted at their defaults, which are memopt's
  behaviour; other values raise saying what to write instead.
"""

from __future__ import annotations

from typing import Any

from ..projections.polar import NEWTON_SCHULZ_COEFFICIENTS

#: bitsandbytes' defaults that are memopt's fixed behaviour (bitsandbytes/optim/optimizer.py).
BNB_MIN_8BIT_SIZE = 4096
BNB_PERCENTILE_CLIPPING = 100


def names_a_rank(group: Any) -> bool:
    """Whether a constructor's group names an integer rank (galore-torch's low-rank mark)."""
    rank = group.get("rank") if isinstance(group, dict) else None
    return isinstance(rank, int) and not isinstance(rank, bool)


def bitsandbytes_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Constructor or group arguments with bitsandbytes' 8-bit optimizer names translated."""
    kwargs = dict(kwargs)
    if "optim_bits" in kwargs:
        bits = kwargs.pop("optim_bits")
        if "state_bits" in kwargs and kwargs["state_bits"] != bits:
            raise ValueError(f"optim_bits={bits!r} contradicts state_bits="
                             f"{kwargs['state_bits']!r}; give state_bits alone")
        kwargs["state_bits"] = bits
    size = kwargs.pop("min_8bit_size", BNB_MIN_8BIT_SIZE)
    if size != BNB_MIN_8BIT_SIZE:
        raise ValueError(f"Invalid min_8bit_size: {size!r}: memopt keeps tensors under "
                         f"{BNB_MIN_8BIT_SIZE} elements in fp32, as bitsandbytes' default; "
                         "other sizes are not supported (leave it out)")
    clipping = kwargs.pop("percentile_clipping", BNB_PERCENTILE_CLIPPING)
    if clipping != BNB_PERCENTILE_CLIPPING:
        raise ValueError(f"Invalid percentile_clipping: {clipping!r}: memopt does not clip "
                         "gradients; call torch.nn.utils.clip_grad_norm_(model.parameters(), "
                         "max_norm) before step() (or clip_grad_norm= with step_in_backward)")
    return kwargs


#: galore-torch's proj_type -> memopt's projector side ("auto": the smaller dimension).
PROJ_TYPE_SIDES = {"std": "auto", "left": "left", "right": "right"}


def lowrank_group(group: dict[str, Any], ranks_named: bool) -> dict[str, Any]:
    """A low-rank param group with galore-torch / fira keys translated (a new dict).

    ``ranks_named``: some group given to the constructor named an integer ``rank``, so a
    group that names none is plain AdamW (``rank=None``), as in galore-torch.
    """
    group = bitsandbytes_arguments(group)
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
    kwargs = bitsandbytes_arguments(kwargs)
    if "adjust_lr_fn" in kwargs:
        value = kwargs.pop("adjust_lr_fn")
        if "adjust_lr" in kwargs:
            raise ValueError("give adjust_lr or torch.optim.Muon's adjust_lr_fn, not both")
        if callable(value):
            raise ValueError("Invalid adjust_lr_fn: a callable; memopt takes torch.optim.Muon's "
                             "names: adjust_lr='original', 'match_rms_adamw' or 'none'")
        kwargs["adjust_lr"] = "original" if value is None else value
    if "ns_coefficients" in kwargs:
        coefficients = kwargs.pop("ns_coefficients")
        # torch.optim.Muon's default, (3.4445, -4.775, 2.0315), is memopt's Newton-Schulz
        if tuple(coefficients) != NEWTON_SCHULZ_COEFFICIENTS or \
                kwargs.get("orthogonalizer", "newton_schulz") != "newton_schulz":
            raise ValueError(f"Invalid ns_coefficients: {tuple(coefficients)!r}: memopt's "
                             "orthogonalizer='newton_schulz' uses torch.optim.Muon's default "
                             f"coefficients {NEWTON_SCHULZ_COEFFICIENTS} only; for others write "
                             "orthogonalizer='polar_express' (per-step optimal ones)")
    eps = kwargs.pop("eps", 1e-7)
    if eps != 1e-7:
        raise ValueError(f"Invalid eps: {eps!r}: torch.optim.Muon's eps guards the "
                         "Newton-Schulz normalization, fixed here at its default 1e-7; "
                         "Adam's epsilon for the other parameters is adamw_eps")
    return kwargs

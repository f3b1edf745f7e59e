"""Click options that more than one subcommand takes, defined once so they read alike."""

from __future__ import annotations

import click

# serving.metadata.MASK_RULES, spelt out: the CLI's help must not import numpy or the server
MASK_RULES = ("threshold", "cva-gated")

mask_rule_option = click.option(
    "--mask-rule",
    type=click.Choice(MASK_RULES),
    default=None,
    help="threshold: probability >= --threshold. cva-gated: change vector analysis times the "
    "probability, cut at the pair's outliers (median + 5 robust SD of its bulk, at least 1.25; "
    "sharper for changes smaller than a patch; served models only). Default: the model's (its "
    "card says which), or threshold when --threshold is set.",
)

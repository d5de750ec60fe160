"""Dataset stage: read a file or folder, detect its layout, normalise records into
`Example`s, validate them with exact locations, and split off a validation set.

    result = load_dataset("data.jsonl")          # never raises on bad data
    if result.ok:
        train, valid = split_examples(result.examples, fraction=0.1, seed=0)
"""

from openft.data.layouts import LAYOUTS
from openft.data.load import LoadResult, load_dataset, parse_columns
from openft.data.split import split_examples, validate_fraction
from openft.data.types import Example, Location, Message, Problem

__all__ = [
    "LAYOUTS",
    "Example",
    "LoadResult",
    "Location",
    "Message",
    "Problem",
    "load_dataset",
    "parse_columns",
    "split_examples",
    "validate_fraction",
]
